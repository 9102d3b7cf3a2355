"""The scaling report against known truth: results made from exact power laws give back their
compute multiplier, rates are chosen by validation loss, and accuracy lines cross where they should."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import numpy as np
import scaling_mdm_vs_ar as scaling
from inverse_prediction import where_line_reaches
from test_inverse_prediction import band_holds


def result(size: str, objective: str, lr: float, seed: int, test_loss: float, val_loss: float, accuracy: float) -> dict:
    return {"size": size, "objective": objective, "lr": lr, "seed": seed, "flops": scaling.BUDGETS[size],
            "epochs": 1.0, "non_embedding_parameters": 1, "test_loss": test_loss, "val_loss": val_loss,
            "choice": {"items": 1000, "accuracy": accuracy, "interval": [accuracy - 0.03, accuracy + 0.03]},
            "curve": [{"flops": scaling.BUDGETS[size] * f, "val_loss": val_loss / f ** 0.1} for f in (0.25, 0.5, 1.0)]}


def test_power_laws_give_back_their_compute_multiplier_and_crossing(tmp_path: Path) -> None:
    results = []
    for size, flops in scaling.BUDGETS.items():
        decade = math.log10(flops)
        # Diffusion: 10 C^-0.05; autoregressive: 8 C^-0.05, so diffusion needs (10/8)^(1/0.05) = 86.7x the compute.
        # Accuracy: diffusion 0.10 + 0.05 per decade, AR 0.30 + 0.02 per decade: equal at 10^(0.2/0.03).
        for lr, worse in ((1e-3, 0.0), (3e-3, 0.5)):  # the worse rate must never be chosen
            results.append(result(size, "pretrain", lr, 0, 10 * flops ** -0.05 + worse, 3.0 + worse,
                                  0.10 + 0.05 * decade - worse))
            results.append(result(size, "autoregressive", lr, 0, 8 * flops ** -0.05 + worse, 2.0 + worse,
                                  0.30 + 0.02 * decade - worse))
    summary = scaling.report(results)
    assert set(summary["lr_by_size"].values()) == {1e-3}
    assert summary["compute_multiplier"] == pytest.approx([1.25 ** 20] * 4, rel=1e-9)
    assert summary["compute_multiplier_range"] == pytest.approx([1.25 ** 20] * 2, rel=1e-9)
    # Points exactly on the law leave no scatter: the interval closes on the multiplier.
    assert summary["compute_multiplier_interval"] == [pytest.approx([1.25 ** 20] * 2, rel=1e-6)] * 4
    assert summary["power_law"]["pretrain"]["slope"] == pytest.approx(-0.05)
    assert summary["accuracy_crossing_flops"] == pytest.approx(10 ** (0.2 / 0.03), rel=1e-9)
    assert summary["accuracy_crossing_where"].startswith("below the smallest run")  # diffusion pulls ahead
    assert [c["flops"] for c in summary["accuracy_crossing_leave_one_out"]] == pytest.approx([10 ** (0.2 / 0.03)] * 4)
    scaling.plot(results, summary, tmp_path / "scaling.png", unigram=0.24)
    assert (tmp_path / "scaling.png").read_bytes().startswith(b"\x89PNG")


def test_a_crossing_is_placed_against_the_runs() -> None:
    runs = [3e15, 1e16, 1e17]
    assert scaling.where_in_runs(5e16, runs) == "within the runs"
    assert scaling.where_in_runs(3e15, runs) == scaling.where_in_runs(1e17, runs) == "within the runs"
    assert scaling.where_in_runs(1e18, runs).startswith("beyond the largest run")
    assert scaling.where_in_runs(1e15, runs).startswith("below the smallest run")
    assert scaling.where_in_runs(None, runs).startswith("parallel")
    assert scaling.accuracy_crossing((0.1, 0.02), (0.3, 0.02)) is None
    # 0.1 + 0.05 d = 0.9 + 0.0 d at d = 16: the diffusion line reaches the flat one at 1e16
    assert scaling.accuracy_crossing((0.1, 0.05), (0.9, 0.0)) == pytest.approx(1e16)


def crossing_by_hand(points: dict[str, dict[str, float]], sizes: list[str]) -> float:
    """The two least-squares lines of accuracy against log10(FLOPs), through numpy, and where they meet."""
    import numpy as np

    decades = [math.log10(scaling.BUDGETS[s]) for s in sizes]
    (b1, a1), (b2, a2) = (np.polyfit(decades, [points[o][s] for s in sizes], 1) for o in scaling.OBJECTIVES)
    return 10 ** ((a2 - a1) / (b1 - b2))


def test_crossings_leave_each_shared_size_out_and_ignore_a_size_one_objective_lacks() -> None:
    accuracy = {"pretrain": {"xs": 0.40, "s": 0.47, "m": 0.50, "l": 0.58},
                "autoregressive": {"xs": 0.60, "s": 0.62, "m": 0.66, "l": 0.67}}
    results = [result(size, objective, 1e-3, 0, 3.0, 2.0, accuracy[objective][size])
               for objective in scaling.OBJECTIVES for size in scaling.BUDGETS]
    summary = scaling.report(results)
    assert summary["compute_multiplier"] == [None] * 4  # a flat diffusion loss never reaches the other's
    sizes = list(scaling.BUDGETS)
    assert summary["accuracy_crossing_flops"] == pytest.approx(crossing_by_hand(accuracy, sizes), rel=1e-9)
    assert summary["accuracy_crossing_where"].startswith("beyond the largest run")  # diffusion catches up
    for left_out in summary["accuracy_crossing_leave_one_out"]:
        kept = [s for s in sizes if s != left_out["left_out"]]
        assert left_out["flops"] == pytest.approx(crossing_by_hand(accuracy, kept), rel=1e-9)
        assert left_out["where"] == scaling.where_in_runs(left_out["flops"], [scaling.BUDGETS[s] for s in kept])
        assert set(left_out) == {"left_out", "flops", "where"}
    assert [c["left_out"] for c in summary["accuracy_crossing_leave_one_out"]] == sizes

    without = [r for r in results if not (r["objective"] == "autoregressive" and r["size"] == "l")]
    summary = scaling.report(without)
    assert summary["accuracy_sizes"] == ["xs", "s", "m"]  # l has no autoregressive twin: left out of both lines
    assert summary["accuracy_crossing_flops"] == pytest.approx(crossing_by_hand(accuracy, ["xs", "s", "m"]), rel=1e-9)
    assert summary["accuracy_crossing_where"] == scaling.where_in_runs(
        summary["accuracy_crossing_flops"], [scaling.BUDGETS[s] for s in ("xs", "s", "m")])
    assert len(summary["accuracy_crossing_leave_one_out"]) == 3


def test_nearly_parallel_accuracy_lines_have_no_crossing() -> None:
    assert scaling.accuracy_crossing((0.1, 0.0501), (0.3, 0.05)) is None  # 10**2000: no float, no study
    assert scaling.where_in_runs(scaling.accuracy_crossing((0.1, 0.0501), (0.3, 0.05)), [1e15]).startswith("parallel")


def by_hand(diffusion: str, autoregressive: str) -> tuple[float, float]:
    return by_hand_numbers([int(a) for a in diffusion], [int(b) for b in autoregressive])


def by_hand_numbers(old: list[float], new: list[float]) -> tuple[float, float]:
    differences = [b - a for a, b in zip(old, new)]
    mean = sum(differences) / len(differences)
    return mean, math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1) / len(differences))


def test_accuracy_differences_are_paired_on_the_same_items() -> None:
    """Autoregressive minus diffusion per item, by hand, per size (smallest first) and seed where both
    objectives kept their outcomes; a size where only one did, or a seed only one has, gives no pair."""
    outcomes = {("m", "pretrain", 0): "1100101100", ("m", "autoregressive", 0): "1110111101",
                ("m", "pretrain", 1): "0000011111", ("m", "autoregressive", 1): "1000111111",
                ("xs", "pretrain", 0): "0101010101", ("xs", "autoregressive", 0): "1111010101",
                ("s", "pretrain", 0): "1111100000"}  # s: the autoregressive run predates per-item outcomes
    results = []
    for size, objective, seed in [*outcomes, ("s", "autoregressive", 0), ("xs", "autoregressive", 2)]:
        per_item = outcomes.get((size, objective, seed))
        run = result(size, objective, 1e-3, seed, 3.0, 2.0, per_item.count("1") / 10 if per_item else 0.5)
        if per_item:
            run["choice"]["per_item"] = per_item
        results.append(run)
    pairs = scaling.report(results)["paired_accuracy_differences"]
    assert [(p["size"], p["seed"]) for p in pairs] == [("xs", 0), ("m", 0), ("m", 1)]
    for pair in pairs:
        mean, stderr = by_hand(outcomes[pair["size"], "pretrain", pair["seed"]],
                               outcomes[pair["size"], "autoregressive", pair["seed"]])
        assert (pair["difference"], pair["stderr"]) == (pytest.approx(mean), pytest.approx(stderr))
    assert pairs[1]["difference"] == pytest.approx(0.3)  # 3 items gained, none lost
    assert pairs[1]["stderr"] == pytest.approx(math.sqrt(0.3 * 0.7 * 10 / 9 / 10))


def test_no_compute_multiplier_where_the_diffusion_fit_does_not_fall() -> None:
    rising = [(3e15, 3.0), (1e16, 3.1)]
    assert scaling.compute_multiplier(rising, [(3e15, 2.0)]) == [None]
    # falling, but so slowly that the multiplier passes any float: None, not an overflow
    assert scaling.compute_multiplier([(3e15, 3.0), (1e16, 2.9999)], [(3e15, 1.0)]) == [None]
    assert scaling.compute_multiplier([(1e15, 4.0), (1e16, 2.0)], [(1e15, 2.0)]) == [pytest.approx(10.0)]


def test_seeds_are_averaged_within_the_chosen_rate() -> None:
    results = [result("xs", "pretrain", 1e-3, seed, 5.0 + seed, 3.0, 0.4 + 0.1 * seed) for seed in (0, 1)]
    row = scaling.report(results)["rows"][0]
    assert row["seeds"] == [0, 1] and row["test_loss"] == pytest.approx(5.5) and row["accuracy"] == pytest.approx(0.45)
    assert row["test_loss_sd"] == pytest.approx(math.sqrt(0.5))


def test_choice_scores_are_the_exact_likelihoods() -> None:
    """Causal: the sum of next-token log-probabilities, token by token. Diffusion with a one-token
    answer: the ELBO masks that token alone, so it is exactly log p(token | context), whatever the draws."""
    import torch
    from conftest import tiny_model

    model = tiny_model()
    mask = model.config.mask_token_id
    item = {"context": [5, 17, 42, 9], "choices": [[7, 3], [100, 200], [11, 12], [64, 65]]}
    scores = scaling.choice_scores(model, item, autoregressive=True, mc_num=4, generator=torch.Generator())
    for choice, score in zip(item["choices"], scores):
        expected = 0.0
        for i, token in enumerate(choice):
            prefix = torch.tensor([item["context"] + choice[:i]])
            expected += model(prefix, causal=True).logits[0, -1].log_softmax(-1)[token].item()
        assert score == pytest.approx(expected, abs=1e-5)  # scored in float32
    single = {"context": item["context"], "choices": [[7], [100], [11], [64]]}
    scores = scaling.choice_scores(model, single, autoregressive=False, mc_num=4, generator=torch.Generator())
    with torch.no_grad():
        log_probs = model(torch.tensor([item["context"] + [mask]])).logits[0, -1].log_softmax(-1)
    assert scores == pytest.approx([log_probs[c[0]].item() for c in single["choices"]], abs=1e-9)


def test_diffusion_choice_scores_are_the_monte_carlo_elbo_of_each_choice() -> None:
    """Several-token choices: the scores are log_likelihood's estimates (mc_num samples in one batch)
    of each choice in turn, with the same random draws."""
    import torch
    from conftest import tiny_model

    from llada.diffusion.likelihood import log_likelihood

    model = tiny_model()
    item = {"context": [5, 17, 42, 9], "choices": [[7, 3, 8], [100, 200, 5], [11, 12, 13], [64, 65, 66]]}
    scores = scaling.choice_scores(model, item, autoregressive=False, mc_num=8,
                                   generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    expected = [log_likelihood(model, torch.tensor(item["context"]), torch.tensor(choice), mc_num=8, batch_size=8,
                               generator=generator).log_likelihood for choice in item["choices"]]
    assert scores == pytest.approx(expected, rel=1e-5)
    assert len(set(scores)) == 4


def test_a_diverged_rate_is_never_chosen_and_a_chosen_rate_at_the_sweep_edge_is_named() -> None:
    results = [result("xs", "pretrain", 1e-3, 0, 5.0, math.nan, 0.4),  # diverged, listed first
               result("xs", "pretrain", 3e-3, 0, 6.0, 3.0, 0.3),
               result("xs", "autoregressive", 1e-3, 0, 5.0, 2.5, 0.4),
               result("xs", "autoregressive", 2e-3, 0, 5.0, 2.0, 0.4),
               result("xs", "autoregressive", 3e-3, 0, 5.0, 2.2, 0.4)]
    summary = scaling.report(results)
    assert summary["lr_by_size"] == {"xs/pretrain": 3e-3, "xs/autoregressive": 2e-3}
    assert summary["rate_at_edge_of_sweep"] == ["xs/pretrain: 0.003 of [0.001, 0.003]"]


def test_rollbacks_are_counted_from_the_skipped_steps_that_record_them(tmp_path: Path) -> None:
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1e9, "skipped": True},
               {"step": 2, "loss": 1e9, "skipped": True, "rollback": True}, {"step": 2, "loss": 2.9},
               {"step": 3, "loss": 1e9, "skipped": True, "rollback": True}, {"step": 3, "loss": 2.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert scaling.rollbacks(tmp_path) == 2


def test_a_sweep_refuses_finished_results_of_other_settings_or_data(tmp_path: Path) -> None:
    from argparse import Namespace

    manifest, items = {"train_documents_sha256": "ab" * 32}, "12" * 32
    finished = {"batch_size": 64, "seq_len": 512, "mc_num": 32, "data": {**manifest, "choices_sha256": items}}
    (tmp_path / "xs-pretrain-lr0.001-seed0.json").write_text(json.dumps(finished))
    older = {"batch_size": 64, "seq_len": 512, "mc_num": 32, "data": dict(manifest)}  # before items were recorded
    (tmp_path / "s-pretrain-lr0.001-seed0.json").write_text(json.dumps(older))
    (tmp_path / "report.json").write_text("{}")
    settings = Namespace(batch_size=64, seq_len=512, mc_num=32)
    scaling.check_finished_runs(tmp_path, manifest, items, settings)
    with pytest.raises(SystemExit, match="batch_size"):
        scaling.check_finished_runs(tmp_path, manifest, items, Namespace(batch_size=32, seq_len=512, mc_num=32))
    with pytest.raises(SystemExit, match="train_documents_sha256"):
        scaling.check_finished_runs(tmp_path, {"train_documents_sha256": "cd" * 32}, items, settings)
    with pytest.raises(SystemExit, match="choices_sha256"):
        scaling.check_finished_runs(tmp_path, manifest, "34" * 32, settings)


def test_runs_that_diverged_are_reported_and_their_rate_is_never_chosen() -> None:
    diverged = {"size": "xs", "objective": "pretrain", "lr": 1e-2, "seed": 1, "val_loss": None,
                "diverged": "3 bad steps in a row and no checkpoint to roll back to"}
    results = [result("xs", "pretrain", 3e-3, 0, 5.0, 3.1, 0.4), result("xs", "pretrain", 1e-2, 0, 4.0, 2.0, 0.5),
               diverged, {**diverged, "objective": "autoregressive", "lr": 3e-3, "seed": 0}]
    summary = scaling.report(results)
    assert summary["lr_by_size"] == {"xs/pretrain": 3e-3}  # 1e-2 lost a seed; every AR rate diverged: no row
    assert [row["objective"] for row in summary["rows"]] == ["pretrain"]
    assert summary["diverged_runs"] == ["xs/autoregressive lr 0.003 seed 0", "xs/pretrain lr 0.01 seed 1"]
    assert summary["rate_at_edge_of_sweep"] == ["xs/pretrain: 0.003 of [0.003, 0.01]"]


def test_the_rate_optimum_is_the_minimum_of_the_parabola_through_the_chosen_rate_and_its_neighbours() -> None:
    """Validation losses from an exact parabola in log10(rate), minimum at 10^-2.8, on an uneven grid:
    the estimate gives it back. A rate chosen at the sweep's edge has no estimate, and points that
    do not curve upwards (a line, a dip) give None rather than a maximum."""
    def loss(lr: float) -> float:
        return 2.0 + 0.3 * (math.log10(lr) + 2.8) ** 2

    grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    results = [result("s", "autoregressive", lr, seed, 2.0, loss(lr) + noise, 0.5)
               for lr in grid for seed, noise in ((0, 0.01), (1, -0.01))]  # seeds average back to the parabola
    results += [result("s", "pretrain", lr, 0, 3.0, 3.0 + lr, 0.5) for lr in grid]  # lowest rate best: an edge
    summary = scaling.report(results)
    assert summary["rate_optimum_estimates"] == {"s/autoregressive": pytest.approx(10 ** -2.8, rel=1e-9)}
    assert scaling.parabola_minimum([(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]) is None
    assert scaling.parabola_minimum([(0.0, 1.0), (1.0, 2.0), (2.0, 1.0)]) is None
    assert scaling.parabola_minimum([(0.0, math.inf), (1.0, 2.0), (2.0, 3.0)]) is None


def test_the_loss_ratio_is_given_for_each_size_both_objectives_have() -> None:
    """Diffusion over autoregressive test loss, for xs only: s has no autoregressive run."""
    results = [result("xs", "pretrain", 1e-3, 0, 3.0, 3.0, 0.5), result("xs", "autoregressive", 1e-3, 0, 2.0, 2.0, 0.6),
               result("s", "pretrain", 1e-3, 0, 2.7, 2.7, 0.5)]
    assert scaling.report(results)["loss_ratio_by_size"] == {"xs": pytest.approx(1.5)}


def test_the_crossing_interval_closes_on_the_crossing_as_the_items_grow_and_is_unbounded_for_a_flat_gap() -> None:
    """Accuracy lines meeting at 10^16.5 FLOPs: with a huge item count the binomial errors vanish and
    the interval closes on it; with 1,000 items and a gap that hardly moves, it is unbounded (None)."""
    def results_with(gap_slope: float, items: int) -> list[dict]:
        made = []
        for size, flops in scaling.BUDGETS.items():
            decade = math.log10(flops)
            made.append(result(size, "pretrain", 1e-3, 0, 3.0, 3.0, 0.6))
            made.append(result(size, "autoregressive", 1e-3, 0, 2.0, 2.0, 0.6 + gap_slope * (16.5 - decade)))
        for r in made:
            r["choice"]["items"] = items
        return made

    summary = scaling.report(results_with(0.05, 10 ** 12))
    assert summary["accuracy_crossing_flops"] == pytest.approx(10 ** 16.5, rel=1e-6)
    assert summary["accuracy_crossing_interval"] == pytest.approx([10 ** 16.5] * 2, rel=1e-3)
    assert scaling.report(results_with(0.002, 1000))["accuracy_crossing_interval"] is None


def test_the_crossing_set_uses_each_gaps_binomial_error_and_survives_ends_beyond_any_float() -> None:
    """The gap's error is the two accuracies' binomial errors combined; an interval end past 1e300
    FLOPs is None instead of an overflow; an unbounded set gives the range it excludes."""
    def rows_with(items: int) -> list[dict]:
        accuracies = {"xs": (0.669, 0.834), "s": (0.710, 0.878), "m": (0.759, 0.900)}  # the study's three sizes
        return [{"size": size, "objective": objective, "flops": scaling.BUDGETS[size], "items": items,
                 "accuracy": accuracies[size][objective == "autoregressive"]}
                for size in accuracies for objective in scaling.OBJECTIVES]

    sizes = ["xs", "s", "m"]
    for items in (20000, 5000, 4500, 2000):
        found = scaling.crossing_interval(rows_with(items), sizes)
        errors = [math.sqrt(d * (1 - d) / items + a * (1 - a) / items)
                  for d, a in ((0.669, 0.834), (0.710, 0.878), (0.759, 0.900))]
        reach = where_line_reaches([math.log10(scaling.BUDGETS[s]) for s in sizes],
                                   [0.834 - 0.669, 0.878 - 0.710, 0.900 - 0.759], 0.0, errors)
        if reach.interval is not None:
            assert found["crossing_excluded"] is None
            low, high = found["crossing_interval"]
            assert low == pytest.approx(10 ** reach.interval[0], rel=1e-9)
            assert high == (pytest.approx(10 ** reach.interval[1], rel=1e-9) if reach.interval[1] < 300 else None)
        else:
            assert found["crossing_interval"] is None
            assert found["crossing_excluded"] == pytest.approx([10 ** e for e in reach.excluded], rel=1e-9)
    assert scaling.crossing_interval(rows_with(4500), sizes)["crossing_interval"][1] is None
    assert scaling.crossing_interval(rows_with(2000), sizes)["crossing_interval"] is None


def test_logit_lines_find_a_crossing_that_straight_lines_in_points_misplace() -> None:
    """Accuracies made from two straight lines in log odds (equal at 10^18 FLOPs, a million items so
    the empirical logit's half-item correction is negligible) give that crossing back on the logit
    scale, with an interval around it, while lines in points, bent by the ceiling, put it elsewhere."""
    def logistic(value: float) -> float:
        return 1 / (1 + math.exp(-value))

    results = []
    for size, flops in scaling.BUDGETS.items():
        decade = math.log10(flops)
        results.append(result(size, "pretrain", 1e-3, 0, 3.0, 3.0, logistic(-6.0 + 0.5 * decade)))
        results.append(result(size, "autoregressive", 1e-3, 0, 2.0, 2.0, logistic(3.0 + 0.0 * decade)))
    for r in results:
        r["choice"]["items"] = 10 ** 6
    summary = scaling.report(results)
    lines = summary["accuracy_logit_lines"]
    assert lines["pretrain"]["slope_per_decade"] == pytest.approx(0.5, rel=1e-4)
    assert lines["autoregressive"]["intercept"] == pytest.approx(3.0, rel=1e-4)
    assert summary["accuracy_logit_crossing_flops"] == pytest.approx(1e18, rel=1e-3)
    assert summary["accuracy_logit_crossing_where"].startswith("beyond the largest run")
    low, high = summary["accuracy_logit_crossing_interval"]
    assert 1e17 < low < 1e18 < high < 1e19
    assert [c["flops"] for c in summary["accuracy_logit_crossing_leave_one_out"]] == pytest.approx([1e18] * 4, rel=1e-3)
    assert not 0.5e18 < summary["accuracy_crossing_flops"] < 2e18  # the points' lines miss it
    gap = summary["accuracy_gap_by_size"]["xs"]
    assert gap["logit"]["gap"] == pytest.approx(3.0 - (-6.0 + 0.5 * math.log10(3e15)), rel=1e-4)
    assert gap["points"]["gap"] == pytest.approx(logistic(3.0) - logistic(-6.0 + 0.5 * math.log10(3e15)), rel=1e-9)


def test_the_logit_scale_is_finite_at_the_ends_and_its_error_is_the_empirical_logits() -> None:
    """0% and 100% get finite logits (the half-item correction); the standard error shrinks as items
    grow like the delta method's 1 / sqrt(n p (1 - p)); an unknown scale is refused by name."""
    for accuracy in (0.0, 1.0):
        value, error = scaling.on_scale({"accuracy": accuracy, "items": 100}, "logit")
        assert math.isfinite(value) and math.isfinite(error)
        assert abs(value) == pytest.approx(math.log(100.5 / 0.5))
    value, error = scaling.on_scale({"accuracy": 0.8, "items": 10 ** 8}, "logit")
    assert value == pytest.approx(math.log(4), rel=1e-6)
    assert error == pytest.approx(1 / math.sqrt(10 ** 8 * 0.8 * 0.2), rel=1e-6)
    assert scaling.on_scale({"accuracy": 0.8, "items": 100}, "points") == pytest.approx((0.8, 0.04))
    with pytest.raises(ValueError, match="probit"):
        scaling.on_scale({"accuracy": 0.8, "items": 100}, "probit")


def test_no_multiplier_set_where_the_diffusion_loss_rises_with_compute_or_two_sizes_leave_no_scatter() -> None:
    """A rising fit has no multiplier, so no set; two points fit any line exactly, so none either."""
    rising = [(1e15, 3.0), (1e16, 3.1005), (1e17, 3.2)]
    assert scaling.compute_multiplier(rising, [(1e16, 2.0)]) == [None]
    assert scaling.multiplier_sets(rising, [(1e16, 2.0)]) == {"compute_multiplier_interval": [None],
                                                               "compute_multiplier_excluded": [None]}
    assert scaling.multiplier_sets(rising[:2][::-1], [(1e16, 2.0)])["compute_multiplier_interval"] == [None]


@pytest.mark.parametrize("middle_loss", [3.25, 3.30, 3.40])
def test_the_multiplier_set_is_where_the_diffusion_fits_band_reaches_each_autoregressive_loss(
        middle_loss: float) -> None:
    """Scattered diffusion points (the middle one moved): the set, in ln FLOPs, is the grid points where
    the fit's 95% band (a matrix-form second implementation) holds ln of the autoregressive loss,
    shifted by ln of its FLOPs. Scatter from bounded to unbounded sets."""
    diffusion = [(3e15, 3.517), (1e16, middle_loss), (3e16, 2.966)]
    autoregressive = [(3e15, 2.298), (3e16, 1.930)]
    sets = scaling.multiplier_sets(diffusion, autoregressive)
    x = [math.log(c) for c, _ in diffusion]
    y = [math.log(v) for _, v in diffusion]
    grid = np.linspace(20.0, 120.0, 400001)
    step = grid[1] - grid[0]
    for i, (flops, loss) in enumerate(autoregressive):
        holds = grid[band_holds(x, y, math.log(loss), None, grid)] - math.log(flops)
        interval, excluded = sets["compute_multiplier_interval"][i], sets["compute_multiplier_excluded"][i]
        if interval is not None:
            assert math.log(interval[0]) == pytest.approx(holds.min(), abs=2 * step)
            assert math.log(interval[1]) == pytest.approx(holds.max(), abs=2 * step)
        elif excluded is not None:
            gap = np.diff(holds).argmax()  # the excluded range lies between the two half-lines
            assert math.log(excluded[0]) == pytest.approx(holds[gap], abs=2 * step)
            assert math.log(excluded[1]) == pytest.approx(holds[gap + 1], abs=2 * step)
        else:
            assert len(holds) == len(grid)


def test_a_report_refuses_runs_scored_on_different_items() -> None:
    """Runs whose recorded item fingerprints differ are named; a run from before fingerprints is let in."""
    runs = [result("xs", "pretrain", 1e-3, 0, 3.0, 3.0, 0.5), result("xs", "autoregressive", 1e-3, 0, 2.0, 2.0, 0.6),
            result("s", "pretrain", 1e-3, 0, 2.8, 2.8, 0.55)]
    runs[0]["data"] = {"choices_sha256": "ab" * 32}
    runs[1]["data"] = {"choices_sha256": "ab" * 32}
    scaling.report(runs)
    runs[2]["data"] = {"choices_sha256": "cd" * 32}
    with pytest.raises(ValueError, match="different choice items.*s/pretrain lr 0.001 seed 0"):
        scaling.report(runs)


def test_the_change_of_the_accuracy_gap_between_sizes_is_paired_item_by_item() -> None:
    """Per item, (autoregressive - diffusion) at the larger size minus at the smaller, each objective's
    outcomes averaged over its seeds; computed here from the definition. A size with a run lacking
    per-item outcomes drops out, and the next size is compared with the last one that has them."""
    outcomes = {("xs", "pretrain", 0): "0000011111", ("xs", "pretrain", 1): "0000111111",
                ("xs", "autoregressive", 0): "1111111111",
                ("m", "pretrain", 0): "0011111111", ("m", "autoregressive", 0): "1111111110",
                ("m", "autoregressive", 1): "1111111111",
                ("s", "pretrain", 0): "1111100000"}  # s: its autoregressive run predates per-item outcomes
    results = []
    for size, objective, seed in [*outcomes, ("s", "autoregressive", 0)]:
        per_item = outcomes.get((size, objective, seed))
        run = result(size, objective, 1e-3, seed, 3.0, 2.0, per_item.count("1") / 10 if per_item else 0.5)
        if per_item:
            run["choice"]["per_item"] = per_item
        results.append(run)
    [change] = scaling.report(results)["paired_gap_changes"]

    def mean_outcomes(size: str, objective: str) -> list[float]:
        texts = [t for (s, o, _), t in outcomes.items() if (s, o) == (size, objective)]
        return [sum(t[i] == "1" for t in texts) / len(texts) for i in range(10)]

    gap = {size: [a - d for d, a in zip(mean_outcomes(size, "pretrain"), mean_outcomes(size, "autoregressive"))]
           for size in ("xs", "m")}
    mean, stderr = by_hand_numbers(gap["xs"], gap["m"])
    assert (change["from"], change["to"]) == ("xs", "m")
    assert (change["change"], change["stderr"]) == (pytest.approx(mean), pytest.approx(stderr))
    # Gaps by item: xs 1,1,1,1,.5,0,0,0,0,0 and m 1,1,0,0,0,0,0,0,0,-.5: three items' worth narrower.
    assert change["change"] == pytest.approx(-0.3)
