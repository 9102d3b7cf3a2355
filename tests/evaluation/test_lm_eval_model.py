"""The lm-eval model: exact scores where they are exact, the official wrapper's definitions (is_greedy,
tokenization, generation clean-up, model args), loud errors, and lm-eval run end to end offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'llada[eval]')")

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from llada.cli.main import main
from llada.diffusion.likelihood import suffix_greedy
from llada.diffusion.sampling import generate
from llada.evaluation.lm_eval_model import TASKS_DIR, LLaDAEvalModel
from llada.model.loading import DEMO_MODEL


@dataclass
class Request:  # what lm-eval hands a model: .args, and where the request comes from
    args: tuple
    task_name: str = "task"
    doc_id: int = 0
    idx: int = 0


@pytest.fixture(scope="module")
def adapter(checkpoint_dir: Path) -> LLaDAEvalModel:
    return LLaDAEvalModel(str(checkpoint_dir), device="cpu", mc_num=8, batch_size=4, gen_length=8, block_length=4,
                          steps=8)


@pytest.fixture(scope="module")
def demo() -> LLaDAEvalModel:
    return LLaDAEvalModel(str(DEMO_MODEL), device="cpu", mc_num=8, batch_size=8, gen_length=16, block_length=8,
                          steps=16)


def test_one_token_continuations_are_scored_exactly(adapter: LLaDAEvalModel) -> None:
    context, continuation = adapter._encode_pair("The quick brown", " fox")
    assert len(continuation) == 1
    masked = torch.tensor([context + [adapter.model.config.mask_token_id]])
    with torch.no_grad():
        logits = adapter.model(masked).logits[0, -1].double()
    (score, greedy), = adapter.loglikelihood([Request(("The quick brown ", "fox"))])  # space moves over
    assert score == pytest.approx(F.log_softmax(logits, -1)[continuation[0]].item(), rel=1e-5)
    assert greedy == (logits.argmax().item() == continuation[0])


def test_continuations_are_tokenized_as_the_official_encode_pair(adapter: LLaDAEvalModel) -> None:
    """The continuation's ids are those of context + continuation after the context's own ids."""
    tokenizer = adapter.tokenizer
    for context, continuation in (("The quick brown ", "fox"), ("Numbers: 1 2", " 3 4"), ("To be", ", or not")):
        context_ids, continuation_ids = adapter._encode_pair(context, continuation)
        whole = tokenizer.encode(context.rstrip() + context[len(context.rstrip()):] + continuation)
        assert context_ids == tokenizer.encode(context.rstrip())
        assert context_ids + continuation_ids == whole


def test_one_token_requests_share_forward_passes_and_match_single_scoring(adapter: LLaDAEvalModel) -> None:
    candidates = [("The quick brown", " fox"), ("A", " the"), ("Numbers: 1 2", " 3"), ("To be, or not", " to"),
                  ("In the", " beginning")]
    singles = [Request(pair) for pair in candidates if len(adapter._encode_pair(*pair)[1]) == 1]
    assert len(singles) >= 3  # contexts of different lengths: one left-padded batch
    requests = singles + [Request(("The fox", " jumps over the lazy dog"))]  # several tokens: Monte Carlo
    together = adapter.loglikelihood(requests)
    for request, (score, greedy) in zip(singles, together):
        (alone, alone_greedy), = adapter._score_single_tokens([adapter._encode_pair(*request.args)])
        assert score == pytest.approx(alone, rel=1e-5, abs=1e-5) and greedy == alone_greedy
    assert together[-1][0] < 0


def test_multi_token_requests_share_passes_without_changing_scores(checkpoint_dir: Path) -> None:
    """batch_size a multiple of mc_num packs requests into one pass; each request's masks come from
    its own generator, so the scores are those of one request at a time."""
    requests = [Request(pair, doc_id=i) for i, pair in enumerate((
        ("The fox", " jumps over the lazy dog"), ("A", " quick brown fox"), ("Numbers: 1 2 3", " 4 5 6 7"),
        ("To be", ", or not to be")))]
    one, packed = (LLaDAEvalModel(str(checkpoint_dir), device="cpu", mc_num=4, batch_size=size, seed=7,
                                  is_check_greedy=False) for size in (4, 16))
    calls = []
    packed.model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    alone = one.loglikelihood(requests)
    together = packed.loglikelihood(requests)
    assert calls == [16]  # one ELBO pass of 4 requests x 4 samples
    for (score, greedy), (expected, expected_greedy) in zip(together, alone):
        assert score == pytest.approx(expected, rel=1e-5, abs=1e-5) and greedy is expected_greedy is False


def official_suffix_greedy(model, prefix: list[int], target: list[int], cfg: float) -> bool:
    """The official wrapper's suffix_greedy_prediction, transcribed for one request (no padding)."""
    mask_id = model.config.mask_token_id
    seq = torch.full((1, len(prefix) + len(target)), mask_id)
    seq[0, :len(prefix)] = torch.tensor(prefix)
    prompt_index = torch.arange(seq.shape[1]) < len(prefix)
    for _ in range(len(target)):
        mask_index = seq == mask_id
        batch = seq
        if cfg > 0:
            un_batch = seq.clone()
            un_batch[0, prompt_index] = mask_id
            batch = torch.cat([seq, un_batch])
        with torch.no_grad():
            logits = model(batch).logits
        if cfg > 0:
            logits, un_logits = torch.chunk(logits, 2, dim=0)
            logits = un_logits + (cfg + 1) * (logits - un_logits)
        logits = logits[mask_index]
        x0 = torch.argmax(logits, dim=-1)
        p = torch.softmax(logits.to(torch.float32), dim=-1)
        confidence = torch.gather(p, dim=-1, index=x0[:, None]).squeeze(-1)
        _, index = torch.sort(confidence, descending=True)
        x0[index[1:]] = mask_id
        seq[mask_index] = x0.clone()
    return bool(torch.all(torch.tensor(target) == seq[0, len(prefix):]))


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_is_greedy_is_the_official_suffix_greedy_prediction_on_the_demo_model(demo: LLaDAEvalModel,
                                                                              cfg: float) -> None:
    """Batched, left-padded suffix_greedy equals the official one-request loop, on targets that are
    greedy by construction, on those with one token changed, and on real continuations."""
    model, tokenizer = demo.model, demo.tokenizer
    contexts = ["The king", "To be, or not to be,", "Define the word \"ocean\".", "What is 3 + 4?", "O Romeo,"]
    pairs = []
    for length, text in zip((2, 3, 4, 5, 6), contexts):
        context = tokenizer.encode(text)
        decoded = generate(model, torch.tensor([context]), steps=length, gen_length=length, block_length=length,
                           cfg_scale=cfg)[0, len(context):].tolist()  # one token per step: greedy by construction
        changed = decoded[:-1] + [(decoded[-1] + 1) % model.config.vocab_size]
        pairs += [(context, decoded), (context, changed)]
    pairs += [demo._encode_pair(c, t) for c, t in (("The king", " is dead"), ("To be", ", or not to be"))]
    official = [official_suffix_greedy(model, list(c), list(t), cfg) for c, t in pairs]
    assert suffix_greedy(model, pairs, cfg_scale=cfg) == official
    assert official[0:10:2] == [True] * 5  # the constructed targets are greedy
    if cfg == 0:
        scores = LLaDAEvalModel((model, tokenizer), mc_num=2, batch_size=2).loglikelihood(
            [Request((tokenizer.decode(c), tokenizer.decode(t))) for c, t in pairs[-2:]])
        assert [greedy for _, greedy in scores] == official[-2:]


