"""Shared pieces of the engine's tests (and of the tests that run the engine): a tiny model whose
greedy answers vary, random prompts, and an engine that takes the GPU paths on the CPU."""

from __future__ import annotations

import torch
from conftest import tiny_model

from llada.engine.engine import Engine, GenerationSettings
from llada.engine.scheduler import Scheduler

END = 7  # EOS of the test models (a token id their weights emit now and then)


def model(n_layers: int = 2, **overrides):
    """A tiny model whose greedy answers vary (init_std 0.3; the default one predicts one token everywhere).

    Its [MASK] logit is 0, below the largest of the 511 others for all practical inputs: the
    reference sampler would commit a predicted [MASK] (and re-mask it) where the engine never
    proposes one, so exact-equality tests need a model that does not predict it.
    """
    net = tiny_model(init_std=0.3, n_layers=n_layers, eos_token_id=overrides.pop("eos", END), eot_token_id=8,
                     **overrides)
    with torch.no_grad():
        net.ff_out.weight[net.config.mask_token_id] = 0.0
    return net


def prompts(lengths=(5, 5, 5), seed=0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 400, (n,), generator=generator).tolist() for n in lengths]


def graph_engine_on_the_cpu(net, **options) -> Engine:
    """An engine that takes the graph engines' paths (whole captured steps, padded refreshes of some
    rows) while its replays run plainly on the CPU."""
    engine = Engine(net, **options)
    engine.runtime.cuda_graphs = True
    engine.runtime.replay = lambda key, cache, function, inputs, state=(), graph=True: function(*state, *inputs)
    return engine


def answers(results) -> torch.Tensor:
    return torch.stack([r.answer for r in results])


def left_padded(rows: list[list[int]], pad: int = END) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def answers_joining_one_per_step(engine: Engine, rows: list[list[int]], settings: GenerationSettings,
                                 max_batch: int, prompt_bucket: int) -> list[list[int]]:
    """The answers to ``rows`` submitted to a scheduler one per step, so that each joins a batch
    already decoding (or waits for a free row), in submission order."""
    scheduler = Scheduler(engine, max_batch=max_batch, prompt_bucket=prompt_bucket)
    requests = []
    for row in rows:
        requests.append(scheduler.submit(row, settings))
        scheduler.step()
    scheduler.run_until_idle()
    return [request.result.tokens for request in requests]
