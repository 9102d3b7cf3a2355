"""Run benchmark commands as separate processes, several at a time (small models share one GPU well).

Each command writes its own log; a failed command is reported at the end with its log, never
silently dropped, and the others still run.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def run_all(jobs: list[tuple[list[str], Path]], parallel: int) -> None:
    """Run every ``(command, log file)``, at most ``parallel`` at once; SystemExit naming the failures."""
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    running: list[tuple[subprocess.Popen, Path]] = []
    failed: list[str] = []

    def reap(limit: int) -> None:
        while len(running) > limit:
            for process, log in [entry for entry in running if entry[0].poll() is not None]:
                running.remove((process, log))
                if process.returncode:
                    failed.append(f"{' '.join(map(str, process.args))} (exit {process.returncode}; log {log})")
            time.sleep(0.2)

    for command, log in jobs:
        reap(parallel - 1)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stream:
            running.append((subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                             env={**os.environ, "TQDM_DISABLE": "1"}), log))
    reap(0)
    if failed:
        raise SystemExit(f"{len(failed)} of {len(jobs)} runs failed:\n" + "\n".join(failed))
