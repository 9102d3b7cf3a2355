"""The objectives table: one entry per objective the config accepts, each computing the paper's loss
function for its kind of batch (checked against calling the loss functions directly)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from conftest import tiny_model

from llada.diffusion.losses import answer_positions, autoregressive_loss, pretrain_loss, random_truncation, sft_loss
from llada.diffusion.preference import PLAIN_DPO, VarianceReduction, preference_loss
from llada.training.config import Objective
from llada.training.objectives import OBJECTIVES, LossSettings
from llada.training.preference_data import collate_preference

PREFERENCE = ("dpo", "vrpo")
PREPARED = ("grpo",)  # losses over prepared rollouts: tests/training/test_grpo.py


def test_every_configurable_objective_has_an_entry() -> None:
    assert set(OBJECTIVES) == set(get_args(Objective))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - set(PREFERENCE) - set(PREPARED)))
def test_table_losses_equal_the_loss_functions(name: str, training: bool) -> None:
    model = tiny_model()
    mask_id = model.config.mask_token_id
    settings = LossSettings(mask_id=mask_id, eps=1e-3, random_length_probability=1.0, training=training)
    ids = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    objective = OBJECTIVES[name]
    if objective.chat:
        samples = [(ids[0, :9], 4), (ids[1, :12], 5), (ids[2, :6], 2)]
        batch = objective.collate(samples, 7)
        assert batch["input_ids"].shape == (3, 12) and batch["prompt_lengths"].tolist() == [4, 5, 2]
        assert (batch["input_ids"][2, 6:] == 7).all()  # EOS padding belongs to the answer
    else:
        batch = objective.collate(list(ids), 7)
        assert torch.equal(batch["input_ids"], ids)
    got = objective.loss(model, batch, settings, torch.Generator().manual_seed(5)).value
    generator = torch.Generator().manual_seed(5)
    tokens = batch["input_ids"]
    if name == "pretrain":
        tokens = random_truncation(tokens, 1.0, generator=generator) if training else tokens
        expected = pretrain_loss(model, tokens, mask_id, eps=1e-3, generator=generator)
    elif name == "sft":
        expected = sft_loss(model, tokens, batch["prompt_lengths"], mask_id, eps=1e-3, generator=generator)
    elif name == "autoregressive":
        expected = autoregressive_loss(model, tokens)
    else:
        expected = autoregressive_loss(model, tokens, loss_mask=answer_positions(tokens, batch["prompt_lengths"]))
    assert torch.equal(got, expected.value)
    assert objective.causal == name.startswith("autoregressive")


@pytest.mark.parametrize("name", PREFERENCE)
def test_preference_entries_are_dpo_over_elbo_estimates(name: str) -> None:
    """dpo is one independent draw per estimate; vrpo takes the recipe's reductions. Both read the
    pairs back out of the padded batch, and refuse to run without a reference."""
    policy, reference = tiny_model(), tiny_model(init_std=0.05)
    mask_id = policy.config.mask_token_id
    generator = torch.Generator().manual_seed(2)
    triples = [tuple(torch.randint(0, 300, (n,), generator=generator) for n in lengths)
               for lengths in ((4, 3, 5), (6, 2, 2))]
    batch = OBJECTIVES[name].collate(triples, 7)
    assert collate_preference(triples, 7)["input_ids"].shape == (2, 12)
    assert batch["input_ids"][1, 10:].tolist() == [7, 7]  # padding, never scored
    reduction = VarianceReduction(budget=4, masks_per_count=2, antithetic=True)
    settings = LossSettings(mask_id=mask_id, eps=1e-3, random_length_probability=0.0, training=True,
                            reference=reference, beta=0.3, reduction=reduction)
    got = OBJECTIVES[name].loss(policy, batch, settings, torch.Generator().manual_seed(5))
    expected = preference_loss(policy, reference, triples, 0.3, PLAIN_DPO if name == "dpo" else reduction, mask_id,
                               torch.Generator().manual_seed(5))
    assert torch.equal(got.value, expected.value)
    assert got.metrics["reward_accuracy"] == expected.accuracy
    assert got.metrics["reward_margin"] == pytest.approx(float(expected.margins.mean()))
    assert OBJECTIVES[name].needs_reference and OBJECTIVES[name].chat
    with pytest.raises(ValueError, match="reference"):
        OBJECTIVES[name].loss(policy, batch, LossSettings(mask_id=mask_id, eps=1e-3, random_length_probability=0.0,
                                                         training=True), torch.Generator())
