"""GPU-only behaviour: CUDA graphs, fused projections in bf16, fp8 matmuls, capture on a worker thread.

Deselected by default (marker ``cuda``); on a GPU machine run ``python -m pytest -m cuda tests``, which also
runs the GPU cases kept beside their CPU tests in other files.
"""

from __future__ import annotations

import threading
import types

import pytest
import torch
from engine_support import answers, answers_joining_one_per_step, left_padded, model, prompts

from llada.diffusion.sampling import generate
from llada.engine.engine import Engine, GenerationSettings
from llada.engine.scheduler import Scheduler
from llada.model import block_attention
from llada.model.kv_cache import KVCache, _attend_cache_and_fresh, cached_forward
from llada.model.quantize import FP8_MAX, Fp8Linear

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gpu_model(**overrides):
    return model(**overrides).to("cuda", torch.bfloat16)


def test_fused_engine_exact_mode_equals_the_reference_sampler_in_bf16() -> None:
    """Refreshes keep the model's own matmuls, so a fused, graph-captured engine in exact mode gives the
    reference sampler's tokens bit for bit, where one rounding difference could reorder choices."""
    net = gpu_model()
    rows = prompts((3, 6, 5))
    settings = GenerationSettings(gen_length=16, block_length=8, steps=16, policy="fixed", cache="none",
                                  early_stop=False)
    engine = Engine(net)
    assert engine.runtime.fused and engine.runtime.cuda_graphs
    ids, mask = left_padded(rows)
    reference = generate(net, ids.cuda(), attention_mask=mask.cuda(), gen_length=16, block_length=8, steps=16)
    assert torch.equal(answers(engine.generate(rows, settings)).cuda(), reference[:, ids.shape[1]:])


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_keep_prompt_under_cuda_graphs_equals_plain_calls(cfg_scale: float) -> None:
    """Answer-only refreshes (whole-batch and per-row) captured as graphs replay the plain calls' kernels."""
    net = gpu_model()
    rows = prompts((3, 8, 5, 6))
    settings = GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.3, keep_prompt=True,
                                  cfg_scale=cfg_scale)
    plain = Engine(net, cuda_graphs=False).generate(rows, settings)
    graphed = Engine(net).generate(rows, settings)
    assert [r.tokens for r in graphed] == [r.tokens for r in plain]


@pytest.mark.parametrize(("settings", "compile"), [
    (GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.3), False),
    (GenerationSettings(gen_length=16, block_length=4, policy="fixed", steps=8, cache="prefix", early_stop=False), False),
    (GenerationSettings(gen_length=16, block_length=4, policy="factor", cfg_scale=1.0, keep_prompt=True), False),
    (GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.3), True),
    (GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.3, reuse_decided=True), False),
    (GenerationSettings(gen_length=16, block_length=8, policy="fixed", reuse_decided=True, cfg_scale=1.0), True),
])
def test_whole_block_steps_captured_as_graphs_equal_plain_calls_and_serve_later_batches(
        settings: GenerationSettings, compile: bool) -> None:
    """Greedy block steps (forward pass and commits) replay as one graph each: the answers equal plain
    calls', rows finishing early shrink the batch onto other caches, and a second batch of the same
    shapes replays the graphs on its own tokens (the cache's state tensors) without capturing again.

    Compiled engines are compared with compiled plain calls: Inductor's fused kernels round bf16
    differently from eager ones, which changes random-weight choices (in float32 they agree)."""
    net = gpu_model()
    rows = prompts((3, 8, 5, 6))
    plain = Engine(net, compile=compile, cuda_graphs=False).generate(rows, settings)
    engine = Engine(net, compile=compile, max_pooled_caches=8)
    assert [r.tokens for r in engine.generate(rows, settings)] == [r.tokens for r in plain]
    captured = dict(engine.runtime._graphs)
    assert any(key[0] in ("block step", "sparse block step") for key in captured)
    assert engine.runtime.captures == len(captured)
    assert [r.tokens for r in engine.generate(rows, settings)] == [r.tokens for r in plain]
    assert engine.runtime._graphs == captured
    assert engine.runtime.captures == len(captured)  # nothing captured again
    sampled = Engine(net, compile=compile, capture_sampling=False).generate(rows, settings)  # forward pass alone captured
    assert [r.tokens for r in sampled] == [r.tokens for r in plain]