def test_unknown_and_misspelt_model_args_fail_loudly(checkpoint_dir: Path) -> None:
    for bad in ({"mc_nun": 4}, {"remasking_": "random"}, {"gen_lenght": 64}):
        with pytest.raises(ValueError, match=f"unknown llada model arg {next(iter(bad))}.*valid: pretrained"):
            LLaDAEvalModel(str(checkpoint_dir), device="cpu", **bad)
    with pytest.raises(ValueError, match="remasking must be one of low_confidence, random; got 'sometimes'"):
        LLaDAEvalModel(str(checkpoint_dir), device="cpu", remasking="sometimes")
    with pytest.raises(ValueError, match="batch_size=3 .* must divide mc_num=8"):
        LLaDAEvalModel(str(checkpoint_dir), device="cpu", mc_num=8, batch_size=3)
    with pytest.raises(ValueError, match="mask_id=126336 differs"):
        LLaDAEvalModel(str(checkpoint_dir), device="cpu", mask_id=126336)
    with pytest.raises(ValueError, match="pretrained=CHECKPOINT_DIR"):
        LLaDAEvalModel(device="cpu")
    with pytest.raises(ValueError, match="policy='threshold' needs sampler=engine"):
        LLaDAEvalModel(str(checkpoint_dir), device="cpu", policy="threshold")
    with pytest.raises(ValueError, match="dtype"):
        LLaDAEvalModel(str(checkpoint_dir), dtype="int3")
    with pytest.raises(ValueError, match="batch_size is set by lm-eval's --batch_size flag"):
        LLaDAEvalModel.create_from_arg_string(f"pretrained={checkpoint_dir},batch_size=4", {"batch_size": 1})


