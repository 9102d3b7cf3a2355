"""Deterministic (batch-invariant) mode on the CPU: a row computes the same bits alone and in any batch.

Without the mode a left-padded row's rotary positions and attention tiles are shifted by its
padding, and PyTorch's CPU matmul takes another path for a single row: in float32 the logits differ
in their last bits (greedy answers rarely change), in bfloat16 answers change (10–14 of 16 here).
So the logits are compared bit for bit in float32, the engine's answers in bfloat16; with the mode
forced off, every test of the property fails but the even fixed schedule's (its answers happen to
agree). tests/test_cuda.py checks the property on a GPU, where the kernels themselves
change with the batch size.
"""

from __future__ import annotations

import pytest
import torch
from engine_support import answers_joining_one_per_step, model, prompts

from llada.engine.engine import Engine, GenerationSettings
from llada.engine.scheduler import Scheduler
from llada.model import batch_invariant
from llada.model.kv_cache import KVCache, cached_forward
from llada.model.transformer import attention_bias, left_pad

LENGTHS = (3, 9, 5, 12, 1, 7)


def float32_model():
    """float32, where a shifted rotary angle or a regrouped sum changes the last bits (float64 would
    hide most of it)."""
    return model(n_layers=2).float()


def bfloat16_model():
    """bfloat16, whose coarse rounding turns those bits into different answers."""
    return model(n_layers=2).to(torch.bfloat16)


def row_logits(net, rows: list[list[int]], answer: int, invariant: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each row's logits from a refresh (every position queried, the cache written) and then from a
    read-only block step over the answer's first 4 positions, computed as one left-padded batch."""
    ids, real = left_pad(rows, pad_id=0)
    batch, width = ids.shape
    ids = torch.cat([ids, torch.full((batch, answer), net.config.mask_token_id)], 1)
    mask = torch.cat([real, torch.ones(batch, answer, dtype=torch.bool)], 1)
    bias = attention_bias(mask if not mask.all() else None, ids.shape[1], False, net.dtype, net.device)
    cache = KVCache.allocate(net, batch, ids.shape[1])
    block = torch.arange(width, width + 4).expand(batch, -1)
    with batch_invariant.enabled() if invariant else torch.no_grad():
        refreshed = cached_forward(net, ids, torch.arange(ids.shape[1]).expand(batch, -1), cache, bias)
        stepped = cached_forward(net, ids[:, width:width + 4], block, cache, bias, write=False)
    return [(refreshed[i, width - len(row):], stepped[i]) for i, row in enumerate(rows)]


def test_each_rows_logits_are_the_same_bits_alone_and_in_a_left_padded_batch() -> None:
    net = float32_model()
    rows = prompts(LENGTHS, seed=3)
    alone = [row_logits(net, [row], 8, invariant=True)[0] for row in rows]
    for order in (rows, rows[::-1], rows[2:4]):
        together = row_logits(net, order, 8, invariant=True)
        for row, (refresh, step) in zip(order, together, strict=True):
            reference = alone[rows.index(row)]
            assert torch.equal(refresh, reference[0]) and torch.equal(step, reference[1])
    # Without the mode the padded rows differ in their last bits: the test can tell.
    default_alone = [row_logits(net, [row], 8, invariant=False)[0] for row in rows]
    default_together = row_logits(net, rows, 8, invariant=False)
    assert any(not torch.equal(got[0], want[0]) for got, want in zip(default_together, default_alone, strict=True))


@pytest.mark.parametrize("overrides", [
    {},
    {"policy": "fixed", "steps": 16},
    {"cache": "prefix"},
    {"cache": "none", "policy": "fixed", "steps": 16},
    {"keep_prompt": True, "refresh_every": 2},
    {"reuse_decided": True},
    {"cfg_scale": 1.0},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_deterministic_engine_answers_do_not_depend_on_the_batch(overrides: dict) -> None:
    net = bfloat16_model()
    rows = prompts(LENGTHS, seed=5)
    settings = GenerationSettings(gen_length=16, block_length=8, threshold=0.3, **overrides)
    engine = Engine(net, deterministic=True)
    alone = [engine.generate([row], settings)[0] for row in rows]
    for batch in (rows, rows[::-1], rows[1:4]):
        together = engine.generate(batch, settings)
        expected = [alone[rows.index(row)] for row in batch]
        assert [r.tokens for r in together] == [r.tokens for r in expected]
        if settings.cache != "prefix":  # the prefix cache keeps a batch's rows in step
            assert [r.steps for r in together] == [r.steps for r in expected]


def test_deterministic_answers_survive_scheduler_joins_and_prompt_room() -> None:
    """Requests joining a running batch (left-padded to its prompt room) answer as they do alone."""
    net = bfloat16_model()
    rows = prompts(LENGTHS, seed=7)
    settings = GenerationSettings(gen_length=16, block_length=8, threshold=0.3)
    engine = Engine(net, deterministic=True)
    alone = [engine.generate([row], settings)[0].tokens for row in rows]
    scheduler = Scheduler(engine, max_batch=4, prompt_bucket=16)
    requests = [scheduler.submit(rows[0], settings)]
    scheduler.step()  # the first request decodes one step alone, the others join it or wait for a row
    requests += [scheduler.submit(row, settings) for row in rows[1:]]
    scheduler.run_until_idle()
    assert [request.result.tokens for request in requests] == alone


def test_fixed_schedules_break_ties_alike_alone_and_among_rows_at_other_steps() -> None:
    """The fixed policy with an uneven schedule (6 steps over blocks of 8: 2, 2, 1, 1, 1, 1 tokens): rows that
    joined later are at other steps of it, so the batch's counts differ by row, where a row alone has
    one count. Saturated bf16 confidences (the output weights scaled up, as a trained model's are
    sharp) tie often; the ties must fall on the same positions either way."""
    net = bfloat16_model()
    with torch.no_grad():
        net.ff_out.weight.mul_(20)
    rows = prompts(LENGTHS, seed=7)
    settings = GenerationSettings(gen_length=16, block_length=8, policy="fixed", steps=12)
    engine = Engine(net, deterministic=True)
    alone = [engine.generate([row], settings)[0].tokens for row in rows]
    assert answers_joining_one_per_step(engine, rows, settings, max_batch=4, prompt_bucket=16) == alone


def test_deterministic_mode_refuses_what_it_cannot_make_invariant() -> None:
    net = float32_model()
    with pytest.raises(ValueError, match="compile"):
        Engine(net, deterministic=True, compile=True)
    from llada.model.quantize import quantize_int8

    quantized = float32_model()
    quantize_int8(quantized)
    with pytest.raises(ValueError, match="Int8Linear"):
        Engine(quantized, deterministic=True)


def test_mode_is_scoped_to_its_thread_and_block() -> None:
    assert not batch_invariant.active()
    with batch_invariant.enabled():
        assert batch_invariant.active()
        with batch_invariant.enabled():  # re-entrant
            assert batch_invariant.active()
        assert batch_invariant.active()
    assert not batch_invariant.active()
