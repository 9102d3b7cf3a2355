"""A seccomp filter for sandboxed runs: the kernel keyring calls fail with EPERM.

Namespaces do not cover the kernel's keyrings: keys a program adds (``add_key``, ``keyctl``) are
kept per uid after it ends, and each run started by root has a fresh uid and so a fresh quota, so
malicious programs could pile up kernel memory run after run; ``request_key`` may make the kernel
start a helper program as host root. Nothing a solution needs uses them. The filter is classic BPF
as bubblewrap's ``--seccomp FD`` reads it: check the architecture, then the call number.
"""

from __future__ import annotations

import platform
import struct

# (AUDIT_ARCH_* of <linux/audit.h>, add_key, request_key, keyctl) per machine.
_ARCHITECTURES = {"x86_64": (0xC000003E, (248, 249, 250)), "aarch64": (0xC00000B7, (217, 218, 219))}
_X32_BIT = 0x40000000  # x86_64's x32 calls carry this bit: refused too, whatever their number
_LOAD, _JUMP_EQUAL, _JUMP_AT_LEAST, _RETURN = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JGE|K, RET|K
_ALLOW, _DENY = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM


def _instruction(code: int, true: int, false: int, value: int) -> bytes:
    return struct.pack("HBBI", code, true, false, value)  # struct sock_filter, native byte order


def keyring_filter(machine: str | None = None) -> bytes | None:
    """The filter program for ``machine`` (default: this one), or None where it is not known."""
    machine = machine or platform.machine()
    if machine not in _ARCHITECTURES:
        return None
    architecture, calls = _ARCHITECTURES[machine]
    checks = [_instruction(_JUMP_EQUAL, len(calls) - i, 0, call) for i, call in enumerate(calls)]  # -> deny
    # 0 arch, 1 other arch -> allow, 2 call number, 3 x32 -> deny, checks, allow, deny
    program = [_instruction(_LOAD, 0, 0, 4), _instruction(_JUMP_EQUAL, 0, len(checks) + 2, architecture),
               _instruction(_LOAD, 0, 0, 0), _instruction(_JUMP_AT_LEAST, len(checks) + 1, 0, _X32_BIT),
               *checks, _instruction(_RETURN, 0, 0, _ALLOW), _instruction(_RETURN, 0, 0, _DENY)]
    return b"".join(program)