def test_the_official_model_arg_names_are_accepted(checkpoint_dir: Path) -> None:
    """eval_llada.py's args as its README passes them (model_path, cfg, is_check_greedy, mc_num, steps,
    gen_length, block_length, remasking) set what they say, and every generation setting is an arg."""
    model = LLaDAEvalModel(model_path=str(checkpoint_dir), device="cpu", cfg=0.5, is_check_greedy=False, mc_num=4,
                           batch_size="2", steps=8, gen_length=8, block_length=4, remasking="random",
                           logits_eos_inf="true", confidence_eos_eot_inf=True, early_stop=False)
    settings = model.settings
    assert (model.cfg_scale, settings.cfg_scale, model.is_check_greedy, model.mc_num, model.batch_size) == \
           (0.5, 0.5, False, 4, 2)
    assert (settings.steps, settings.gen_length, settings.block_length, settings.remasking) == (8, 8, 4, "random")
    assert settings.logits_eos_inf and settings.confidence_eos_eot_inf and not settings.early_stop
    assert model.sampler == "reference" and model.gen_batch_size == 1
    defaults = LLaDAEvalModel(str(checkpoint_dir), device="cpu")
    assert (defaults.settings.gen_length, defaults.settings.steps, defaults.settings.block_length) == (1024,) * 3
    assert defaults.is_check_greedy and defaults.mc_num == 128


def test_generation_is_the_reference_sampler_cleaned_as_officially(adapter: LLaDAEvalModel) -> None:
    """The default sampler decodes the whole answer (gen_length tokens, steps, blocks) like the official
    generate, then cuts at stop sequences and drops special tokens."""
    model, tokenizer = adapter.model, adapter.tokenizer
    prompt = tokenizer.encode("The fox")
    answer = generate(model, torch.tensor([prompt]), steps=8, gen_length=8, block_length=4)[0, len(prompt):]
    text = tokenizer.decode(answer.tolist(), skip_special_tokens=False)
    (output,) = adapter.generate_until([Request(("The fox", {"until": []}))])
    assert output == tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
    stop = output[1:3] if len(output) > 3 else None
    if stop:
        (cut,) = adapter.generate_until([Request(("The fox", {"until": [stop]}))])
        assert cut == output.split(stop)[0]


def test_gen_length_that_leaves_no_room_is_an_error(checkpoint_dir: Path) -> None:
    """gen_length >= max_length used to keep the whole prompt through a [-0:] slice."""
    model = LLaDAEvalModel(str(checkpoint_dir), device="cpu", max_length=16, gen_length=16, block_length=16, steps=16)
    with pytest.raises(ValueError, match="gen_length=16 leaves no room for a prompt within max_length=16"):
        model.generate_until([Request(("Hello", {"until": []}))])
    short = LLaDAEvalModel(str(checkpoint_dir), device="cpu", max_length=12, gen_length=8, block_length=4, steps=8,
                           sampler="engine", policy="fixed", cache="none")
    seen = []
    original = short.engine.generate
    short.engine.generate = lambda prompts, *a: seen.append(prompts) or original(prompts, *a)
    short.generate_until([Request(("The quick brown fox jumps over the lazy dog", {"until": []}))])
    assert len(seen[0][0]) == 4  # the prompt's last max_length - gen_length tokens


def test_engine_generation_and_rolling_scores(checkpoint_dir: Path) -> None:
    model = LLaDAEvalModel(str(checkpoint_dir), device="cpu", sampler="engine", policy="threshold", cache="dual",
                           gen_length=8, block_length=4, mc_num=4, batch_size=4)
    outputs = model.generate_until([Request(("Hello", {"until": ["\n"]})), Request(("The fox", {"until": []}))])
    assert len(outputs) == 2 and "\n" not in outputs[0]
    (score,) = model.loglikelihood_rolling([Request(("The fox jumps over the lazy dog.",))])
    assert score < 0


