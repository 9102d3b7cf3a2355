"""Code extraction from model answers, on the shapes answers really take: completions cut at the next
top-level statement, chat answers with prose, fences, restated imports, helpers, examples and cut-off ends."""

from __future__ import annotations

import ast

from llada.evaluation.code_extraction import chat_solution, code_blocks, extract_chat_code, truncate_completion

PROMPT = 'from typing import List\n\n\ndef total(values: List[int]) -> int:\n    """Sum of values."""\n'


def run(program: str, call: str):
    namespace: dict = {}
    exec(program, namespace)  # noqa: S102 (the test's own programs)
    return eval(call, namespace)


def test_truncation_keeps_the_function_body() -> None:
    assert truncate_completion("    return a + b\n\ndef unrelated():\n    pass\n") == "    return a + b\n"
    assert truncate_completion("    return a + b\n\nprint(total([1]))\n") == "    return a + b\n"
    assert truncate_completion("    return 1\n") == "    return 1\n"


def test_answer_restating_imports_and_a_helper() -> None:
    """The shape the old truncation scored 0: imports before def, a helper after it."""
    answer = ("Sure! Here is the function:\n\n```python\nfrom typing import List\nimport math\n\n"
              "def total(values: List[int]) -> int:\n    return _add(values)\n\n\n"
              "def _add(values):\n    return int(math.fsum(values))\n```\n\nThis adds the values.")
    program = chat_solution(PROMPT, answer, "total")
    assert run(program, "total([1, 2, 3])") == 6


def test_examples_prints_and_main_guards_are_dropped() -> None:
    answer = ("```python\ndef total(values):\n    return sum(values)\n\nprint(total([1, 2]))\n"
              "assert total([]) == 1\nif __name__ == '__main__':\n    raise SystemExit(total([3]))\n```")
    code = extract_chat_code(answer, "total")
    assert "print" not in code and "assert" not in code and "__main__" not in code
    assert run(PROMPT + "\n" + code, "total([4, 5])") == 9


def test_the_block_that_defines_the_entry_point_is_chosen() -> None:
    answer = ("First, a usage example:\n```python\nimport itertools\nprint(total([1]))\n```\n"
              "A shell command:\n```bash\npip install nothing\n```\nThe solution:\n```py\n"
              "def total(values):\n    return sum(itertools.islice(values, None))\n```\n")
    program = chat_solution(PROMPT, answer, "total")
    assert run(program, "total([2, 3])") == 5  # the earlier block's import is kept


def test_decorators_constants_and_classes_are_kept() -> None:
    answer = ("```python\nimport functools\nLIMIT = 10\n\nclass Box:\n    value = 1\n\n"
              "@functools.lru_cache(maxsize=None)\ndef total(values):\n    return min(LIMIT, sum(values)) + Box.value\n```")
    assert run(chat_solution(PROMPT, answer, "total"), "total((4, 5, 6))") == 11


def test_an_answer_cut_off_by_the_generation_length_keeps_its_complete_functions() -> None:
    answer = "```python\ndef total(values):\n    return sum(values)\n\ndef helper(x):\n    return [x for x in"
    assert run(chat_solution(PROMPT, answer, "total"), "total([7])") == 7


def test_a_bare_body_or_no_fence_is_a_completion() -> None:
    body_only = "```python\n    return sum(values) * 2\n```"
    assert run(chat_solution(PROMPT, body_only, "total"), "total([1, 2])") == 6
    no_fence = "def total(values):\n    return len(values)\n"
    assert run(chat_solution(PROMPT, no_fence, "total"), "total([1, 2])") == 2
    assert code_blocks("no code here") == ["no code here"]
    assert code_blocks("```text\nnot python\n```") == []


def test_prompt_helpers_remain_when_the_answer_does_not_restate_them() -> None:
    prompt = "def double(x):\n    return 2 * x\n\n\ndef quadruple(x):\n    \"\"\"Four times x.\"\"\"\n"
    answer = "```python\ndef quadruple(x):\n    return double(double(x))\n```"
    program = chat_solution(prompt, answer, "quadruple")
    ast.parse(program)
    assert run(program, "quadruple(3)") == 12


