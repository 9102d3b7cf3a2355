"""The two processes of one graded run: the solution (untrusted) and the judge (trusted), apart.

Not imported by the library: :mod:`llada.evaluation.code_grading` copies this file into two sandboxes
(:mod:`llada.evaluation.sandbox.process`), each run by the sandbox's bare Python (standard library only):

    python -I -S check_runner.py solution SOLUTION ENTRY_POINT REQUEST_FD REPLY_FD
    python -I -S check_runner.py judge CONTEXT TESTS ENTRY_POINT REQUEST_FD REPLY_FD VERDICT_FD

The judge runs the trusted code alone: the problem's context (a HumanEval prompt: imports, helper
functions) and its tests. Its ``check`` gets a stand-in for the function under test that sends each
call's arguments to the solution's process and reads the return value back, both as Python
literals (numbers, strings, bytes, None, and lists, tuples, sets and dicts of them) parsed without
evaluating anything. Only the judge holds the verdict descriptor, and it writes ``passed`` there
once ``check`` has returned. The solution's process can end, print, fork or corrupt its own
interpreter as it likes: it never shares a process, a namespace or an object with the tests, so
exit status, patched builtins or modules, objects whose ``==`` is always true and tricks on the
interpreter's memory all leave the verdict alone. The price: a function under test must take and
return such literals (every HumanEval problem does), and exceptions it raises reach the tests as
``SolutionError``.
"""

import ast
import os
import sys

MAX_MESSAGE = 64 * 2**20  # bytes of one call's arguments or result
_NAMES = {"inf": float("inf"), "nan": float("nan")}  # in float reprs; True, False and None are constants


class SolutionError(Exception):
    """The solution raised, ended, or returned something that is not a plain literal."""


def parse_literal(text: str):
    """The value a ``repr`` of plain data stands for (``ast.literal_eval`` plus ``inf``, ``nan``,
    ``set()`` and ``frozenset(...)``), evaluating nothing else."""

    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name) and node.id in _NAMES:
            return _NAMES[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = value(node.operand)
            if isinstance(operand, (int, float, complex)) and not isinstance(operand, bool):
                return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):  # complex: (1+2j)
            left, right = value(node.left), value(node.right)
            if isinstance(left, (int, float)) and isinstance(right, complex):
                return left + right if isinstance(node.op, ast.Add) else left - right
        if isinstance(node, ast.Tuple):
            return tuple(value(item) for item in node.elts)
        if isinstance(node, ast.List):
            return [value(item) for item in node.elts]
        if isinstance(node, ast.Set):
            return {value(item) for item in node.elts}
        if isinstance(node, ast.Dict) and None not in node.keys:
            return {value(key): value(item) for key, item in zip(node.keys, node.values)}
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("set", "frozenset")
                and len(node.args) <= 1 and not node.keywords):
            items = value(node.args[0]) if node.args else ()
            if isinstance(items, (set, list, tuple)):
                return set(items) if node.func.id == "set" else frozenset(items)
        raise SolutionError(f"not a plain literal: {ast.dump(node)[:200]}")

    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as error:
        raise SolutionError(f"not a plain literal ({type(error).__name__})") from None
    return value(tree.body)


def send(fd: int, text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    if len(data) > MAX_MESSAGE:
        raise SolutionError(f"a message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd: int) -> str | None:
    """The next message, or None at the end of the stream."""

    def exactly(count: int) -> bytes | None:
        chunks, left = [], count
        while left:
            chunk = os.read(fd, min(left, 2**20))
            if not chunk:
                return None
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    header = exactly(8)
    if header is None:
        return None
    length = int.from_bytes(header, "big")
    if length > MAX_MESSAGE:
        raise SolutionError(f"a message of {length} bytes exceeds {MAX_MESSAGE}")
    body = exactly(length)
    if body is None:
        raise SolutionError("the stream ended inside a message")
    return body.decode("utf-8", "surrogatepass")


def plain(value):
    """``value`` as builtin types (a Counter as a dict, a namedtuple as a tuple, an IntEnum as an
    int), so that its ``repr`` is a literal; other types are left for the judge to refuse."""
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return value
    for kind in (bool, int, float, complex, str, bytes):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, dict):
        return {plain(key): plain(item) for key, item in value.items()}
    for kind in (list, tuple, set, frozenset):
        if isinstance(value, kind):
            return kind(plain(item) for item in value)
    return value


def serve(solution_path: str, entry_point: str, requests: int, replies: int) -> None:
    """The solution's process: define the solution, then answer calls until the judge is done."""
    with open(solution_path, encoding="utf-8") as handle:
        source = handle.read()
    namespace = {"__name__": "solution"}
    exec(compile(source, "solution.py", "exec"), namespace)  # noqa: S102 (sandboxed, apart from the judge)
    function = namespace[entry_point]
    while (message := receive(requests)) is not None:
        args, kwargs = parse_literal(message)
        try:
            reply = "ok " + repr(plain(function(*args, **kwargs)))
        except Exception as error:  # noqa: BLE001 (whatever it raises, the judge reports as its failure)
            reply = f"raised {type(error).__name__}: {error}"[:2000]
        send(replies, reply)


class StandIn:
    """The function under test as the judge's tests see it: a call is a message to the solution."""

    def __init__(self, name: str, requests: int, replies: int) -> None:
        self.__name__, self._requests, self._replies = name, requests, replies

    def __call__(self, *args, **kwargs):
        message = repr((args, kwargs))
        try:
            parse_literal(message)
        except SolutionError:
            raise TypeError(f"{self.__name__}'s arguments are not plain literals: {message[:200]}") from None
        send(self._requests, message)
        reply = receive(self._replies)
        if reply is None:
            raise SolutionError(f"the solution's process ended during a call to {self.__name__}")
        if reply.startswith("ok "):
            return parse_literal(reply[3:])
        raise SolutionError(f"{self.__name__} {reply}")


def judge(context_path: str, tests_path: str, entry_point: str, requests: int, replies: int, verdict: int) -> None:
    """The judge's process: the context and the tests, with the stand-in as the entry point."""
    namespace = {"__name__": "__main__"}
    for path, name in ((context_path, "context.py"), (tests_path, "test.py")):
        with open(path, encoding="utf-8") as handle:
            exec(compile(handle.read(), name, "exec"), namespace)  # noqa: S102 (trusted: the problem's own)
        if name == "context.py":
            namespace[entry_point] = StandIn(entry_point, requests, replies)
    check = namespace.get("check")
    if not callable(check):
        raise RuntimeError("the tests define no check function")  # noqa: TRY004 (a broken problem, not a type)
    check(namespace[entry_point])
    os.write(verdict, b"passed")


if __name__ == "__main__":
    if hasattr(sys, "set_int_max_str_digits"):  # Python >= 3.10.7 limits int <-> str conversions
        sys.set_int_max_str_digits(0)  # integers of any size cross the pipe as literals
    role, arguments = sys.argv[1], sys.argv[2:]
    if role == "solution":
        serve(arguments[0], arguments[1], int(arguments[2]), int(arguments[3]))
    elif role == "judge":
        judge(arguments[0], arguments[1], arguments[2], *map(int, arguments[3:6]))
    else:
        raise SystemExit(f"unknown role {role!r}")
