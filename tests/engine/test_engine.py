"""The fast engine against the reference sampler, the full forward pass, and its own single-prompt runs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from engine_support import answers, graph_engine_on_the_cpu, left_padded, model, prompts

from llada.diffusion.sampling import generate
from llada.engine.batch import BatchRun
from llada.engine.commits import decided_through_end
from llada.engine.decoding import select
from llada.engine.engine import Engine, GenerationSettings
from llada.engine.passes import Passes
from llada.engine.rows import row_bucket
from llada.engine.runtime import Runtime
from llada.model.fusion import fuse_projections, projections_fused_in
from llada.model.kv_cache import KVCache, cached_forward, store_entries
from llada.model.quantize import Fp8Linear, quantize_fp8, quantize_int8
from llada.model.transformer import attention_bias


@pytest.mark.parametrize("kwargs", [
    {"gen_length": 16, "block_length": 8, "steps": 8},
    {"gen_length": 16, "block_length": 16, "steps": 16},
    {"gen_length": 12, "block_length": 4, "steps": 12},
    {"gen_length": 16, "block_length": 8, "steps": 8, "cfg_scale": 1.5},
    {"gen_length": 16, "block_length": 8, "steps": 16, "confidence_eos_eot_inf": True},
    {"gen_length": 16, "block_length": 8, "steps": 16, "logits_eos_inf": True},
])
def test_exact_mode_equals_the_reference_sampler(kwargs: dict) -> None:
    net = model()
    rows = prompts((3, 6, 5))  # different lengths: left padding and the attention mask as well
    settings = GenerationSettings(policy="fixed", cache="none", early_stop=False, **kwargs)
    ours = answers(Engine(net).generate(rows, settings))
    ids, mask = left_padded(rows)
    reference = generate(net, ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
    assert torch.equal(ours, reference)


def test_refresh_equals_the_full_forward_pass_and_cached_steps_reuse_it() -> None:
    net = model()
    ids, mask = left_padded(prompts((4, 7)))
    ids = torch.cat([ids, torch.full((2, 8), net.config.mask_token_id)], 1)
    mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], 1)
    full = net(ids, attention_mask=mask).logits
    cache = KVCache.allocate(net, 2, ids.shape[1])
    bias = attention_bias(mask, ids.shape[1], False, net.dtype, net.device)
    everything = torch.arange(ids.shape[1]).expand(2, -1)
    refreshed = cached_forward(net, ids, everything, cache, bias)
    assert torch.equal(refreshed, full)
    # With the sequence unchanged, a block step (dual) or a suffix step (prefix) reads an exact cache.
    block = torch.arange(7, 11).expand(2, -1)
    dual = cached_forward(net, ids[:, 7:11], block, cache, bias)
    torch.testing.assert_close(dual, full[:, 7:11], rtol=1e-12, atol=1e-12)
    read_only = cached_forward(net, ids[:, 7:11], block, cache, bias, write=False)  # fresh block, rest cached
    torch.testing.assert_close(read_only, full[:, 7:11], rtol=1e-12, atol=1e-12)
    suffix = torch.arange(7, ids.shape[1]).expand(2, -1)
    prefix = cached_forward(net, ids[:, 7:], suffix, cache, bias, logits_index=torch.arange(4).expand(2, -1))
    torch.testing.assert_close(prefix, full[:, 7:11], rtol=1e-12, atol=1e-12)


def test_a_read_only_pass_stores_its_entries_as_a_writing_pass_does() -> None:
    """``return_entries`` + ``store_entries`` (one scatter over every layer, after a read-only pass)
    leave the cache and the logits as a pass that writes each layer's queries itself, padding
    queries included (they keep their cached entries)."""
    net = model()
    ids, mask = left_padded(prompts((4, 7)))
    ids = torch.cat([ids, torch.full((2, 8), net.config.mask_token_id)], 1)
    mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], 1)
    bias = attention_bias(mask, ids.shape[1], False, net.dtype, net.device)
    caches = [KVCache.allocate(net, 2, ids.shape[1]) for _ in range(2)]
    for cache in caches:  # a refresh, then tokens change in the answer
        cached_forward(net, ids, torch.arange(ids.shape[1]).expand(2, -1), cache, bias)
    ids[:, 8] = ids[:, 9] = 5
    before = caches[1].entries.clone()
    positions = torch.tensor([[8, 9, 10, 11], [8, 12, 9, 13]])
    query_mask = torch.tensor([[True, True, False, True], [True, False, True, True]])
    tokens = ids.gather(1, positions)
    written = cached_forward(net, tokens, positions, caches[0], bias, query_mask=query_mask)
    read, entries = cached_forward(net, tokens, positions, caches[1], bias, write=False, query_mask=query_mask,
                                   return_entries=True)
    assert entries.shape == (2, net.config.n_layers, 2, net.config.n_kv_heads, 4, net.config.head_dim)
    store_entries(caches[1], positions, entries)
    # Equal up to float64 rounding: the two passes attend through different kernels.
    torch.testing.assert_close(caches[1].entries, caches[0].entries, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(read[query_mask], written[query_mask], rtol=1e-12, atol=1e-12)
    assert not torch.equal(caches[1].entries, before)  # the answer's keys/values did change
    assert torch.equal(caches[1].keys[1], caches[1].entries[0, 1])  # per-layer tensors are views of one
    with pytest.raises(ValueError, match=r"must be \(2, n_layers, B, K, T, D\)"):
        KVCache(torch.zeros(3, 2, 1, 1, 4, 8))


def test_compiled_refreshes_do_not_recompile_per_batch_size() -> None:
    """A cache's layers are views of one tensor; compiled with dynamic shapes, a refresh must not tie
    that tensor's constant dimensions (2 for keys/values, n_layers) to a batch size that happens to
    equal them. (A batch size equal to the number of key/value heads still costs one recompile:
    PyTorch's duck sizing, as with separate tensors per layer.)"""
    from torch._dynamo.testing import CompileCounter

    from llada.engine.runtime import _refresh_layer
    net = model(n_kv_heads=4)  # two layers, four key/value heads
    counter = CompileCounter()
    refresh = torch.compile(_refresh_layer, dynamic=True, fullgraph=True, backend=counter)
    for batch in (2, 3, 5):  # the first equals 2 (keys/values) and n_layers, then changes
        cache = KVCache.allocate(net, batch, 12)
        positions = torch.arange(12).expand(batch, -1).contiguous()
        cached_forward(net, torch.randint(0, 50, (batch, 12)), positions, cache, None, positions, layer_pass=refresh)
    assert counter.frame_count == 1


def test_a_compiled_engine_compiles_one_layer_for_all_layers() -> None:
    """Regional compilation: the layer function traced for the first block serves every other block
    (their code and shapes are the same, their weights are inputs), so compile time does not grow
    with depth; and the traced layers compute what the eager ones do (Inductor's own kernels are
    compared with eager ones in the ``inductor`` and ``cuda`` tests)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from llada.engine.runtime import _step_layer
    net = model(n_layers=4)
    counter = CompileCounterWithBackend("aot_eager")  # traced, functionalized by AOT autograd, then run
    step = torch.compile(_step_layer, dynamic=None, fullgraph=True, backend=counter)
    ids = torch.randint(0, 50, (2, 12))
    everything = torch.arange(12).expand(2, -1)
    cache = KVCache.allocate(net, 2, 12)
    cached_forward(net, ids, everything, cache)
    block = torch.arange(4, 8).expand(2, -1)
    compiled = cached_forward(net, ids[:, 4:8], block, cache, write=False, layer_pass=step)
    assert counter.frame_count == 1  # one trace for four layers
    assert torch.equal(compiled, cached_forward(net, ids[:, 4:8], block, cache, write=False))


def test_copying_rows_into_a_cache_of_another_shape_is_refused() -> None:
    net = model()
    source, target = KVCache.allocate(net, 3, 8), KVCache.allocate(net, 2, 8)
    target.copy_rows(source, torch.tensor([2, 0]))
    assert torch.equal(target.keys[1], source.keys[1][[2, 0]])
    with pytest.raises(ValueError, match="cannot take 3 rows"):
        target.copy_rows(source, torch.tensor([0, 1, 2]))


def test_writing_rows_back_inverts_copying_them() -> None:
    net = model()
    source = KVCache(torch.randn_like(KVCache.allocate(net, 3, 8).entries))
    rows = torch.tensor([2, 0])
    part = KVCache.allocate(net, 2, 8)
    part.copy_rows(source, rows)
    target = KVCache.allocate(net, 3, 8)
    target.write_rows(part, rows)
    assert torch.equal(target.entries[:, :, rows], source.entries[:, :, rows])
    assert not target.entries[:, :, 1].any()  # the row not written keeps its zeros
    with pytest.raises(ValueError, match="cannot take"):
        target.write_rows(source, rows)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize(("read_only", "keep_prompt"), [(False, False), (True, False), (False, True)])
def test_caches_are_exact_for_a_one_layer_model(cache: str, cfg_scale: float, read_only: bool,
                                                keep_prompt: bool) -> None:
    """With one layer, keys/values depend on their own token only, so re-querying the block (and
    keeping the prompt's keys/values) is exact."""
    net = model(n_layers=1)
    rows = prompts((4, 6))
    # Threshold 0.4: blocks take several steps, rows move at different paces (per-row refreshes) and
    # refresh_every fires inside blocks.
    base = {"gen_length": 16, "block_length": 8, "policy": "threshold", "threshold": 0.4, "early_stop": False,
            "cfg_scale": cfg_scale}
    exact = Engine(net).generate(rows, GenerationSettings(cache="none", **base))
    engine = Engine(net)
    engine.runtime.compiled = read_only  # the compiled engine's read-only block steps, without compiling on the CPU
    cached = engine.generate(rows, GenerationSettings(cache=cache, keep_prompt=keep_prompt, refresh_every=3, **base))
    assert torch.equal(answers(cached), answers(exact))
    if cache == "dual":  # the prefix cache keeps rows in step: a row may wait for the other
        assert [r.steps for r in cached] == [r.steps for r in exact]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("policy", ["threshold", "fixed"])
def test_reusing_decided_positions_is_exact_for_a_one_layer_model(policy: str, read_only: bool, cfg_scale: float,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With one layer a decided position's keys/values depend on its own token only, so computing them
    once after the decision and reading them from the cache later (reuse_decided) is exact — padding
    queries of rows that need fewer positions than others included."""
    net = model(n_layers=1)
    rows = prompts((4, 6, 5))
    base = {"gen_length": 16, "block_length": 8, "policy": policy, "threshold": 0.4, "early_stop": False,
            "cfg_scale": cfg_scale}
    exact = Engine(net).generate(rows, GenerationSettings(cache="none", **base))
    engine = Engine(net)
    engine.runtime.compiled = read_only  # read-only steps storing the queries afterwards, without compiling on the CPU
    queries = record_query_lengths(monkeypatch)
    reused = engine.generate(rows, GenerationSettings(cache="dual", reuse_decided=True, **base))
    assert torch.equal(answers(reused), answers(exact))
    assert [r.steps for r in reused] == [r.steps for r in exact]
    assert min(queries) < 8  # some steps queried part of a block


@pytest.mark.parametrize("read_only", [False, True])
def test_reusing_decided_positions_keeps_each_rows_single_prompt_answer(read_only: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """With two layers reuse_decided is an approximation, but a row's answer must not depend on its
    batch: the rows that need fewer queries than the widest one are padded with positions whose cached
    keys/values stand; the answers also differ from the dual cache's somewhere (the reuse does matter)."""
    net = model()
    rows = prompts((3, 8, 5, 6), seed=1)
    settings = GenerationSettings(gen_length=16, block_length=8, policy="threshold", threshold=0.3,
                                  reuse_decided=True)
    engine = Engine(net)
    engine.runtime.compiled = read_only
    alone = [engine.generate([row], settings)[0] for row in rows]
    together = engine.generate(rows, settings)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.steps for r in together] == [r.steps for r in alone]
    dual = engine.generate(rows, replace(settings, reuse_decided=False))
    assert not torch.equal(answers(together), answers(dual))


@pytest.mark.parametrize("overrides", [{"policy": "fixed", "steps": 8}, {"temperature": 0.7},
                                       {"remasking": "random", "cfg_scale": 1.0}])
def test_reuse_decided_with_sampling_apart_from_the_pass_matches_whole_steps(overrides: dict) -> None:
    """Graph engines that cannot capture a step whole (sampling at a temperature, random remasking,
    capture_sampling=False) run the reuse_decided forward pass alone and choose tokens afterwards:
    the same answers as whole steps (a graph engine simulated on the CPU: its replays run plainly)."""
    net = model()
    rows = prompts((3, 8, 5), seed=4)
    settings = GenerationSettings(**{"gen_length": 16, "block_length": 8, "policy": "threshold", "threshold": 0.3,
                                     "reuse_decided": True, **overrides})
    whole = Engine(net).generate(rows, settings, generator=torch.Generator().manual_seed(0))
    apart = graph_engine_on_the_cpu(net, capture_sampling=False)
    keys = []
    forward = apart.runtime.replay
    apart.runtime.replay = lambda key, *args, **kwargs: keys.append(key[0]) or forward(key, *args, **kwargs)
    assert [r.tokens for r in apart.generate(rows, settings, generator=torch.Generator().manual_seed(0))] == \
        [r.tokens for r in whole]
    assert "sparse block pass" in keys and "sparse block step" not in keys


def test_reusing_decided_positions_breaks_confidence_ties_as_the_whole_block() -> None:
    """Demoted end-of-text proposals (confidence_eos_eot_inf) all get confidence 0: exact ties, which
    top-k breaks by position and by the width it looks at; choosing over the whole block keeps the
    exact mode's choices (one layer, where reuse_decided is exact)."""
    net = model(n_layers=1, eos=386)
    rows = prompts((4, 6, 5), seed=16)
    base = {"gen_length": 16, "block_length": 8, "policy": "fixed", "early_stop": False,
            "confidence_eos_eot_inf": True}
    exact = Engine(net).generate(rows, GenerationSettings(cache="none", **base))
    reused = Engine(net).generate(rows, GenerationSettings(cache="dual", reuse_decided=True, **base))
    assert torch.equal(answers(reused), answers(exact))


def test_reuse_decided_steps_query_the_undecided_and_the_just_decided(monkeypatch: pytest.MonkeyPatch) -> None:
    """One token per step in blocks of 8: after the block's refresh, step k queries the 8 - k undecided
    positions and the one decided at step k - 1 (their keys/values still show the mask)."""
    queries = record_query_lengths(monkeypatch)
    settings = GenerationSettings(gen_length=16, block_length=8, policy="fixed", early_stop=False, reuse_decided=True)
    Engine(model()).generate(prompts((5,)), settings)
    total = 5 + 16
    assert queries == [total, 8, 7, 6, 5, 4, 3, 2] * 2
    wide = GenerationSettings(gen_length=64, block_length=32, policy="fixed", early_stop=False, reuse_decided=True)
    queries.clear()
    Engine(model()).generate(prompts((5,)), wide)
    block_steps = [q for q in queries if q <= 32]
    # Step k of a block needs 33 - k positions (17 on average), rounded up to a multiple of 4.
    assert block_steps == [-(-(33 - k) // 4) * 4 for k in range(1, 32)] * 2


@pytest.mark.parametrize("overrides", [{}, {"cfg_scale": 1.0}, {"keep_prompt": True}, {"refresh_every": 2, "steps": 8}])
def test_fixed_schedules_predict_reuse_decided_query_widths_without_reading_them_back(
        overrides: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the fixed policy the host derives each row's next query count from the schedule. Counted on
    the device instead (undecided or unwritten positions of each block, as the other policies read
    back), every step must query the same widths and give the same answers — with uneven counts
    (8 tokens in 3 steps per block), rows that join at different steps, guidance, per-row prompt caches
    and periodic refreshes."""
    settings = GenerationSettings(**{"gen_length": 16, "block_length": 8, "steps": 6, "policy": "fixed",
                                     "early_stop": False, "reuse_decided": True, **overrides})
    rows = prompts((5, 7, 4), seed=3)

    def decode() -> tuple[list[int], list[list[int]]]:
        queries = record_query_lengths(monkeypatch)
        run = Engine(model()).start(rows[:1], settings, prompt_room=8)
        run.advance()
        run.add(rows[1:])  # joining one step later: rows at different steps of their blocks
        while run.advance():
            pass
        return list(queries), [result.tokens for result in run.results()]

    predicted = decode()

    def counted_on_the_device(self, live: list[int]) -> list[int]:
        counts = (self.undecided | self.unwritten).gather(1, self._block_offsets()).sum(1).tolist()
        return [counts[r] if r in live else self.rows.needed[r] for r in range(len(counts))]

    monkeypatch.setattr(BatchRun, "_needed_by_schedule", counted_on_the_device)
    counted = decode()
    assert predicted == counted
    assert min(predicted[0]) < settings.block_length  # sparse steps did run


def test_refreshes_leave_only_their_own_commits_unwritten() -> None:
    """A refresh stores every position's keys/values from its tokens, so afterwards only the positions
    it committed itself are unwritten (refreshes every other step: the step before a refresh left its
    commits unwritten, which a stale mark would make the next step query again)."""
    settings = GenerationSettings(gen_length=16, block_length=8, steps=8, policy="fixed", early_stop=False,
                                  reuse_decided=True, refresh_every=2)
    run = Engine(model()).start(prompts((5, 6), seed=2), settings)
    refreshes = 0
    while (update := run.step()) is not None:
        if (update.step - 1) % 2 == 0 and not all(update.finished):  # 4 steps a block: steps 0 and 2 refresh
            refreshes += 1
            assert torch.equal(run.unwritten.cpu(), update.decided)
    assert refreshes == 4  # two per block


def test_reuse_decided_needs_the_dual_cache() -> None:
    for cache in ("none", "prefix"):
        with pytest.raises(ValueError, match="reuse_decided needs cache='dual'"):
            GenerationSettings(cache=cache, reuse_decided=True).validate()


@pytest.mark.parametrize(("cache", "keep_prompt"), [("none", False), ("prefix", False), ("dual", False),
                                                   ("prefix", True), ("dual", True)])
def test_batched_results_equal_single_prompt_results(cache: str, keep_prompt: bool) -> None:
    net = model()
    rows = prompts((3, 8, 5, 6), seed=1)
    settings = GenerationSettings(gen_length=16, block_length=8, policy="threshold", threshold=0.3, cache=cache,
                                  keep_prompt=keep_prompt)
    engine = Engine(net)
    together = engine.generate(rows, settings)
    alone = [engine.generate([row], settings)[0] for row in rows]
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    if cache != "prefix":  # each row at its own pace (the prefix cache keeps rows in step)
        assert [r.steps for r in together] == [r.steps for r in alone]
        assert len({r.steps for r in together}) > 1


# Threshold steps with short blocks: rows finish at different steps, so the batch shrinks.
SHRINKING = GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.3)


@pytest.mark.parametrize("settings", [SHRINKING, replace(SHRINKING, cfg_scale=1.0), replace(SHRINKING, reuse_decided=True)])
def test_a_shrinking_batch_keeps_idle_rows_up_to_a_bucket_and_every_rows_answer(
        settings: GenerationSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nine rows ending at different steps: on a graph engine each shrink keeps ``row_bucket`` slots
    (so that shapes repeat from batch to batch), here once with an idle row beside five live ones,
    and every row still gets its single-prompt answer and steps; an engine without graphs, which
    captures nothing, shrinks to the live rows alone."""
    net = model()
    rows = prompts((3, 8, 5, 6, 4, 7, 3, 5, 6), seed=2)
    alone = [Engine(net).generate([row], settings)[0] for row in rows]
    kept: list[tuple[int, int]] = []  # (slots kept, of them live)
    keep_rows = BatchRun._keep_rows

    def recording(run: BatchRun, slots: list[int]) -> None:
        kept.append((len(slots), sum(run.rows.active[s] for s in slots)))
        keep_rows(run, slots)

    monkeypatch.setattr(BatchRun, "_keep_rows", recording)
    together = graph_engine_on_the_cpu(net).generate(rows, settings)
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.steps for r in together] == [r.steps for r in alone]
    assert all(size == row_bucket(live) for size, live in kept)
    assert (6, 5) in kept
    kept.clear()
    assert [r.tokens for r in Engine(net).generate(rows, settings)] == [r.tokens for r in alone]
    assert kept and all(size == live for size, live in kept)


@pytest.mark.parametrize("settings", [SHRINKING, replace(SHRINKING, cfg_scale=1.0),
                                      replace(SHRINKING, reuse_decided=True)])
def test_a_row_joins_an_idle_slot_kept_by_a_shrink_beside_a_dropped_row(settings: GenerationSettings) -> None:
    """After nine rows shrink to six slots (one idle, kept for the bucket), a new prompt takes that
    slot without growing the batch, a live row is dropped, and on the CPU graph engine every other
    row, the finished ones included, keeps its single-prompt answer."""
    net = model()
    rows = prompts((3, 8, 5, 6, 4, 7, 3, 5, 6), seed=2)
    run = graph_engine_on_the_cpu(net).start(rows, settings, prompt_room=8)
    while run.x.shape[0] == 9:
        assert run.advance()
    assert run.x.shape[0] == 6 and len(run.rows.free()) == 1
    slot, newcomer = run.rows.free()[0], prompts((4,), seed=77)[0]
    assert run.add([newcomer]) == [9] and run.rows.ids[slot] == 9 and run.x.shape[0] == 6
    dropped = next(run.rows.ids[s] for s in run.rows.live() if run.rows.ids[s] != 9)
    run.drop(dropped)
    while run.advance():
        pass
    plain = Engine(net)
    kept = [r for r in range(10) if r != dropped]
    assert [run.result(r).tokens for r in kept] == [plain.generate([(rows + [newcomer])[r]], settings)[0].tokens
                                                    for r in kept]


def record_query_lengths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of query positions of every forward pass any engine runs from now on."""
    queries: list[int] = []
    original = Runtime.plain_forward

    def spy(self, cache, tokens, *args, **kwargs):
        queries.append(tokens.shape[1])
        return original(self, cache, tokens, *args, **kwargs)

    monkeypatch.setattr(Runtime, "plain_forward", spy)
    return queries


@pytest.mark.parametrize("overrides", [{}, {"keep_prompt": True}, {"keep_prompt": True, "cfg_scale": 1.0}])
def test_per_row_refreshes_write_every_entry_of_their_scratch_cache(overrides: dict,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that refresh while others take a block step run in a scratch cache that is not zeroed;
    filled with NaN, any entry read before it is written would poison the answers, which instead
    equal single-prompt runs (whose refreshes use zeroed caches)."""
    original = KVCache.allocate.__func__

    def poisoned(cls, model, batch, length, zeroed=True):
        cache = original(cls, model, batch, length, zeroed)
        if not zeroed:
            for tensor in cache.keys + cache.values:
                tensor.fill_(float("nan"))
        return cache

    rows = prompts((3, 8, 5, 6), seed=1)
    settings = GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.3, **overrides)
    engine = Engine(model())
    alone = [engine.generate([row], settings)[0].tokens for row in rows]
    scratch: list[int] = []
    refresh_some = Passes.refresh_some

    def counting(self, tensors, rows, positions, answer_only):
        scratch.append(len(rows))
        return refresh_some(self, tensors, rows, positions, answer_only)

    monkeypatch.setattr(KVCache, "allocate", classmethod(poisoned))
    monkeypatch.setattr(Passes, "refresh_some", counting)
    assert [r.tokens for r in engine.generate(rows, settings)] == alone
    assert scratch  # some rows did refresh on their own


def test_keep_prompt_refreshes_query_the_answer_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row's first refresh queries prompt and answer; later ones (block starts, ``refresh_every``)
    the answer only, reading the prompt's keys/values from the cache — which, with two layers, are
    stale, so the answers differ from the complete refreshes' somewhere."""
    net = model()
    rows = prompts((5, 9, 4), seed=2)
    base = GenerationSettings(gen_length=16, block_length=4, policy="fixed", steps=16, cache="dual", early_stop=False,
                              refresh_every=2)
    engine = Engine(net)
    queries = record_query_lengths(monkeypatch)
    kept = engine.generate(rows, replace(base, keep_prompt=True))
    total = 9 + 16
    # 16 steps of one token: a refresh at steps 0 and 2 of each block, block steps in between.
    assert queries == [total, 4, 16, 4] + [16, 4, 16, 4] * 3
    queries.clear()
    complete = engine.generate(rows, base)
    assert queries == [total, 4, total, 4] * 4
    assert not torch.equal(answers(kept), answers(complete))


def test_refreshes_of_both_kinds_in_one_step_skip_the_block_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt joining when every other row starts a block: the new row's complete refresh and the
    others' answer-only ones are the whole step (no block step whose logits would all be replaced),
    and every answer equals its single-prompt run."""
    net = model()
    rows = prompts((4, 6, 3), seed=7)
    settings = GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.0, keep_prompt=True,
                                  early_stop=False)  # threshold 0: a block per step, every step a refresh
    engine = Engine(net)
    alone = [engine.generate([row], settings)[0].tokens for row in rows]
    run = engine.start(rows[:2], settings, prompt_room=8)
    run.advance()
    queries = record_query_lengths(monkeypatch)
    run.add(rows[2:])
    run.advance()
    assert sorted(queries) == [16, 8 + 16]  # answer-only for the two rows, complete for the new one
    while run.advance():
        pass
    assert [r.tokens for r in run.results()] == alone


def test_models_with_padded_embeddings_refresh_rows_apart() -> None:
    """Output width is the embedding size (padded past the vocabulary in some checkpoints): rows
    refreshing apart from the batch must not assume the vocabulary size."""
    net = model(embedding_size=528)
    rows = prompts((3, 8, 5, 6), seed=1)
    settings = GenerationSettings(gen_length=16, block_length=8, policy="threshold", threshold=0.3)
    engine = Engine(net)
    together = engine.generate(rows, settings)
    assert [r.tokens for r in together] == [engine.generate([row], settings)[0].tokens for row in rows]
    assert len({r.steps for r in together}) > 1  # rows moved apart: some refreshed without the others


def test_threshold_one_commits_one_token_per_step() -> None:
    net = model()
    settings = GenerationSettings(gen_length=16, block_length=8, policy="threshold", threshold=1.0, early_stop=False)
    updates = list(Engine(net).stream(prompts((4, 4)), settings))
    assert len(updates) == 16
    assert all((u.decided.sum(1) == 1).all() for u in updates)


def test_threshold_commits_confidence_equal_to_tau_as_fast_dllm() -> None:
    """Fast-dLLM commits at confidence >= τ: a proposal exactly at τ is committed."""
    from llada.engine.decoding import select

    confidence = torch.tensor([[0.5, 0.75, 0.25, 0.75]])
    chosen = select(confidence, torch.ones(1, 4, dtype=torch.bool), "threshold", threshold=0.75)
    assert chosen.tolist() == [[False, True, False, True]]


def test_threshold_zero_decodes_a_block_per_step() -> None:
    settings = GenerationSettings(gen_length=16, block_length=8, policy="threshold", threshold=0.0, early_stop=False)
    results = Engine(model()).generate(prompts(), settings)
    assert all(r.steps == 2 for r in results)


def test_streaming_decides_every_position_once_and_ends_with_the_result() -> None:
    net = model()
    rows = prompts((5, 3))
    settings = GenerationSettings(gen_length=16, block_length=4, policy="factor", factor=2.0, early_stop=False)
    updates = list(Engine(net).stream(rows, settings))
    decided = torch.stack([u.decided for u in updates]).sum(0)
    assert (decided == 1).all()
    assert [u.step for u in updates] == list(range(1, len(updates) + 1))
    assert torch.equal(updates[-1].answer, answers(Engine(net).generate(rows, settings)))
    assert updates[-1].finished == [True, True]


def test_early_stop_never_cuts_a_non_end_token() -> None:
    """Stopping once an end token has everything before it decided leaves the text unchanged."""
    rows = prompts((3, 5, 4, 6, 2, 7), seed=3)
    probe = GenerationSettings(gen_length=32, block_length=4, policy="threshold", threshold=0.2, early_stop=False)
    full = Engine(model()).generate(rows, probe)
    # Make a token the model does emit mid-answer the end-of-text token.
    end = max(set(full[0].answer[4:12].tolist()), key=full[0].answer[4:12].tolist().count)
    net = model(eos=end)
    complete = Engine(net).generate(rows, probe)
    stopped = Engine(net).generate(rows, GenerationSettings(**{**probe.__dict__, "early_stop": True}))
    assert [r.tokens for r in stopped] == [r.tokens for r in complete]
    assert any(r.finish_reason == "stop" for r in stopped)
    assert sum(r.steps for r in stopped) < sum(r.steps for r in complete)  # it did stop early
    assert all((r.answer != net.config.mask_token_id).all() for r in stopped)  # the rest is filled in


def test_complete_answers_against_their_definition() -> None:
    """An answer is complete when some decided end token (either id) has every position before it
    decided; checked against that definition, position by position, on random rows."""
    generator = torch.Generator().manual_seed(0)
    answer = torch.randint(0, 6, (400, 7), generator=generator)  # ids 4 and 5 end the text
    undecided = torch.rand(400, 7, generator=generator) < 0.3
    expected = [any(answer[b, i] in (4, 5) and not undecided[b, i] and not undecided[b, :i].any() for i in range(7))
                for b in range(400)]
    assert decided_through_end(answer, undecided, (4, 5)).tolist() == expected
    assert 40 < sum(expected) < 360  # both outcomes well represented
    assert decided_through_end(answer, undecided, (4,)).tolist() == [
        any(answer[b, i] == 4 and not undecided[b, :i + 1].any() for i in range(7)) for b in range(400)]


def test_policies_against_their_definitions() -> None:
    confidence = torch.tensor([[0.95, 0.5, 0.97, 0.2], [0.1, 0.3, 0.2, 0.05]])
    masked = torch.tensor([[True, True, True, True], [True, False, True, True]])
    threshold = select(confidence, masked, "threshold", threshold=0.9)
    assert threshold.tolist() == [[True, False, True, False], [False, False, True, False]]  # at least one
    # factor f = 1: thresholds 1 - 1/(n+1) = 0.5, 0.667, 0.75, ... on the sorted confidences.
    factor = select(confidence, masked, "factor", factor=1.0)
    assert factor.tolist() == [[True, False, True, False], [False, False, True, False]]
    wide = select(confidence, masked, "factor", factor=2.0)  # thresholds 0, 0.333, 0.5, 0.6
    assert wide.tolist() == [[True, True, True, False], [False, False, True, False]]
    counts = select(confidence, masked, "fixed", count=torch.tensor([3, 1]))
    assert counts.tolist() == [[True, True, True, False], [False, False, True, False]]
    nothing_left = select(confidence, torch.zeros_like(masked), "threshold")
    assert not nothing_left.any()


@pytest.mark.parametrize("kwargs, message", [
    ({"block_length": 5}, "block_length"),
    ({"policy": "greedy"}, "policy"),
    ({"cache": "full"}, "cache"),
    ({"threshold": 1.5}, "threshold"),
    ({"factor": 0}, "factor"),
    ({"policy": "fixed", "steps": 3}, "steps"),
    ({"remasking": "sideways"}, "remasking"),
    ({"temperature": -1}, "temperature"),
    ({"gen_length": 600}, "max_sequence_length"),
    ({"cache": "none", "keep_prompt": True}, "keep_prompt"),
])
def test_bad_settings_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Engine(model()).generate(prompts(), GenerationSettings(**{"gen_length": 16, "block_length": 8, **kwargs}))


def test_bad_prompts_are_named() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        Engine(model()).generate([[1, 2], []])
    with pytest.raises(ValueError, match="cuda_graphs"):
        Engine(model(), cuda_graphs=True)


@pytest.mark.inductor
@pytest.mark.parametrize("reuse_decided", [False, True])
def test_compiled_block_steps_match_plain_ones(reuse_decided: bool) -> None:
    """The compiled engine (torch.compile of the read-only block step; Inductor on the CPU here)
    decodes like the uncompiled read-only path."""
    net = model()
    rows = prompts((4, 6))
    settings = GenerationSettings(gen_length=16, block_length=8, policy="threshold", threshold=0.3,
                                  reuse_decided=reuse_decided)
    plain = Engine(net)
    plain.runtime.compiled = True  # the read-only block steps, uncompiled
    compiled = Engine(net, compile=True)
    assert [r.tokens for r in compiled.generate(rows, settings)] == [r.tokens for r in plain.generate(rows, settings)]


def test_fused_projections_keep_the_model_and_match_unfused_steps() -> None:
    """Fusing makes the layers' weights views of one q/k/v and one gate/up matrix: the plain forward
    pass is unchanged bit for bit, the state dict too, and the engine's cached passes and answers
    equal the unfused engine's."""
    net = model()
    ids = torch.tensor(prompts((6,)))
    before = net(ids).logits
    names = list(net.state_dict())
    cache = KVCache.allocate(net, 1, ids.shape[1])
    unfused = cached_forward(net, ids, torch.arange(ids.shape[1])[None], cache, None)
    settings = GenerationSettings(gen_length=16, block_length=8, policy="fixed", steps=16, early_stop=False)
    expected = [Engine(net, fuse=False).generate(prompts((4, 6)), replace(settings, cache=mode))
                for mode in ("none", "dual")]
    assert fuse_projections(net)
    block = net.blocks[0]
    assert block.q_proj.weight.data_ptr() == block.fused_qkv.data_ptr() and projections_fused_in(block)
    assert block.fused_gate_up.shape == (2 * net.config.mlp_hidden_size, net.config.d_model)
    assert torch.equal(net(ids).logits, before) and list(net.state_dict()) == names
    fused = cached_forward(net, ids, torch.arange(ids.shape[1])[None], KVCache.allocate(net, 1, ids.shape[1]), None,
                           fused=True)
    torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-12)
    engine = Engine(net, fuse=True)
    assert engine.runtime.fused
    for mode, reference in zip(("none", "dual"), expected):
        assert torch.equal(answers(engine.generate(prompts((4, 6)), replace(settings, cache=mode))), answers(reference))
    net.float()  # new weight tensors: the fused matrices no longer back them
    with pytest.raises(RuntimeError, match="moved or reloaded"):
        engine.generate(prompts((4,)), settings)


def test_int8_models_are_not_fused() -> None:
    net = quantize_int8(model())
    assert not fuse_projections(net) and not Engine(net, fuse=True).runtime.fused
    fused = model()
    assert fuse_projections(fused)
    quantize_int8(fused)  # quantizing after an engine fused the model: the quantized layers are used
    assert not hasattr(fused.blocks[0], "fused_qkv")
    ids = torch.tensor(prompts((6,)))
    plain = cached_forward(fused, ids, torch.arange(6)[None], KVCache.allocate(fused, 1, 6), None, fused=True)
    torch.testing.assert_close(plain, fused(ids).logits, rtol=1e-12, atol=1e-12)


def test_fp8_models_are_fused_into_stacked_fp8_layers() -> None:
    """Fp8 scales are per output channel, so a stacked q/k/v (gate/up) layer rounds exactly as the
    separate ones: fused cached passes and answers equal the unfused ones; the model's state dict
    and module tree are unchanged."""
    net = quantize_fp8(model())
    ids = torch.tensor(prompts((6,)))
    before = net(ids).logits
    names, modules = list(net.state_dict()), [name for name, _ in net.named_modules()]
    positions = torch.arange(6)[None]
    unfused = cached_forward(net, ids, positions, KVCache.allocate(net, 1, 6), None)
    settings = GenerationSettings(gen_length=16, block_length=8, policy="fixed", steps=16, early_stop=False,
                                  cache="dual")
    expected = answers(Engine(net, fuse=False).generate(prompts((4, 6)), settings))
    engine = Engine(net, fuse=True)
    block = net.blocks[0]
    assert engine.runtime.fused and isinstance(block.fused_qkv, Fp8Linear) and projections_fused_in(block)
    assert block.k_proj.weight.data_ptr() == block.fused_qkv.weight[block.q_proj.weight.shape[0]:].data_ptr()
    assert block.up_proj.scales.data_ptr() == block.fused_gate_up.scales[:, block.ff_proj.weight.shape[0]:].data_ptr()
    assert list(net.state_dict()) == names and [name for name, _ in net.named_modules()] == modules
    assert torch.equal(net(ids).logits, before)
    fused = cached_forward(net, ids, positions, KVCache.allocate(net, 1, 6), None, fused=True)
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)
    assert torch.equal(answers(engine.generate(prompts((4, 6)), settings)), expected)


def test_fused_matrices_serve_every_pass_but_the_exact_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact mode's passes keep the model's own matmuls, so that it stays the reference's
    arithmetic; the cached modes' refreshes and block steps take the fused matrices."""
    from llada.model.transformer import Block

    calls: list[tuple[int, bool]] = []
    original = Block.project_qkv

    def spy(block, x, cos, sin, fused=False):
        calls.append((x.shape[1], fused))
        return original(block, x, cos, sin, fused)

    monkeypatch.setattr(Block, "project_qkv", spy)
    engine = Engine(model(), fuse=True)
    settings = GenerationSettings(gen_length=16, block_length=8, policy="fixed", steps=16, cache="none",
                                  early_stop=False)
    engine.generate(prompts((5,)), settings)
    assert calls and {fused for _, fused in calls} == {False}
    calls.clear()
    engine.generate(prompts((5,)), replace(settings, cache="dual"))
    total = 5 + 16
    assert {length for length, _ in calls} == {total, 8}  # refreshes and dual-cache block steps
    assert {fused for _, fused in calls} == {True}


def test_engines_refuse_weights_replaced_after_them() -> None:
    net = model()
    unfused = Engine(net, fuse=False)
    fused = Engine(net, fuse=True)  # replaces the weight tensors the first engine was made for
    with pytest.raises(RuntimeError, match="replaced"):
        unfused.generate(prompts((4,)), GenerationSettings(gen_length=8, block_length=8))
    other = model(seed=1)
    net.blocks[1].load_state_dict(other.blocks[1].state_dict(), assign=True)  # one block reloaded
    with pytest.raises(RuntimeError, match="moved or reloaded"):
        fused.generate(prompts((4,)), GenerationSettings(gen_length=8, block_length=8))


def test_a_stream_left_early_gives_its_cache_back() -> None:
    engine = Engine(model())
    updates = engine.stream(prompts((4,)), GenerationSettings(gen_length=16, block_length=8))
    next(updates)
    assert not engine.runtime._free_caches
    updates.close()
    assert len(engine.runtime._free_caches) == 1


def test_block_steps_of_any_threshold_or_factor_share_their_graph_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threshold and factor are inputs of a captured block step (clients choose them per request), so
    batches that differ only in them replay the same graphs on a pooled cache; refresh_every, which a
    block step never reads, does not split the keys either. Early stop does: the step itself tells
    which answers are complete."""
    keys: list[tuple] = []
    original = Runtime.replay

    def spy(self, key, *args, **kwargs):
        keys.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(Runtime, "replay", spy)
    engine = Engine(model())
    rows = prompts((5,))  # one row: the batch never shrinks onto another cache
    seen = []
    for settings in (GenerationSettings(gen_length=16, block_length=8, threshold=0.3),
                     GenerationSettings(gen_length=16, block_length=8, threshold=0.6, refresh_every=5),
                     GenerationSettings(gen_length=16, block_length=8, policy="factor", factor=0.5),
                     GenerationSettings(gen_length=16, block_length=8, policy="factor", factor=2.0),
                     GenerationSettings(gen_length=16, block_length=8, policy="factor", factor=2.0, early_stop=False)):
        keys.clear()
        engine.generate(rows, settings)
        seen.append({key for key in keys if key[0] == "block step"})
    assert len(seen[0]) == 1 and seen[0] == seen[1]
    assert len(seen[2]) == 1 and seen[2] == seen[3] and seen[0] != seen[2]  # another policy: another graph
    assert len(seen[4]) == 1 and seen[4] != seen[3]


def test_every_cache_mode_has_its_behaviour() -> None:
    """A cache mode is one Literal value and one entry of the behaviour table, nothing else."""
    from llada.engine.settings import CACHE_BEHAVIOURS, CACHE_MODES

    assert set(CACHE_BEHAVIOURS) == set(CACHE_MODES)
    assert [name for name, mode in CACHE_BEHAVIOURS.items() if mode.exact] == ["none"]


def test_the_pool_keeps_small_idle_caches_beyond_two_and_large_ones_only_two(monkeypatch) -> None:
    """By default the engine keeps every idle cache while they total at most ``POOLED_BYTES`` (a batch
    of short answers shrinks through several shapes; each shape that leaves the pool recaptures its
    graphs on the next call), but never fewer than two; ``max_pooled_caches`` sets the count."""
    import llada.engine.runtime as runtime_module

    shapes = (32, 21, 4, 3, 2, 1)

    def pooled_after_releasing(runtime: Runtime) -> list[KVCache]:
        caches = [runtime.acquire_cache(rows, 16) for rows in shapes]
        for cache in caches:
            runtime.release_cache(cache)
        return caches

    runtime = Runtime(model())
    caches = pooled_after_releasing(runtime)
    assert all(runtime.acquire_cache(rows, 16) is cache for rows, cache in zip(shapes, caches))
    monkeypatch.setattr(runtime_module, "POOLED_BYTES", 0)  # every cache counts as large
    runtime = Runtime(model())
    caches = pooled_after_releasing(runtime)
    assert runtime._free_caches == caches[-2:]  # the two most recently released
    runtime = Runtime(model(), max_pooled_caches=3)
    caches = pooled_after_releasing(runtime)
    assert runtime._free_caches == caches[-3:]


def test_compiled_engines_outlive_dynamos_recompile_limit(monkeypatch) -> None:
    """The compiled layer functions are shared by every compiled engine of a process, and each new
    shape dimension, cache mode or model adds a variant; with ``fullgraph=True`` Dynamo's limit (8
    by default, 1 here) would make the next one an error. Compiled with the eager backend (Dynamo's
    tracing, the model's own kernels), the engine must answer exactly as the uncompiled one."""
    import torch._dynamo

    compile_function = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **options: compile_function(
        function, **{**options, "backend": "eager"}))
    torch._dynamo.reset()
    net = model()
    base = GenerationSettings(gen_length=8, block_length=4, threshold=0.3)
    compiled, eager = Engine(net, compile=True), Engine(net)
    with torch._dynamo.config.patch(recompile_limit=1):
        for settings in (base, replace(base, cache="prefix")):
            for lengths in ((4, 6), (3,)):
                rows = prompts(lengths)
                assert torch.equal(answers(compiled.generate(rows, settings)), answers(eager.generate(rows, settings)))