def test_blocks_inside_a_markdown_list_and_crlf_answers() -> None:
    listed = ("1. Import and define:\n\n   ```python\n   def total(values):\n       return sum(values) + 1\n"
              "   ```\n2. Done.")
    assert run(chat_solution(PROMPT, listed, "total"), "total([1])") == 2
    crlf = ("Usage:\r\n```python\r\nprint(total([1]))\r\n```\r\nCode:\r\n```python\r\ndef total(values):\r\n"
            "    return sum(values) * 3\r\n```\r\n")
    assert run(chat_solution(PROMPT, crlf, "total"), "total([1])") == 3


def test_a_restated_signature_is_skipped_and_the_last_version_wins() -> None:
    stub_first = ('```python\ndef total(values):\n    """Sum."""\n    pass\n```\nNow the body:\n'
                  "```python\ndef total(values):\n    return sum(values) - 1\n```")
    assert run(chat_solution(PROMPT, stub_first, "total"), "total([5])") == 4
    revised = ("```python\ndef total(values):\n    return 0\n```\nOops, corrected version:\n"
               "```python\ndef total(values):\n    return sum(values)\n```")
    assert run(chat_solution(PROMPT, revised, "total"), "total([5, 6])") == 11


def test_prose_before_fenceless_code_and_future_imports() -> None:
    prose = "Sure, here it is.\nfrom __future__ import annotations\nimport math\n\ndef total(values):\n" \
            "    return math.prod(values)\n"
    assert run(chat_solution(PROMPT, prose, "total"), "total([2, 3])") == 6


def test_guarded_helpers_and_recursion_limits_stay_and_test_code_goes() -> None:
    answer = ("```python\nimport sys\nimport pytest\nsys.setrecursionlimit(10000)\ntry:\n    from math import prod\n"
              "except ImportError:\n    prod = None\nif True:\n    def helper(values):\n        return prod(values)\n\n"
              "def total(values):\n    return helper(values)\n\ndef test_total():\n    assert total([2]) == 2\n\n"
              "class TestTotal:\n    pass\n\nif __name__ == '__main__':\n    pytest.main()\n```")
    code = extract_chat_code(answer, "total")
    assert "pytest" not in code and "test_total" not in code and "TestTotal" not in code
    assert "setrecursionlimit" in code
    assert run(PROMPT + "\n" + code, "total([2, 5])") == 10


def test_earlier_blocks_lend_only_what_the_solution_uses() -> None:
    """A helper from an earlier step is carried over (with what it needs); an unused import of an
    earlier draft (numpy, absent where code is graded) is not."""
    answer = ("Step 1, a helper:\n```python\nimport math\n\ndef is_square(n):\n    return math.isqrt(n) ** 2 == n\n```\n"
              "A first draft:\n```python\nimport numpy as np\n\ndef total(values):\n    return int(np.sum(values))\n```\n"
              "Step 2, the final version:\n```python\ndef total(values):\n    return sum(v for v in values if is_square(v))\n```")
    code = extract_chat_code(answer, "total")
    assert "numpy" not in code and "def is_square" in code and "import math" in code
    assert run(PROMPT + "\n" + code, "total([4, 5, 9])") == 13


def test_setup_statements_stay_and_examples_reading_input_go() -> None:
    answer = ("```python\nFIBS = [0, 1]\nfor _ in range(20):\n    FIBS.append(FIBS[-1] + FIBS[-2])\nFIBS += [0]\n"
              "numbers = list(map(int, input().split()))\ndef total(values):\n    return sum(FIBS[v] for v in values)\n"
              "total(numbers)\nprint(total([3]))\n```")
    code = extract_chat_code(answer, "total")
    assert "input" not in code and "print" not in code and "total(numbers)" not in code
    assert run(PROMPT + "\n" + code, "total([3, 10])") == 2 + 55
