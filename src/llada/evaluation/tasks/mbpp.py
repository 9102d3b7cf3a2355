"""MBPP for lm-eval, graded in this project's sandbox (``llada_mbpp.yaml``).

lm-eval's own MBPP task loads a Hub-hosted metric when imported and so cannot run offline; this task
keeps the MBPP paper's prompt (the task, its three tests, ``[BEGIN]``, the code, ``[DONE]``) and its
three few-shot examples (task ids 2, 3 and 4 of the ``prompt`` split), and grades each answer with
:func:`llada.evaluation.code_grading.run_check` under bubblewrap. Set ``LLADA_UNSAFE_NO_ISOLATION=1`` to grade
without isolation where bubblewrap cannot run (the code can then touch your files and network).
"""

from __future__ import annotations

import ast
import builtins
import os

import datasets

from llada.evaluation.code_extraction import code_blocks
from llada.evaluation.code_grading import run_check
from llada.evaluation.sandbox.process import IsolationUnavailable, require_isolation

FEW_SHOT_IDS = (2, 3, 4)
FIRST_TEST_ID = 11  # task ids 1-10 are the prompt split; the test split is 11-510


def process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Keep the test problems and, of the prompt split, the three few-shot examples (marked so that
    their target is the code rather than the tests)."""
    kept = dataset.filter(lambda doc: doc["task_id"] >= FIRST_TEST_ID or doc["task_id"] in FEW_SHOT_IDS)
    return kept.map(lambda doc: {"is_fewshot": doc["task_id"] < FIRST_TEST_ID})


def entry_point(tests: list[str], setup: str = "") -> str:
    """The function the tests call: the first name called in them that is neither a builtin
    (``set(f(x))``, ``round(f(x), 2)``) nor defined by the setup code."""
    defined = {node.name for node in ast.walk(ast.parse(setup)) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    for test in tests:
        calls = [node for node in ast.walk(ast.parse(test)) if isinstance(node, ast.Call)]
        for call in sorted(calls, key=lambda node: (node.lineno, node.col_offset)):
            name = call.func.id if isinstance(call.func, ast.Name) else None
            if name and name not in vars(builtins) and name not in defined:
                return name
    raise ValueError(f"the tests call no function of the solution: {tests[0]!r}")


def answer_code(response: str) -> str:
    """The code of an answer: inside its first Python code block if it has one, without ``[BEGIN]``."""
    text = response.split("[DONE]")[0].replace("[BEGIN]", "")
    blocks = code_blocks(text) if "```" in text else [text]
    return blocks[0] if blocks else text


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 of the answer: its code, then the problem's setup code and tests, in the sandbox."""
    isolation = "none" if os.environ.get("LLADA_UNSAFE_NO_ISOLATION") == "1" else "bubblewrap"
    try:
        require_isolation(isolation)
    except IsolationUnavailable as error:  # inside lm-eval the way out is an environment variable
        raise IsolationUnavailable(f"{error} (in lm-eval: LLADA_UNSAFE_NO_ISOLATION=1)") from None
    tests = "def check(candidate):\n" + "".join(f"    {test}\n" for test in doc["test_list"])
    setup = doc.get("test_setup_code") or ""
    verdict = run_check(setup, answer_code(results[0]), tests, entry_point(doc["test_list"], setup),
                        isolation=isolation)
    return {"pass_at_1": float(verdict.passed)}
