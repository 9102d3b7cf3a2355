"""Turn a model's answer into the code to test: completions of a function body, and chat answers.

Two shapes of answer, as in HumanEval's practice:

- a **completion** (base models, prompted with the function header): the body, cut where a new
  top-level statement starts (human-eval's stop sequences);
- a **chat answer** (instruct models): prose around fenced code blocks that restate the whole
  function, often with its imports and helper functions. The last code block that defines the entry
  point with a real body is parsed with :mod:`ast` and kept but for examples and tests (asserts,
  prints, ``if __name__ == "__main__"``, input), and earlier blocks lend it the definitions and
  imports it uses, as post-processing in the field does (e.g. EvalPlus's sanitizer keeps what the
  entry point depends on). Blocks are dedented (code inside a markdown list) and CRLF line ends
  read as LF.
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
# What an earlier block may lend the chosen one: names bound once, without running anything.
_LENDABLE = (ast.Import, ast.ImportFrom, *_DEFINITIONS, ast.Assign, ast.AnnAssign)
_TEST_MODULES = {"pytest", "unittest", "doctest"}
_DEMO_CALLS = {"print", "input", "pprint", "exit", "quit"}  # bare calls that only show or ask
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


def _reads_input(node: ast.AST) -> bool:
    """Whether ``node`` asks for input (``input()``, ``sys.stdin``): there is none when graded."""
    return any((isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "input")
               or (isinstance(inner, ast.Attribute) and inner.attr == "stdin") for inner in ast.walk(node))


def _kept(node: ast.stmt, entry_point: str) -> bool:
    """Whether a top-level statement of the chosen block belongs to the solution: everything but
    asserts, ``if __name__ == "__main__"`` blocks, bare calls that show results or call the entry
    point (examples), docstrings, statements reading input, test code and ``__future__`` imports."""
    if isinstance(node, ast.Assert) or _reads_input(node):
        return False
    if isinstance(node, ast.ImportFrom):
        return node.module not in ("__future__", *_TEST_MODULES)
    if isinstance(node, ast.Import):
        return not any(alias.name.split(".")[0] in _TEST_MODULES for alias in node.names)
    if isinstance(node, _DEFINITIONS):
        return not node.name.startswith(("test_", "Test"))
    if isinstance(node, ast.If):
        return "__name__" not in ast.unparse(node.test)
    if isinstance(node, ast.Expr):
        call = node.value
        if not isinstance(call, ast.Call):
            return False  # a docstring or a bare value
        name = call.func.id if isinstance(call.func, ast.Name) else None
        return name not in (*_DEMO_CALLS, entry_point) and not (name or "").startswith("test")
    return True


def _bound(node: ast.stmt) -> set[str]:
    """The names a statement binds at the top level."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    if isinstance(node, _DEFINITIONS):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return {inner.id for target in targets if target is not None for inner in ast.walk(target)
            if isinstance(inner, ast.Name)}


def _used(nodes: list[ast.stmt]) -> set[str]:
    return {inner.id for node in nodes for inner in ast.walk(node)
            if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Load)}


def _source(code: str, nodes: list[ast.stmt]) -> str:
    """The source lines of ``nodes`` (with their decorators), in order."""
    lines = code.splitlines(keepends=True)
    pieces = []
    for node in nodes:
        first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
        pieces.append("".join(lines[first - 1:node.end_lineno]).rstrip("\n") + "\n")
    return "\n".join(pieces)


def extract_chat_code(answer: str, entry_point: str) -> str | None:
    """The solution a chat answer's code blocks stand for, or None when no block defines ``entry_point``.

    The last block that defines it with a real body is the solution (answers that revise their code
    put the final version last; a restated signature is skipped), minus examples and tests
    (:func:`_kept`). Earlier blocks lend it what it uses and does not define (a helper written in a
    step before, an import), the latest binding of each name, and what those use in turn.
    """
    parsed = [(block, module) for block in code_blocks(answer) if (module := _parse_prefix(block)) is not None]
    chosen = [i for i, (_, module) in enumerate(parsed) if _defines(module, entry_point)]
    if not chosen:
        return None
    block, module = parsed[chosen[-1]]
    solution = [node for node in module.body if _kept(node, entry_point)]
    lenders = [(earlier, node) for earlier, earlier_module in parsed[:chosen[-1]] for node in earlier_module.body
               if isinstance(node, _LENDABLE) and _kept(node, entry_point)]
    satisfied = set().union(*(_bound(node) for node in solution))
    needed, lent = _used(solution) - satisfied, {}
    while True:
        for index in range(len(lenders) - 1, -1, -1):  # the latest binding of a name wins
            names = _bound(lenders[index][1]) & needed
            if names and index not in lent:
                lent[index] = lenders[index]
                satisfied |= _bound(lenders[index][1])
                needed = (needed | _used([lenders[index][1]])) - satisfied
                break
        else:
            break
    earlier_code = "".join(_source(source, [node]) for _, (source, node) in sorted(lent.items()))
    return earlier_code + _source(block, solution)


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
