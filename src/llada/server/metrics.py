"""The server's counters, gauges and step-latency histogram, written in the Prometheus text format.

Hand-written: a few metric types over a lock are all a single-process server needs, and the
exposition format is plain text. Updated from the event loop (requests) and the worker thread (steps).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

# Seconds; a CPU step of a small model takes milliseconds, an 8B batch on a GPU tens of them.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, escaped)) + "}"


class Metrics:
    """All of the server's metrics; ``render()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, tuple[str, tuple[str, ...], dict[tuple[str, ...], float]]] = {}
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self._step_counts = [0] * (len(STEP_BUCKETS) + 1)
        self._step_sum = 0.0
        self.counter("llada_requests_total", "HTTP requests answered, by endpoint and status code",
                     ("endpoint", "status"))
        self.counter("llada_requests_cancelled_total", "Requests stopped before their answer was complete, by reason "
                     "(disconnect, timeout, error, shutdown)", ("reason",))
        self.counter("llada_requests_finished_early_total", "Answers complete before the engine had decoded their "
                     "whole canvas (end-of-text, a stop sequence or max_tokens decided): the rest was not decoded")
        self.counter("llada_prompt_tokens_total", "Prompt tokens of answered requests")
        self.counter("llada_completion_tokens_total", "Answer tokens returned (up to the end of the answer)")
        self.counter("llada_scheduler_steps_total", "Scheduler steps run (each advances every running batch once)")
        self.counter("llada_scheduler_rows_total", "Request rows advanced, summed over steps (rows / steps = mean "
                     "batch)")

    def counter(self, name: str, help_text: str, label_names: tuple[str, ...] = ()) -> None:
        """Declare a counter, so that it is listed (at 0) before anything has counted it."""
        self._counters[name] = (help_text, label_names, {})

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """A value read at scrape time (queue depth, active rows)."""
        self._gauges[name] = (help_text, read)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add to a declared counter; every declared label must be given (a missing one is a KeyError,
        a bug here rather than a silently unlabelled sample). Safe from any thread."""
        _, names, values = self._counters[name]
        key = tuple(labels[n] for n in names)
        with self._lock:
            values[key] = values.get(key, 0.0) + amount

    def observe_step(self, seconds: float, rows: int) -> None:
        """Record one scheduler step: its time in the histogram, and the step and its rows in the counters,
        under one lock so that a scrape never sees rows / steps from different steps."""
        with self._lock:
            self._step_counts[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
            self._step_sum += seconds
            key = ()
            for name, amount in (("llada_scheduler_steps_total", 1), ("llada_scheduler_rows_total", rows)):
                values = self._counters[name][2]
                values[key] = values.get(key, 0.0) + amount

    def render(self) -> str:
        """The ``/metrics`` body in the Prometheus text format (0.0.4). Counters and the histogram are written
        under the lock, so one scrape sees one moment; gauges are read after it, as they read other objects."""
        lines: list[str] = []
        with self._lock:
            for name, (help_text, names, values) in self._counters.items():
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
                if not names and not values:
                    values = {(): 0.0}
                lines += [f"{name}{_labels(names, key)} {_number(value)}" for key, value in sorted(values.items())]
            lines += ["# HELP llada_step_seconds Wall-clock time of one scheduler step",
                      "# TYPE llada_step_seconds histogram"]
            cumulative = 0
            for bound, count in zip(STEP_BUCKETS + (float("inf"),), self._step_counts):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'llada_step_seconds_bucket{{le="{le}"}} {cumulative}')
            lines += [f"llada_step_seconds_sum {self._step_sum:.6f}", f"llada_step_seconds_count {cumulative}"]
        for name, (help_text, read) in self._gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_number(read())}"]
        return "\n".join(lines) + "\n"
