"""The keyring filter, run by a small classic-BPF interpreter over every call number: exactly the
keyring calls (and x32 calls) of the filter's own architecture are refused, all else allowed."""

from __future__ import annotations

import struct

import pytest

from llada.evaluation.sandbox.seccomp import keyring_filter

ARCHES = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


def run_filter(program: bytes, arch: int, number: int) -> int:
    """Classic BPF as the kernel runs a seccomp filter (the instructions this filter uses)."""
    data = struct.pack("iI", number, arch) + bytes(56)  # struct seccomp_data: nr, arch, ip, args
    instructions = [struct.unpack("HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    accumulator, pc = 0, 0
    while True:
        code, true, false, value = instructions[pc]
        if code == 0x20:
            accumulator = struct.unpack_from("I", data, value)[0]
        elif code in (0x15, 0x35):
            taken = accumulator == value if code == 0x15 else accumulator >= value
            pc += true if taken else false
        elif code == 0x06:
            return value
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
        pc += 1


@pytest.mark.parametrize("machine, refused", [("x86_64", {248, 249, 250}), ("aarch64", {217, 218, 219})])
def test_only_the_keyring_calls_are_refused(machine: str, refused: set[int]) -> None:
    program = keyring_filter(machine)
    eperm, allow = 0x00050001, 0x7FFF0000
    for number in range(512):
        assert run_filter(program, ARCHES[machine], number) == (eperm if number in refused else allow), number
    assert run_filter(program, ARCHES[machine], 0x40000000 + 250) == eperm  # x32's keyctl
    other = next(arch for name, arch in ARCHES.items() if name != machine)
    assert run_filter(program, other, min(refused)) == allow  # another architecture's numbers mean other calls
    assert keyring_filter("riscv64") is None
