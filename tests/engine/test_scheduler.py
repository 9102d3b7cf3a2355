"""The request scheduler: requests that arrive at different steps get the engine's own answers."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from engine_support import graph_engine_on_the_cpu, model, prompts

from llada.engine.engine import Engine, GenerationSettings
from llada.engine.scheduler import Request, Scheduler, SchedulerFull

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


@pytest.mark.parametrize("settings", [SETTINGS, replace(SETTINGS, cfg_scale=1.0), replace(SETTINGS, keep_prompt=True),
                                      replace(SETTINGS, keep_prompt=True, cfg_scale=1.0),
                                      replace(SETTINGS, reuse_decided=True)])
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


def test_max_waiting_counts_only_requests_without_a_free_row() -> None:
    """max_batch=2, max_waiting=1: before any step the first two will take the free rows, so three
    requests fit and the fourth does not; once both rows run, only one more may wait."""
    scheduler = Scheduler(Engine(model()), max_batch=2, max_waiting=1)
    first = [scheduler.submit([1 + i, 2], SETTINGS) for i in range(3)]
    with pytest.raises(SchedulerFull, match="1 requests are waiting"):
        scheduler.submit([9], SETTINGS)
    scheduler.step()
    assert scheduler.active_rows == 2 and scheduler.free_slots == 0 and len(scheduler.waiting) == 1
    with pytest.raises(SchedulerFull):
        scheduler.submit([9], SETTINGS)
    for request in first:
        scheduler.cancel(request)


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


def _count_forward_rows(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the rows of every forward pass the engine runs (the cost a cancelled row should stop adding)."""
    rows: list[int] = []
    forward = engine.runtime.plain_forward

    def counting(cache, tokens, *args, **kwargs):
        rows.append(tokens.shape[0])
        return forward(cache, tokens, *args, **kwargs)

    monkeypatch.setattr(engine.runtime, "plain_forward", counting)
    return rows


def _steps(scheduler: Scheduler, forward_rows: list[int], n: int) -> list[int]:
    """Step ``n`` times; the rows of each step's widest forward pass (the batch, not a few rows refreshing)."""
    widest = []
    for _ in range(n):
        before = len(forward_rows)
        scheduler.step()
        widest.append(max(forward_rows[before:]))
    return widest


@pytest.mark.parametrize("settings", [replace(SETTINGS, cache="none"), replace(SETTINGS, cache="prefix"), SETTINGS,
                                      replace(SETTINGS, cfg_scale=1.0), replace(SETTINGS, reuse_decided=True)])