@pytest.mark.parametrize("reuse_decided", [False, True])
def test_compiled_engines_equal_eager_ones_in_float32(reuse_decided: bool) -> None:
    """In float32 Inductor's kernels round like eager ones closely enough that a compiled, graph-captured
    engine (compiled refreshes, read-only block steps, one-scatter stores) decides every token as the
    eager engine does — the check of compiled against eager arithmetic that bf16 cannot give."""
    net = model().to("cuda", torch.float32)
    rows = prompts((3, 8, 5, 6))
    settings = GenerationSettings(gen_length=16, block_length=8, policy="fixed", cfg_scale=1.0,
                                  reuse_decided=reuse_decided)
    eager = Engine(net, cuda_graphs=False).generate(rows, settings)
    compiled = Engine(net, compile=True).generate(rows, settings)
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]


@pytest.mark.parametrize("settings", [
    GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.3),
    GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.3, keep_prompt=True,
                       cfg_scale=1.0),
])
def test_rows_joining_a_batch_refresh_through_padded_graphs_as_plain_calls(settings: GenerationSettings) -> None:
    """Rows joining a running batch refresh as a pass of their own, padded to a power of two with
    copies of its first row and captured: in float32 (where rows do not depend on their batch's
    size) every answer equals a plain engine's, and the duplicated rows' writes leave the cache exact."""
    net = model().to("cuda", torch.float32)
    rows = prompts((3, 4, 2, 5, 4, 3), seed=8)

    def decode(engine: Engine) -> list[list[int]]:
        run = engine.start(rows[:1], settings, prompt_room=6)
        run.advance()
        run.add(rows[1:4])  # three rows: a pass padded to four
        run.advance()
        run.add(rows[4:])
        while run.advance():
            pass
        return [r.tokens for r in run.results()]

    graphed = Engine(net, max_pooled_caches=16)  # keeps every cache's graphs for the check below
    assert decode(graphed) == decode(Engine(net, cuda_graphs=False))
    assert {key[-3] for key in graphed.runtime._graphs if key[0] == "refresh rows"} >= {4}


def test_batches_of_other_layouts_on_one_pooled_cache_keep_their_own_graphs() -> None:
    """Two batches whose sequences have the same length but other prompt/answer splits take turns on
    one pooled cache: they share its token state tensor and its pool, each replays its own captured
    steps, and every answer equals a plain engine's."""
    net = gpu_model()
    short = GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.3)
    long = GenerationSettings(gen_length=8, block_length=4, policy="threshold", threshold=0.5)
    # One row each (no shrinking onto other caches); 8 + 16 = 16 + 8 positions.
    batches = [(prompts((8,), seed=1), short), (prompts((16,), seed=2), long)]
    plain = Engine(net, cuda_graphs=False)
    expected = [[r.tokens for r in plain.generate(rows, settings)] for rows, settings in batches]
    engine = Engine(net, max_pooled_caches=1)
    captured = []
    for _ in range(2):
        for (rows, settings), tokens in zip(batches, expected, strict=True):
            assert [r.tokens for r in engine.generate(rows, settings)] == tokens
        captured.append(dict(engine.runtime._graphs))
    assert captured[0] == captured[1]  # the second round captured nothing
    assert len({id(entry.cache) for entry in captured[0].values()}) == 1  # one cache served both layouts
    assert len({key[4] for key in captured[0] if key[0] == "block step"}) == 2  # a block step per prompt length