@pytest.mark.slow  # runs lm-eval end to end; .ci/run runs the slow tests too
def test_lm_eval_runs_the_shipped_tasks_offline(checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = simple_evaluate(model="llada", model_args={"pretrained": str(checkpoint_dir), "device": "cpu",
                                                         "mc_num": 4, "gen_length": 8, "block_length": 4,
                                                         "steps": 8},
                              tasks=["llada_arithmetic_mc", "llada_arithmetic", "llada_word_reversal_mc",
                                     "llada_word_reversal", "llada_counting_ppl"],
                              task_manager=TaskManager(include_path=str(TASKS_DIR)), limit=4)["results"]
    for task in ("llada_arithmetic_mc", "llada_word_reversal_mc"):
        assert 0.0 <= results[task]["acc,none"] <= 1.0 and results[task]["sample_len"] == 4
    for task in ("llada_arithmetic", "llada_word_reversal"):
        assert 0.0 <= results[task]["exact_match,strip"] <= 1.0
    assert results["llada_counting_ppl"]["word_perplexity,none"] > 1.0  # an untrained model is far from certain


def test_generated_task_data_is_right_and_deterministic() -> None:
    from llada.evaluation.tasks.generated import _questions, _reversals, counting

    for row in _reversals(50, seed=3):
        words = row["question"].split(": ", 1)[1].split()
        assert row["answer"].split() == words[::-1] and row["choices"][row["label"]] == row["answer"]
        assert len(set(row["choices"])) == 4 and all(sorted(c.split()) == sorted(words) for c in row["choices"])
    for row in _questions(50, seed=3):
        assert str(eval(row["question"].removeprefix("What is ").removesuffix("?"))) == row["answer"]
    assert _reversals(5, 1) == _reversals(5, 1) and counting(3)["test"]["text"] == counting(3)["test"]["text"]
    first = counting(1)["test"]["text"][0].split()
    assert [int(n) for n in first] == list(range(int(first[0]), int(first[0]) + len(first)))


@pytest.mark.slow  # runs lm-eval end to end; .ci/run runs the slow tests too
def test_llada_eval_keeps_the_shipped_tasks_next_to_a_users_include_path(checkpoint_dir: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "data.jsonl").write_text('{"question": "1 + 1 =", "choices": [" 2", " 3"], "label": 0}\n'
                                         '{"question": "2 + 2 =", "choices": [" 5", " 4"], "label": 1}\n')
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(
        f"task: my_sums\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: label\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "results"
    assert main(["eval", "--model", "llada", "--model_args", f"pretrained={checkpoint_dir},mc_num=2", "--device",
                 "cpu", "--tasks", "llada_arithmetic_mc,my_sums", "--limit", "2", "--include_path", str(tasks),
                 "--output_path", str(out)]) == 0
    (results,) = out.rglob("results_*.json")
    assert {"llada_arithmetic_mc", "my_sums"} <= set(results.read_text() and __import__("json").loads(
        results.read_text())["results"])


def _run_eval(checkpoint_dir: Path, out: Path, processes: int) -> dict:
    """``llada.evaluation.lm_eval_model`` over the shipped tasks in ``processes`` processes (torchrun, gloo); the
    per-sample responses and metrics written by the first process."""
    import json
    import os
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    command = launcher + ["-m", "llada.evaluation.lm_eval_model", "--model", "llada", "--model_args",
                          f"pretrained={checkpoint_dir},mc_num=4,gen_length=8,block_length=4,steps=8,seed=3",
                          "--batch_size", "4", "--device", "cpu", "--tasks",
                          "llada_arithmetic_mc,llada_arithmetic,llada_counting_ppl", "--limit", "5",
                          "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.split("samples_")[1].rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            record = json.loads(line)
            samples[(task, record["doc_id"])] = (record["resps"], record["filtered_resps"])
    (results,) = out.rglob("results_*.json")
    return {"samples": samples, "results": json.loads(results.read_text())["results"]}


@pytest.mark.slow  # runs lm-eval end to end; .ci/run runs the slow tests too
def test_two_processes_give_the_results_of_one(checkpoint_dir: Path, tmp_path: Path) -> None:
    """Data-parallel evaluation (2 CPU processes over gloo) merges to exactly the one-process results:
    every request's Monte-Carlo masks come from its own seed, whichever process scores it."""
    one = _run_eval(checkpoint_dir, tmp_path / "one", 1)
    two = _run_eval(checkpoint_dir, tmp_path / "two", 2)
    assert len(one["samples"]) == 15 and one["samples"] == two["samples"]
    assert one["results"] == two["results"]
