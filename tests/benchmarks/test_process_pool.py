"""Benchmark sweeps run every command; a failure is named with its log, and does not stop the rest."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from process_pool import RESUMABLE_EXIT, run_all


def test_every_command_runs_and_failures_are_named(tmp_path: Path) -> None:
    def job(name: str, code: str) -> tuple[list[str], Path]:
        return [sys.executable, "-c", code], tmp_path / f"{name}.log"

    jobs = [job("a", "print('done a')"), job("bad", "import sys; print('oops'); sys.exit(3)"), job("c", "print('done c')")]
    with pytest.raises(SystemExit, match=r"1 of 3 runs did not finish\n1 exited with an error:\n.*exit 3; log .*bad\.log"):
        run_all(jobs, parallel=2)
    assert (tmp_path / "a.log").read_text() == "done a\n" and (tmp_path / "c.log").read_text() == "done c\n"
    assert (tmp_path / "bad.log").read_text() == "oops\n"
    run_all([job("d", "print(1)")], parallel=1)
    with pytest.raises(ValueError, match="at least 1"):
        run_all([], parallel=0)


def test_a_run_stopped_with_a_checkpoint_is_resumable_not_failed_and_its_log_grows(tmp_path: Path) -> None:
    """Exit RESUMABLE_EXIT: named apart from failures; running it again appends to the same log."""
    code = ("import pathlib, sys; state = pathlib.Path(sys.argv[1]); done = state.exists(); state.touch(); "
            f"print('finished' if done else 'stopped'); sys.exit(0 if done else {RESUMABLE_EXIT})")
    jobs = [([sys.executable, "-c", code, str(tmp_path / "state")], tmp_path / "run.log"),
            ([sys.executable, "-c", "import sys; sys.exit(2)"], tmp_path / "bad.log")]
    with pytest.raises(SystemExit) as stopped:
        run_all(jobs, parallel=2)
    message = str(stopped.value)
    assert message.startswith("2 of 2 runs did not finish")
    assert "1 exited with an error:\n" in message and "exit 2; log" in message
    assert "1 stopped early (the same command resumes or restarts them):\n" in message and "run.log" in message
    run_all(jobs[:1], parallel=1)  # the second segment finishes
    first, mark, second = (tmp_path / "run.log").read_text().splitlines()
    assert (first, second) == ("stopped", "finished")
    assert re.fullmatch(r"--- \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S*: the same command runs again ---", mark)


def test_a_run_killed_by_a_signal_is_a_failure_unless_the_pool_is_stopping(tmp_path: Path) -> None:
    jobs = [([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"], tmp_path / "k.log")]
    with pytest.raises(SystemExit, match=r"1 exited with an error:\n.*exit -15"):
        run_all(jobs, parallel=1)


def test_a_sweep_with_only_resumable_runs_exits_resumable(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Nothing failed, so the sweep is unfinished rather than broken: it exits RESUMABLE_EXIT too."""
    jobs = [([sys.executable, "-c", f"import sys; sys.exit({RESUMABLE_EXIT})"], tmp_path / "run.log")]
    with pytest.raises(SystemExit) as stopped:
        run_all(jobs, parallel=1)
    assert stopped.value.code == RESUMABLE_EXIT
    assert "1 of 1 runs did not finish\n1 stopped early" in capsys.readouterr().err


def test_a_grid_runs_each_point_once_with_its_options_and_skips_finished_points(tmp_path: Path) -> None:
    script = tmp_path / "study.py"
    script.write_text("import json, sys\nargs = sys.argv[1:]\nout = args[args.index('--out') + 1]\n"
                      "open(out, 'w').write(json.dumps(args))\n")
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    (out_dir / "b-lr0.003-seed0.json").write_text("finished earlier")
    grid = {"objective": ["a", "b"], "lr": ["1e-3", "3e-3"], "seed": ["0"]}
    from process_pool import run_grid

    run_grid(str(script), grid, ["--data", "d"], out_dir, parallel=3)
    names = sorted(path.name for path in out_dir.glob("*.json"))
    assert names == ["a-lr0.001-seed0.json", "a-lr0.003-seed0.json", "b-lr0.001-seed0.json", "b-lr0.003-seed0.json"]
    assert (out_dir / "b-lr0.003-seed0.json").read_text() == "finished earlier"
    assert json.loads((out_dir / "a-lr0.003-seed0.json").read_text()) == [
        "run", "--objective", "a", "--lr", "3e-3", "--seed", "0", "--data", "d", "--out", str(out_dir / "a-lr0.003-seed0.json")]


@pytest.mark.parametrize("on_sigterm, status", [
    ("open(sys.argv[1], 'w').write('saved'); sys.exit(0)", RESUMABLE_EXIT),  # saves and ends cleanly
    (("open(sys.argv[1], 'w').write('saved'); signal.signal(signal.SIGTERM, signal.SIG_DFL); "
      "os.kill(os.getpid(), signal.SIGTERM)"), RESUMABLE_EXIT),  # dies of the signal passed on: unfinished
    ("open(sys.argv[1], 'w').write('saved'); sys.exit(2)", 1),  # a real failure is never hidden
])
def test_sigterm_lets_running_commands_save_and_starts_nothing_new(tmp_path: Path, on_sigterm: str,
                                                                   status: int) -> None:
    """A time limit's SIGTERM reaches the running command; the pool waits for it and does not start the
    queued ones. The sweep exits resumable unless a run failed."""
    import os
    import signal
    import subprocess
    import time

    command = ("import os, signal, sys, time\n"
               f"def save(*_):\n    {on_sigterm}\n"
               "signal.signal(signal.SIGTERM, save)\n"
               "open(sys.argv[1] + '.started', 'w').close()\n"
               "time.sleep(60)\n")
    pool = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from process_pool import run_all\n"
            "folder = Path(sys.argv[2]); code = sys.argv[3]\n"
            "run_all([([sys.executable, '-c', code, str(folder / name)], folder / f'{name}.log') for name in 'abc'], 1)\n")
    benchmarks = str(Path(__file__).resolve().parents[2] / "benchmarks")
    # Its own session: the signal goes to the pool alone, not to a process group (the pool must forward it).
    process = subprocess.Popen([sys.executable, "-c", pool, benchmarks, str(tmp_path), command],
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "a.started").exists():
        assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGTERM)
    _, error = process.communicate(timeout=30)
    assert process.returncode == status and "stopped by SIGTERM: 1 of 3 runs started" in error
    assert ("exited with an error" in error) == (status == 1)
    assert (tmp_path / "a").read_text() == "saved"
    assert not (tmp_path / "b.started").exists() and not (tmp_path / "c.started").exists()


def test_commands_are_spread_over_the_gpus_given(tmp_path: Path) -> None:
    """Each command sees one GPU, the one with the fewest commands running when it starts."""
    code = ("import os, sys, time; open(sys.argv[1], 'w').write(os.environ['CUDA_VISIBLE_DEVICES']); "
            "time.sleep(float(sys.argv[2]))")
    jobs = [([sys.executable, "-c", code, str(tmp_path / name), seconds], tmp_path / f"{name}.log")
            for name, seconds in (("a", "2"), ("b", "0"), ("c", "4"), ("d", "0"))]
    run_all(jobs, parallel=2, gpus=["5", "7"])
    seen = {name: (tmp_path / name).read_text() for name in "abcd"}
    # a -> 5 and b -> 7 at once; b ends first, so c takes 7 beside a; a ends next, so d takes 5.
    assert seen == {"a": "5", "b": "7", "c": "7", "d": "5"}


def test_visible_gpus_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from process_pool import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