def test_fused_dual_cache_steps_agree_with_unfused_ones() -> None:
    settings = GenerationSettings(gen_length=16, block_length=8, steps=16, policy="fixed", cache="dual",
                                  early_stop=False)
    rows = prompts((4, 6))
    unfused = answers(Engine(gpu_model(), fuse=False).generate(rows, settings))
    fused = answers(Engine(gpu_model()).generate(rows, settings))
    assert (fused == unfused).float().mean() > 0.9  # bf16 rounding of a different matmul shape only


@pytest.mark.parametrize("rows", [32, 1024])  # the unit-scale path and the row-wise scaled one
@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_linear_on_the_gpu_equals_its_rounded_operands(compiled: bool, rows: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(256, 128, device="cuda", generator=generator)
    layer = Fp8Linear(weight.bfloat16())
    x = torch.randn(3, rows, 128, device="cuda", generator=generator).bfloat16()
    row_scales = x.float().abs().amax(-1, keepdim=True) / FP8_MAX
    rounded = (x.float() / row_scales).to(torch.float8_e4m3fn).float() * row_scales
    expected = rounded @ layer.dequantized().T
    run = torch.compile(layer, fullgraph=True) if compiled else layer
    out = run(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, rows, 256)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)  # bf16 output rounding


@pytest.mark.parametrize(("heads", "kv_heads", "queries", "length", "fresh_bias"),
                         [(4, 4, 32, 768, True), (4, 4, 32, 100, False), (8, 2, 24, 130, True), (2, 2, 90, 300, True)])
def test_block_attention_kernel_equals_the_tensor_operations(heads: int, kv_heads: int, queries: int, length: int,
                                                             fresh_bias: bool) -> None:
    """The fused kernel against ``_attend_cache_and_fresh`` in float64 on the same bf16 inputs: cache
    keys hidden by the bias, padding queries' fresh keys hidden, grouped heads (GQA), several row blocks
    (90 queries), key counts not a multiple of the tile, and queries/values as strided views."""
    generator = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=generator).bfloat16()

    batch, dim, lowest = 3, 128, torch.finfo(torch.bfloat16).min
    q = randn(batch, queries, heads, dim).transpose(1, 2)
    cache_k, cache_v = randn(2, batch, kv_heads, length, dim).unbind(0)
    k, v = randn(batch, kv_heads, queries, dim), randn(batch, queries, kv_heads, dim).transpose(1, 2)
    hidden = torch.rand(batch, 1, 1, length, device="cuda", generator=generator) < 0.3
    bias = torch.zeros(batch, 1, 1, length, device="cuda", dtype=torch.bfloat16).masked_fill(hidden, lowest)
    padding = torch.rand(batch, 1, 1, queries, device="cuda", generator=generator) < 0.3
    padding[..., 0] = False
    fresh = (torch.zeros(batch, 1, 1, queries, device="cuda", dtype=torch.bfloat16).masked_fill(padding, lowest)
             if fresh_bias else None)
    assert block_attention.available(q, cache_k)
    out = block_attention.block_attention(q, cache_k, cache_v, bias, k, v, fresh)
    expected = _attend_cache_and_fresh(*(t.double() for t in (q, cache_k, cache_v, bias, k, v)),
                                       None if fresh is None else fresh.double())
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape == (batch, queries, heads * dim)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)  # bf16 probabilities and output


def test_read_only_passes_attend_through_the_kernel_as_through_the_tensor_operations() -> None:
    """``cached_forward``'s read-only pass (block steps) with the fused kernel and with the tensor
    operations: the real queries' logits agree to bf16 rounding (padding queries hidden either way)."""
    net = gpu_model()
    generator = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 400, (2, 24), device="cuda", generator=generator)
    positions = torch.arange(24, device="cuda").expand(2, -1).contiguous()
    cache = KVCache.allocate(net, 2, 24)
    cached_forward(net, ids, positions, cache)  # a refresh fills the cache
    real = torch.ones(2, 8, dtype=torch.bool, device="cuda")
    real[1, 5:] = False
    block = (net, ids[:, 8:16].flip(1), positions[:, 8:16].contiguous(), cache)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fused = cached_forward(*block, write=False, query_mask=real)
        torch.cuda.synchronize()
    assert any(event.name.startswith("block_attention") for event in profile.events())
    block_attention.ENABLED = False
    try:
        plain = cached_forward(*block, write=False, query_mask=real)
    finally:
        block_attention.ENABLED = True
    assert ((fused[real].float() - plain[real].float()).norm() / plain[real].float().norm()).item() < 2e-2


