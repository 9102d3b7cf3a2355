"""The lm-eval model: exact scores where they are exact, and lm-eval run end to end offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'llada[eval]')")

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from llada.cli import main
from llada.lm_eval_model import TASKS_DIR, LLaDAEvalModel, _cut


@dataclass
class Request:  # what lm-eval hands a model: an object with .args
    args: tuple


@pytest.fixture(scope="module")
def adapter(checkpoint_dir: Path) -> LLaDAEvalModel:
    return LLaDAEvalModel(str(checkpoint_dir), device="cpu", mc_num=8, mc_batch_size=4, batch_size=2, gen_length=8,
                          block_length=4)


def test_one_token_continuations_are_scored_exactly(adapter: LLaDAEvalModel) -> None:
    context, continuation = adapter._encode_pair("The quick brown", " fox")
    assert len(continuation) == 1
    masked = torch.tensor([context + [adapter.model.config.mask_token_id]])
    with torch.no_grad():
        expected = F.log_softmax(adapter.model(masked).logits[0, -1].double(), -1)[continuation[0]].item()
    (score, greedy), = adapter.loglikelihood([Request(("The quick brown ", "fox"))])  # space moves over
    assert score == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        argmax = adapter.model(masked).logits[0, -1].argmax().item()
    assert greedy == (argmax == continuation[0])


def test_one_token_requests_share_forward_passes_and_match_single_scoring(adapter: LLaDAEvalModel) -> None:
    candidates = [("The quick brown", " fox"), ("A", " the"), ("Numbers: 1 2", " 3"), ("To be, or not", " to"),
                  ("In the", " beginning")]
    singles = [Request(pair) for pair in candidates if len(adapter._encode_pair(*pair)[1]) == 1]
    assert len(singles) >= 3  # contexts of different lengths: one left-padded batch
    requests = singles + [Request(("The fox", " jumps over the lazy dog"))]  # several tokens: Monte Carlo
    together = adapter.loglikelihood(requests)
    for request, (score, greedy) in zip(singles, together):
        context, continuation = adapter._encode_pair(*request.args)
        (alone, alone_greedy), = adapter._score_single_tokens([(context, continuation)])
        assert score == pytest.approx(alone, rel=1e-5, abs=1e-5) and greedy == alone_greedy
    assert together[-1][0] < 0


def test_multi_token_requests_share_passes_without_changing_scores(checkpoint_dir: Path) -> None:
    """Packing several requests' Monte-Carlo samples into one pass (mc_batch_size 4 x mc_num) gives the
    scores and greedy flags of one request per pass: the same masks, fewer forward passes."""
    requests = [Request(pair) for pair in (("The fox", " jumps over the lazy dog"), ("A", " quick brown fox"),
                                           ("Numbers: 1 2 3", " 4 5 6 7"), ("To be", ", or not to be"))]
    one, packed = (LLaDAEvalModel(str(checkpoint_dir), device="cpu", mc_num=4, mc_batch_size=size, seed=7)
                   for size in (4, 16))
    calls = []
    packed.model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    alone = one.loglikelihood(requests)
    together = packed.loglikelihood(requests)
    assert calls == [16, 4]  # one ELBO pass of 4 x 4 samples, one greedy pass of 4 rows
    for (score, greedy), (expected, expected_greedy) in zip(together, alone):
        assert score == pytest.approx(expected, rel=1e-5, abs=1e-5) and greedy == expected_greedy


def test_a_continuation_longer_than_max_length_is_named(checkpoint_dir: Path) -> None:
    short = LLaDAEvalModel(str(checkpoint_dir), device="cpu", mc_num=4, max_length=4)
    with pytest.raises(ValueError, match="request 1: .* max_length=4"):
        short.loglikelihood([Request(("A", " b")), Request(("A", " the quick brown fox jumps over"))])


def test_rolling_scores_sum_windows_and_generation_cuts_at_stops(adapter: LLaDAEvalModel) -> None:
    (score,) = adapter.loglikelihood_rolling([Request(("The fox jumps over the lazy dog.",))])
    assert score < 0
    outputs = adapter.generate_until([Request(("Hello", {"until": ["\n"], "max_gen_toks": 6})),
                                      Request(("The fox", {"until": [], "max_gen_toks": 3}))])
    assert len(outputs) == 2 and all("\n" not in o for o in outputs[:1])
    assert _cut("12 apples\nand more", ["\n", "and"]) == "12 apples"


def test_lm_eval_runs_the_shipped_tasks_offline(checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = simple_evaluate(model="llada", model_args={"pretrained": str(checkpoint_dir), "device": "cpu",
                                                         "mc_num": 4, "gen_length": 8, "block_length": 4},
                              tasks=["llada_arithmetic_mc", "llada_arithmetic", "llada_word_reversal_mc",
                                     "llada_word_reversal", "llada_counting_ppl"],
                              task_manager=TaskManager(include_path=str(TASKS_DIR)), limit=4)["results"]
    for task in ("llada_arithmetic_mc", "llada_word_reversal_mc"):
        assert 0.0 <= results[task]["acc,none"] <= 1.0 and results[task]["sample_len"] == 4
    for task in ("llada_arithmetic", "llada_word_reversal"):
        assert 0.0 <= results[task]["exact_match,strip"] <= 1.0
    assert results["llada_counting_ppl"]["word_perplexity,none"] > 1.0  # an untrained model is far from certain


def test_generated_task_data_is_right_and_deterministic() -> None:
    from llada.eval_tasks.generated import _questions, _reversals, counting

    for row in _reversals(50, seed=3):
        words = row["question"].split(": ", 1)[1].split()
        assert row["answer"].split() == words[::-1] and row["choices"][row["label"]] == row["answer"]
        assert len(set(row["choices"])) == 4 and all(sorted(c.split()) == sorted(words) for c in row["choices"])
    for row in _questions(50, seed=3):
        assert str(eval(row["question"].removeprefix("What is ").removesuffix("?"))) == row["answer"]
    assert _reversals(5, 1) == _reversals(5, 1) and counting(3)["test"]["text"] == counting(3)["test"]["text"]
    first = counting(1)["test"]["text"][0].split()
    assert [int(n) for n in first] == list(range(int(first[0]), int(first[0]) + len(first)))


def test_llada_eval_is_lm_evals_command_line(checkpoint_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "results"
    assert main(["eval", "--model", "llada", "--model_args", f"pretrained={checkpoint_dir},mc_num=2", "--device", "cpu",
                 "--tasks", "llada_arithmetic_mc", "--limit", "2", "--output_path", str(out)]) == 0
    assert list(out.rglob("results_*.json"))
    with pytest.raises(ValueError, match="dtype"):
        LLaDAEvalModel(str(checkpoint_dir), dtype="int3")
