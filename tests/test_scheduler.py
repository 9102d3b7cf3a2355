"""The request scheduler: requests that arrive at different steps get the engine's own answers."""

from __future__ import annotations

import pytest
import torch
from test_engine import model, prompts

from llada.engine import Engine, GenerationSettings
from llada.scheduler import Scheduler, SchedulerFull

SETTINGS = GenerationSettings(gen_length=16, block_length=4, policy="threshold", threshold=0.3)


def test_requests_joining_between_steps_get_their_single_prompt_answers() -> None:
    net = model()
    engine = Engine(net)
    rows = prompts((3, 6, 4, 5, 7), seed=5)
    expected = [engine.generate([row], SETTINGS)[0] for row in rows]
    scheduler = Scheduler(engine, max_batch=3, prompt_bucket=8)
    first = [scheduler.submit(row, SETTINGS) for row in rows[:2]]
    scheduler.step()
    scheduler.step()
    later = [scheduler.submit(row, SETTINGS) for row in rows[2:]]  # join while the first two decode
    scheduler.step()
    assert len(scheduler.waiting) == 2  # capacity 3: one joined, two wait for rows to leave
    assert len(scheduler.running) == 1  # ... joined the running batch: they share its forward passes
    scheduler.run_until_idle()
    requests = first + later
    assert [r.result.tokens for r in requests] == [e.tokens for e in expected]
    assert all(r.started_at is not None and r.finished_at >= r.started_at for r in requests)


def test_prompts_longer_than_the_room_start_a_new_batch() -> None:
    engine = Engine(model())
    scheduler = Scheduler(engine, prompt_bucket=4)
    short = scheduler.submit(prompts((3,))[0], SETTINGS)
    scheduler.step()
    long = scheduler.submit(prompts((9,), seed=4)[0], SETTINGS)  # room is 4 tokens: cannot join
    scheduler.step()
    assert len(scheduler.running) == 2
    scheduler.run_until_idle()
    assert short.result.tokens == engine.generate([short.prompt], SETTINGS)[0].tokens
    assert long.result.tokens == engine.generate([long.prompt], SETTINGS)[0].tokens


@pytest.mark.parametrize("settings", [SETTINGS, GenerationSettings(**{**SETTINGS.__dict__, "cfg_scale": 1.0})])
def test_batch_grows_when_more_prompts_join_than_it_has_free_rows(settings: GenerationSettings) -> None:
    engine = Engine(model())
    rows = prompts((3, 4, 2, 5, 4), seed=6)
    run = engine.start(rows[:1], settings, prompt_room=6)
    run.advance()
    assert run.add(rows[1:]) == [1, 2, 3, 4] and run.x.shape[0] == 8  # grown to a power of two
    while run.advance():
        pass
    assert [r.tokens for r in run.results()] == [engine.generate([row], settings)[0].tokens for row in rows]
    with pytest.raises(ValueError, match="cannot join"):
        run.add([[1] * 7])


def test_updates_stream_every_step_and_end_finished() -> None:
    scheduler = Scheduler(Engine(model()))
    request = scheduler.submit(prompts((4,))[0], SETTINGS)
    scheduler.run_until_idle()
    updates = list(request.updates)
    assert updates and updates[-1].finished and not any(u.finished for u in updates[:-1])
    decided = sorted(p for u in updates for p in u.decided)
    assert len(decided) == len(set(decided))  # each position decided once
    assert updates[-1].answer[:len(request.result.tokens)] == request.result.tokens


def test_different_settings_run_as_separate_batches() -> None:
    engine = Engine(model())
    scheduler = Scheduler(engine)
    other = GenerationSettings(gen_length=8, block_length=8, policy="fixed", steps=8)
    a = scheduler.submit(prompts((4,))[0], SETTINGS)
    b = scheduler.submit(prompts((5,), seed=2)[0], other)
    scheduler.step()
    assert len(scheduler.running) == 2
    scheduler.run_until_idle()
    assert a.result.tokens == engine.generate([a.prompt], SETTINGS)[0].tokens
    assert b.result.tokens == engine.generate([b.prompt], other)[0].tokens


def test_cancel_and_limits() -> None:
    scheduler = Scheduler(Engine(model()), max_batch=1, max_waiting=1)
    running = scheduler.submit([1, 2, 3], SETTINGS)
    scheduler.step()
    queued = scheduler.submit([4, 5], SETTINGS)
    with pytest.raises(SchedulerFull):
        scheduler.submit([6], SETTINGS)
    scheduler.cancel(queued)
    scheduler.cancel(running)
    scheduler.step()
    assert scheduler.idle and running.done and queued.done and running.result is None
    with pytest.raises(ValueError, match="gen_length"):
        scheduler.submit([1], GenerationSettings(gen_length=6, block_length=4))
    with pytest.raises(ValueError, match="at least one token"):
        scheduler.submit([], SETTINGS)