def test_the_block_attention_kernel_serves_gpu_half_precision_and_measured_head_sizes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def serves(dim: int, dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> bool:
        q = torch.empty(1, 2, 4, dim, dtype=dtype, device=device)
        return block_attention.available(q, torch.empty(1, 2, 8, dim, dtype=dtype, device=device))

    assert serves(64) and serves(128) and serves(16, torch.float16)
    assert not serves(96) and not serves(256) and not serves(8)  # not a power of two; beyond what was measured
    assert not serves(128, torch.float32) and not serves(128, device="cpu")
    block_attention.ENABLED = False
    try:
        assert not serves(128)
    finally:
        block_attention.ENABLED = True
    with monkeypatch.context() as patch:  # a Turing card: no bf16 tensor-core products
        patch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(major=7))
        assert not serves(128)


def test_compiled_block_steps_use_the_block_attention_kernel() -> None:
    rows = prompts((5, 9))
    settings = GenerationSettings(gen_length=16, block_length=8, steps=16, policy="fixed", early_stop=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        Engine(gpu_model(), compile=True, cuda_graphs=False).generate(rows, settings)
        torch.cuda.synchronize()
    assert any(event.name.startswith("block_attention") for event in profile.events())


def test_a_scheduler_on_a_worker_thread_captures_graphs_while_other_threads_use_the_gpu() -> None:
    """The server's arrangement: the engine steps on one thread (capturing CUDA graphs of new shapes,
    evicting pooled caches and their graphs) while another thread allocates and frees GPU memory."""
    net = gpu_model()
    scheduler = Scheduler(Engine(net, max_pooled_caches=0), max_batch=4)
    settings = [GenerationSettings(gen_length=16, block_length=8), GenerationSettings(gen_length=32, block_length=8)]
    requests = [scheduler.submit(row, settings[i % 2]) for i, row in enumerate(prompts((3, 5, 7, 9, 4, 6, 8, 10)))]
    stop = threading.Event()

    failure: list[BaseException] = []

    def churn() -> None:
        # Its own generator: a capture claims the default CUDA generator, whose use on another thread
        # during the capture fails (PyTorch: "Offset increment outside graph capture").
        generator = torch.Generator(device="cuda").manual_seed(0)
        try:
            while not stop.is_set():
                torch.randn(1 << 16, device="cuda", generator=generator).sum().item()
        except BaseException as error:  # noqa: BLE001 - re-raised on the test's thread
            failure.append(error)

    other = threading.Thread(target=churn)
    other.start()

    def work() -> None:
        try:
            scheduler.run_until_idle()
            scheduler.engine.release_memory()  # every graph dropped; later captures need fresh pools
            again = scheduler.submit(prompts((5,))[0], settings[0])
            scheduler.run_until_idle()
            assert again.result is not None
        except BaseException as error:  # noqa: BLE001 - re-raised on the test's thread
            failure.append(error)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=300)
    stop.set()
    other.join()
    assert not worker.is_alive() and not failure, failure
    assert all(request.result is not None for request in requests)


# --- deterministic (batch-invariant) mode -----------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 7, 64, 200, 1000])
def test_batch_invariant_matmul_rows_do_not_depend_on_the_row_count(rows: int) -> None:
    """The fixed-tile kernel: each row of a product is the same bits in a product of any number of
    rows (cuBLAS's are not, in general), and close to cuBLAS's value."""
    from llada.model import batch_invariant

    generator = torch.Generator(device="cuda").manual_seed(rows)
    a = torch.randn(1000, 4096, device="cuda", generator=generator).to(torch.bfloat16)
    weight = torch.randn(1536, 4096, device="cuda", generator=generator).to(torch.bfloat16)
    whole = batch_invariant.matmul(a, weight.t())
    part = batch_invariant.matmul(a[-rows:], weight.t())
    assert torch.equal(part, whole[-rows:])
    torch.testing.assert_close(whole.float(), (a.float() @ weight.t().float()), rtol=2e-2, atol=0.5)
    sums = batch_invariant.row_sums(a[-rows:].float())
    assert torch.equal(sums, batch_invariant.row_sums(a.float())[-rows:])