def test_a_cancelled_row_leaves_its_batch_and_the_others_keep_their_answers(
        settings: GenerationSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """After one of three running requests is cancelled, the other two get their single-prompt answers
    and the forward passes no longer carry its row (two of three idle-or-live: the batch shrinks)."""
    engine = Engine(model())
    rows = prompts((3, 6, 4), seed=5)
    alone = [engine.generate([row], settings)[0].tokens for row in rows]
    forward_rows = _count_forward_rows(engine, monkeypatch)
    scheduler = Scheduler(engine, prompt_bucket=8)
    first, cancelled, last = [scheduler.submit(row, settings) for row in rows]
    guided = 2 if settings.cfg_scale else 1
    assert _steps(scheduler, forward_rows, 2) == [3 * guided, 3 * guided]
    scheduler.cancel(cancelled)
    updates = len(cancelled.updates)
    assert _steps(scheduler, forward_rows, 3) == [2 * guided] * 3
    scheduler.run_until_idle()
    assert [first.result.tokens, last.result.tokens] == [alone[0], alone[2]]
    assert cancelled.result is None and len(cancelled.updates) == updates
    assert first.updates[-1].finished and last.updates[-1].finished


@pytest.mark.parametrize("settings", [SETTINGS, replace(SETTINGS, cfg_scale=1.0), replace(SETTINGS, reuse_decided=True)])
def test_a_new_request_takes_a_cancelled_rows_slot(settings: GenerationSettings,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A request arriving after a cancel joins the running batch in the freed slot (no new shape) and
    gets its single-prompt answer, as do the rows already decoding."""
    engine = Engine(model())
    rows = prompts((3, 6, 4, 5, 5), seed=5)
    alone = [engine.generate([row], settings)[0].tokens for row in rows]
    forward_rows = _count_forward_rows(engine, monkeypatch)
    scheduler = Scheduler(engine, max_batch=4, prompt_bucket=8)
    requests = [scheduler.submit(row, settings) for row in rows[:4]]
    scheduler.step()
    scheduler.step()
    run = scheduler.running[0].run
    slot = run.rows.ids.index(1)
    scheduler.cancel(requests[1])
    newcomer = scheduler.submit(rows[4], settings)
    scheduler.step()
    assert len(scheduler.running) == 1 and run.x.shape[0] == 4 and run.rows.ids[slot] == 4  # the freed slot
    scheduler.run_until_idle()
    assert max(forward_rows) == 4 * (2 if settings.cfg_scale else 1)  # the batch never grew
    finished: list[Request] = [requests[0], *requests[2:], newcomer]
    assert [r.result.tokens for r in finished] == [alone[0], *alone[2:4], alone[4]]
    assert requests[1].result is None


def test_cancelling_twice_or_after_finishing_is_harmless() -> None:
    """A finished request keeps its result when cancelled; a second cancel changes nothing; the batch
    ends (and its cache goes back to the engine) once its last decoding row is cancelled."""
    engine = Engine(model())
    rows = prompts((3, 6), seed=7)  # the first finishes after 4 steps, the second takes 16
    alone = [engine.generate([row], SETTINGS)[0] for row in rows]
    scheduler = Scheduler(engine)
    quick, slow = [scheduler.submit(row, SETTINGS) for row in rows]
    scheduler.step()
    run = scheduler.running[0].run
    while quick.result is None:
        scheduler.step()
    scheduler.cancel(quick)
    scheduler.cancel(quick)
    assert quick.result.tokens == alone[0].tokens and not run.done
    scheduler.step()
    scheduler.cancel(slow)
    assert scheduler.idle and run.done and run.cache is None and slow.result is None
    scheduler.cancel(slow)
    scheduler.step()
    assert run.result(0).tokens == alone[0].tokens
    with pytest.raises(RuntimeError, match="dropped"):
        run.result(1)
    with pytest.raises(IndexError, match="not in this batch"):
        run.drop(2)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_an_idle_row_left_behind_does_not_disturb_the_rows_that_move_on(cache: str) -> None:
    """A dropped row of four stays in its batch (three still decode: no shrink) at the block it was
    dropped in, while the others move on; with the prefix cache the step's queries then start past
    that row's block, which must not index before them."""
    settings = replace(SETTINGS, cache=cache, policy="fixed", steps=16, early_stop=False)
    engine = Engine(model())
    rows = prompts((3, 6, 4, 5), seed=3)
    alone = [engine.generate([row], settings)[0].tokens for row in rows]
    run = engine.start(rows, settings)
    run.advance()
    run.drop(1)
    while run.advance():
        pass
    assert [run.result(r).tokens for r in (0, 2, 3)] == [alone[r] for r in (0, 2, 3)]


@pytest.mark.parametrize("settings", [SETTINGS, replace(SETTINGS, cfg_scale=1.0), replace(SETTINGS, keep_prompt=True),
                                      replace(SETTINGS, keep_prompt=True, cfg_scale=1.0),
                                      replace(SETTINGS, cache="prefix")])
@pytest.mark.parametrize("small_limit", [False, True])
def test_graph_engines_pad_refreshes_of_some_rows_to_a_power_of_two(
        settings: GenerationSettings, small_limit: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows refreshed apart from their batch (joining it, moving to their next block) run as a captured
    pass padded with copies of the first row; passes over ``CAPTURED_REFRESH_FLOPS`` run uncaptured at
    their own size. Either way each row gets its single-prompt answer (a graph engine simulated on the
    CPU: its replays run plainly)."""
    from llada.engine import passes as batch_passes

    net = model()
    rows = prompts((3, 4, 2, 5, 4, 3), seed=8)
    expected = [Engine(net).generate([row], settings)[0].tokens for row in rows]
    engine = graph_engine_on_the_cpu(net)
    passes: list[tuple[int, bool]] = []  # (rows in the pass, captured) of every refresh of some rows
    plain_replay = engine.runtime.replay

    def replay(key, cache, function, inputs, state=(), graph=True):
        if key[0] == "refresh rows":
            passes.append((len(inputs[0]), graph))
        return plain_replay(key, cache, function, inputs, state, graph)

    engine.runtime.replay = replay
    # The small limit: three rows of the 22 positions (prompt room 6, answer 16) fit, the four that
    # three joining rows are padded to do not.
    monkeypatch.setattr(batch_passes, "CAPTURED_REFRESH_FLOPS", 3 * 22 * net.config.flops_per_token(22) if small_limit
                        else batch_passes.CAPTURED_REFRESH_FLOPS)
    sizes: list[tuple[int, int | None]] = []  # (rows refreshed, rows of the captured pass or None)
    captured_rows = batch_passes.Passes.captured_refresh_rows

    def recording(self, rows, queries, batch):
        sizes.append((rows, captured_rows(self, rows, queries, batch)))
        return sizes[-1][1]

    monkeypatch.setattr(batch_passes.Passes, "captured_refresh_rows", recording)
    run = engine.start(rows[:1], settings, prompt_room=6)
    run.advance()
    run.add(rows[1:4])  # three rows join a batch grown to four: a pass of three rows, padded to four
    run.advance()
    run.add(rows[4:])  # two more: the batch grows to eight, they refresh as a pass of two
    while run.advance():
        pass
    assert [r.tokens for r in run.results()] == expected
    assert len(passes) == len(sizes)
    assert all(graph == (width is not None) and rows_in_pass == (width or rows)
               for (rows_in_pass, graph), (rows, width) in zip(passes, sizes))
    if small_limit:
        assert (3, None) in sizes and any(width is not None for _, width in sizes)  # smaller passes fit
    else:
        assert (3, 4) in sizes and all(width is not None for _, width in sizes)


def test_a_batch_keeps_finished_rows_slots_while_requests_wait_to_join(monkeypatch: pytest.MonkeyPatch) -> None:
    """With requests waiting that fit a running batch, its finished rows' slots stay for them (no shrink
    followed by growth); once nothing waits the batch shrinks as before. Answers stay the engine's own."""
    from llada.engine.batch import BatchRun

    engine = Engine(model())
    rows = prompts((3, 6, 4, 5, 7, 3, 5, 4, 6, 2), seed=9)
    expected = [engine.generate([row], SETTINGS)[0].tokens for row in rows]
    scheduler = Scheduler(engine, max_batch=4, prompt_bucket=8)
    shrinks: list[int] = []  # waiting requests at each shrink
    keep_rows = BatchRun._keep_rows

    def recording(self, live):
        shrinks.append(len(scheduler.waiting))
        return keep_rows(self, live)

    monkeypatch.setattr(BatchRun, "_keep_rows", recording)
    requests = [scheduler.submit(row, SETTINGS) for row in rows]
    batches = set()
    while not scheduler.idle:
        scheduler.step()
        batches |= {id(running.run) for running in scheduler.running}
    assert [r.result.tokens for r in requests] == expected
    assert len(batches) == 1  # every request joined the first batch
    assert all(waiting == 0 for waiting in shrinks) and shrinks  # shrunk only once the queue was empty


def test_held_slots_are_let_go_once_no_request_waits_for_them() -> None:
    """Rows that go idle while the batch holds their slots (a request was waiting) are dropped from the
    batch at the next step once nothing waits any more (here: the waiting request and six running
    ones are cancelled), so the batch does not compute idle rows for the rest of its life."""
    settings = GenerationSettings(gen_length=32, block_length=4, policy="threshold", threshold=0.3)
    engine = Engine(model())
    rows = prompts((3, 4, 5, 6, 3, 5, 2, 7, 4), seed=11)
    scheduler = Scheduler(engine, max_batch=8, prompt_bucket=8)
    running = [scheduler.submit(row, settings) for row in rows[:8]]
    scheduler.step()
    waiting = scheduler.submit(rows[8], settings)  # no capacity left: it waits
    scheduler.step()
    assert scheduler.running[0].run.hold_slots
    for request in [*running[2:], waiting]:
        scheduler.cancel(request)
    scheduler.step()
    if scheduler.running:
        run = scheduler.running[0].run
        assert not run.hold_slots and run.x.shape[0] <= 2 * len(run.rows.live())
    scheduler.run_until_idle()
    assert [r.result.tokens for r in running[:2]] == [engine.generate([row], settings)[0].tokens for row in rows[:2]]


def test_only_the_batch_the_next_request_joins_holds_its_slots() -> None:
    """With two running batches that could both take the queue's head, the scheduler gives freed slots
    to the first (FIFO admission): only that one holds its idle rows."""
    engine = Engine(model())
    scheduler = Scheduler(engine, max_batch=4, prompt_bucket=8)
    first = scheduler.submit(prompts((3,), seed=1)[0], SETTINGS)
    scheduler.step()  # batch A, prompt room 8
    scheduler.submit(prompts((12,), seed=2)[0], SETTINGS)  # too long for A: batch B, room 16
    scheduler.step()
    for prompt in prompts((3, 3, 3), seed=3):  # fit both batches; A (first in line) takes the two free rows
        scheduler.submit(prompt, SETTINGS)
    scheduler.step()
    assert len(scheduler.waiting) == 1 and len(scheduler.running) == 2
    assert [r.run.hold_slots for r in scheduler.running] == [True, False]
    scheduler.run_until_idle()
    assert first.result.tokens == engine.generate([first.prompt], SETTINGS)[0].tokens


def test_a_prefix_cache_batch_takes_no_new_row_once_its_rows_left_their_first_block() -> None:
    """Prefix-cache steps query from the rows' earliest block on: a row joining at block 0 would have
    the others' decided blocks recomputed. Such a batch refuses new rows; the scheduler starts a new
    batch for them, and every answer stays the single-prompt one."""
    settings = replace(SETTINGS, cache="prefix")
    engine = Engine(model())
    rows = prompts((3, 4), seed=5)
    run = engine.start(rows[:1], settings, prompt_room=6)
    assert run.can_add(rows[1], settings)  # every row still in its first block
    while run.rows.block[0] == 0:
        run.advance()
    assert not run.can_add(rows[1], settings)
    with pytest.raises(ValueError, match="prefix-cache rows have left their first block"):
        run.add(rows[1:])
    scheduler = Scheduler(engine, prompt_bucket=8)
    requests = [scheduler.submit(rows[0], settings)]
    while scheduler.running[0].run.rows.block[0] == 0 if scheduler.running else not requests[0].done:
        scheduler.step()
    requests.append(scheduler.submit(rows[1], settings))
    scheduler.step()
    assert len(scheduler.running) == 2  # a batch of its own
    scheduler.run_until_idle()
    assert [r.result.tokens for r in requests] == [engine.generate([row], settings)[0].tokens for row in rows]


@pytest.mark.parametrize("settings", [SETTINGS, replace(SETTINGS, cfg_scale=1.0, keep_prompt=True),
                                      replace(SETTINGS, reuse_decided=True), replace(SETTINGS, cache="prefix"),
                                      replace(SETTINGS, policy="fixed", steps=8, refresh_every=1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_joins_and_drops_leave_every_answer_as_decoded_alone(settings: GenerationSettings, seed: int) -> None:
    """A random schedule of rows joining (when the batch can take them), rows dropped and slots held,
    on a graph engine's paths: every row that finishes has its single-prompt answer."""
    rng = random.Random(seed)
    net = model()
    plain = Engine(net)
    engine = graph_engine_on_the_cpu(net)
    room = 7
    rows = prompts(tuple(rng.randint(1, room) for _ in range(rng.randint(1, 5))), seed=seed)
    run = engine.start(rows, settings, prompt_room=room)
    dropped: set[int] = set()
    for step in range(200):
        if run.done:
            break
        run.hold_slots = rng.random() < 0.5
        action = rng.random()
        if action < 0.3 and step < 20:
            joining = prompts(tuple(rng.randint(1, room) for _ in range(rng.randint(1, 4))), seed=100 * seed + step)
            if run.can_add(joining[0], settings):
                assert run.add(joining) == list(range(len(rows), len(rows) + len(joining)))
                rows += joining
        elif action < 0.4:
            live = [r for r in range(len(rows)) if not run.rows.finished[r] and not run.rows.dropped[r]]
            if live:
                victim = rng.choice(live)
                dropped.add(victim)
                run.drop(victim)
        run.advance()
    assert run.done
    kept = [r for r in range(len(rows)) if r not in dropped]
    assert [run.result(r).tokens for r in kept] == [plain.generate([rows[r]], settings)[0].tokens for r in kept]
