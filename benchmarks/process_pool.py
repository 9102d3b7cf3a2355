"""Run benchmark commands as separate processes, several at a time (small models share one GPU well).

Each command writes its own log; a failed command is reported at the end with its log, never
silently dropped, and the others still run. A command stopped by a time limit's SIGTERM (it exits
with ``RESUMABLE_EXIT``, or dies of the signal the pool passed on) is reported as unfinished, not as
failed; running the sweep again resumes or restarts it and appends to the same log. On a machine with
several GPUs the commands are spread over them (each sees one, through ``CUDA_VISIBLE_DEVICES``), so a
sweep's runs go side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

RESUMABLE_EXIT = 75  # sysexits' EX_TEMPFAIL: stopped early, not broken; the same command resumes or restarts it


def exit_unfinished(message: str) -> NoReturn:
    """End a run (or a sweep) that stopped early but is not broken: the message on stderr, and
    ``RESUMABLE_EXIT``, which the pool reports as unfinished rather than failed."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(RESUMABLE_EXIT)


def log_mark() -> str:
    """The line between two segments of one log: the command ran again (from its run's last checkpoint
    if it saved one, otherwise from the start)."""
    return f"--- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: the same command runs again ---\n"


def gpu_list(text: str) -> list[str]:
    """The entries of a comma-separated ``CUDA_VISIBLE_DEVICES``-style list."""
    return [entry.strip() for entry in text.split(",") if entry.strip()]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (its own list if set)."""
    if (listed := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return gpu_list(listed)
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def write_result(path: Path, result: dict) -> None:
    """Write a run's result JSON atomically: a sweep skips every point whose file exists, so a half-written
    one (a run killed mid-write) must never appear."""
    from llada.cli.common import atomic_text_writer

    stream, commit = atomic_text_writer(path)
    stream.write(json.dumps(result, indent=1) + "\n")
    commit()


def run_all(jobs: list[tuple[list[str], Path]], parallel: int, gpus: list[str] | None = None) -> None:
    """Run every ``(command, log file)``, at most ``parallel`` at once. SystemExit if any did not finish:
    status 1 with a message naming them if any failed; otherwise (all only stopped early) the message on
    stderr and ``RESUMABLE_EXIT``, since running the sweep again completes it.

    ``gpus``: each command is shown only the one of these with the fewest commands running (None:
    the environment is passed on as it is).

    SIGTERM (a time limit's ``timeout``, a scheduler) is passed on to the running commands, and the
    pool waits for them to exit before it stops, starting nothing new: a training run gets to save
    its checkpoint rather than being orphaned mid-write."""
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    running: list[tuple[subprocess.Popen, Path, str | None]] = []
    failed: list[str] = []
    resumable: list[str] = []
    stopping = False

    def reap(limit: int) -> None:
        while len(running) > limit:
            for process, log, gpu in [entry for entry in running if entry[0].poll() is not None]:
                running.remove((process, log, gpu))
                # A run killed by the SIGTERM passed on (before its trainer took the signal, or while
                # scoring) lost nothing that a rerun does not redo.
                if process.returncode == RESUMABLE_EXIT or (stopping and process.returncode == -signal.SIGTERM):
                    resumable.append(f"{' '.join(map(str, process.args))} (log {log})")
                elif process.returncode:
                    failed.append(f"{' '.join(map(str, process.args))} (exit {process.returncode}; log {log})")
            time.sleep(0.2)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process, _, _ in running:
            process.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    started = 0
    try:
        for command, log in jobs:
            reap(parallel - 1)
            if stopping:
                break
            log.parent.mkdir(parents=True, exist_ok=True)
            environment = {**os.environ, "TQDM_DISABLE": "1"}
            gpu = min(gpus, key=lambda g: sum(entry[2] == g for entry in running)) if gpus else None
            if gpu is not None:
                environment["CUDA_VISIBLE_DEVICES"] = gpu
            with log.open("a") as stream:  # a resumed run's log keeps its earlier segments
                if stream.tell():
                    stream.write(log_mark())
                    stream.flush()
                running.append((subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=environment),
                                log, gpu))
            started += 1
        reap(0)
    finally:
        signal.signal(signal.SIGTERM, previous)
    report = "".join(f"\n{len(names)} {what}:\n" + "\n".join(names) for what, names in (
        ("exited with an error", failed),
        ("stopped early (the same command resumes or restarts them)", resumable)) if names)
    if stopping or failed or resumable:
        headline = f"stopped by SIGTERM: {started} of {len(jobs)} runs started" if stopping else \
            f"{len(failed) + len(resumable)} of {len(jobs)} runs did not finish"
        if failed:
            raise SystemExit(headline + report)
        exit_unfinished(headline + report)  # nothing failed: the sweep is unfinished, not broken


def add_sweep_arguments(parser: argparse.ArgumentParser, data: str, runs: str, lrs: str, parallel: int) -> None:
    """The options every sweep shares: the grid's objectives, rates and seeds, and where things go."""
    parser.add_argument("--data", type=Path, default=Path(data))
    parser.add_argument("--objectives", default="pretrain,autoregressive")
    parser.add_argument("--lrs", default=lrs)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--parallel", type=int, default=parallel, help="runs at a time (over all GPUs)")
    parser.add_argument("--gpus", help="comma-separated CUDA_VISIBLE_DEVICES entries to spread the runs over "
                                       "(default: every visible GPU)")
    parser.add_argument("--runs", type=Path, default=Path(runs), help="training run directories")
    parser.add_argument("--out-dir", type=Path, required=True, help="one JSON per run; runs already there are "
                                                                     "kept, not repeated")


def run_grid(script: str, grid: dict[str, list[str]], options: list[str], out_dir: Path, parallel: int,
             gpus: str | None = None) -> None:
    """``script run`` once per point of the grid (option name -> values), as ``--name value`` plus
    ``options``, each writing OUT_DIR/<point>.json (e.g. ``pretrain-lr0.001-seed0.json``) and its log;
    points whose JSON exists are skipped, so a study can be spread over several sessions. ``gpus``:
    the ``--gpus`` option (None: every visible GPU)."""
    jobs = []
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        name = "-".join(f"lr{float(v):g}" if k == "lr" else f"seed{v}" if k == "seed" else v for k, v in point.items())
        out = out_dir / f"{name}.json"
        if not out.is_file():
            flags = [part for key, value in point.items() for part in (f"--{key}", value)]
            jobs.append(([sys.executable, script, "run", *flags, *options, "--out", str(out)], out_dir / f"{name}.log"))
    chosen = gpu_list(gpus) if gpus else visible_gpus()
    run_all(jobs, parallel, chosen if gpus or len(chosen) > 1 else None)  # one visible GPU: nothing to spread