def demo_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Prompts of 1 to 40 tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 41, (count,), generator=generator).tolist()
    return [torch.randint(10, 400, (n,), generator=generator).tolist() for n in lengths]


def assert_batch_invariant(engine: Engine, rows: list[list[int]], settings: GenerationSettings,
                           batch_sizes: tuple[int, ...]) -> None:
    alone = [engine.generate([row], settings)[0].tokens for row in rows]
    generator = torch.Generator().manual_seed(1)
    for size in batch_sizes:
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(rows), size):
            chosen = order[start:start + size]
            got = [r.tokens for r in engine.generate([rows[i] for i in chosen], settings)]
            assert got == [alone[i] for i in chosen], f"batch of {size}: rows {chosen}"


@pytest.mark.parametrize("overrides", [{}, {"cache": "none", "policy": "fixed", "steps": 32}, {"cache": "prefix"},
                                       {"reuse_decided": True}, {"keep_prompt": True, "cfg_scale": 1.0},
                                       {"policy": "fixed", "steps": 24}])
def test_deterministic_mode_answers_are_bit_identical_in_batches_of_1_to_32_in_bf16(overrides: dict) -> None:
    """bf16, CUDA graphs, whole captured steps: every answer alone equals it in batches of 2 to 32
    mixed-length (left-padded) prompts, in shuffled orders."""
    net = gpu_model(n_layers=4)
    settings = GenerationSettings(gen_length=32, block_length=8, threshold=0.5, **overrides)
    engine = Engine(net, deterministic=True)
    assert engine.runtime.cuda_graphs
    assert_batch_invariant(engine, demo_prompts(32), settings, (2, 5, 16, 32))


def test_deterministic_mode_on_the_shipped_demo_model() -> None:
    """The demo model in bf16 with the serving defaults (dual cache, threshold 0.9), 64-token answers:
    the setting in which 3 of 16 default-mode answers changed between batch 1 and 16."""
    from llada.model.loading import DEMO_MODEL
    from llada.model.transformer import LLaDAModel

    net = LLaDAModel.from_pretrained(DEMO_MODEL, dtype=torch.bfloat16, device="cuda").eval()
    settings = GenerationSettings(gen_length=64, block_length=32)
    assert_batch_invariant(Engine(net, deterministic=True), demo_prompts(32, seed=11), settings, (3, 16, 32))


def test_deterministic_mode_survives_scheduler_joins_on_the_gpu() -> None:
    net = gpu_model(n_layers=4)
    rows = demo_prompts(12, seed=3)
    settings = GenerationSettings(gen_length=32, block_length=8, threshold=0.5)
    engine = Engine(net, deterministic=True)
    alone = [engine.generate([row], settings)[0].tokens for row in rows]
    assert answers_joining_one_per_step(engine, rows, settings, max_batch=8, prompt_bucket=64) == alone


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40e9,
                    reason="needs a GPU with 40 GB for the 8B shape")
def test_deterministic_mode_at_the_8b_shape() -> None:
    """Random weights of LLaDA-8B's shape in bf16: answers alone equal those in batches of 4 and 16."""
    from llada.model.config import preset
    from llada.model.transformer import LLaDAModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        net = LLaDAModel(preset("8b")).to(torch.bfloat16).eval()
    settings = GenerationSettings(gen_length=32, block_length=32, threshold=0.9)
    engine = Engine(net, deterministic=True)
    assert_batch_invariant(engine, [[t * 97 % 120000 for t in row] for row in demo_prompts(16, seed=5)],
                           settings, (4, 16))
