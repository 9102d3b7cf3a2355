"""What a training run records for people to read: ``metrics.jsonl`` (and TensorBoard), the
generations of ``samples.jsonl``, and the device peak that MFU is measured against.

Only process 0 writes; the others hold a ``RunLog`` that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

from llada.training.config import METRICS_FILE, SAMPLES_FILE

logger = logging.getLogger(__name__)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, per GPU


class RunLog:
    """Appends per-step records and samples to a run directory."""

    def __init__(self, out_dir: Path, tensorboard: bool, writes: bool) -> None:
        self.out_dir, self.writes = out_dir, writes
        self.writer = self._tensorboard() if tensorboard and writes else None

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ValueError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from error
        return SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def metrics(self, record: dict) -> None:
        """One step's record: a line of metrics.jsonl, and its numbers as TensorBoard scalars."""
        if not self.writes:
            return
        # Strict JSON: a non-finite number (a skipped step's NaN loss) is written as null.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with (self.out_dir / METRICS_FILE).open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
            self.writer.flush()

    def samples(self, rows: list[dict]) -> None:
        """Generations (step, prompt, text) appended to samples.jsonl and logged."""
        if not self.writes:
            return
        with (self.out_dir / SAMPLES_FILE).open("a") as file:
            file.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        for row in rows:
            logger.info("sample at step %d: %r -> %r", row["step"], row["prompt"], row["text"])

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (a resume redoes them: each step is logged once)."""
        if not self.writes:
            return
        for name in (METRICS_FILE, SAMPLES_FILE):
            path = self.out_dir / name
            if not path.is_file():
                continue
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
            if len(kept) < len(lines):
                staged = path.with_name(f".{name}.tmp-{os.getpid()}")
                staged.write_text("".join(kept), encoding="utf-8")
                os.replace(staged, path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    """The per-device peak FLOP/s for MFU: the recipe's ``peak_tflops``, else a known GPU's bf16 peak."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)
    return None


def start_memory_peaks(device: torch.device) -> None:
    """Count this process's peak GPU memory afresh from now (nothing off CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_peaks(device: torch.device) -> dict[str, float]:
    """This process's peak GPU memory since ``start_memory_peaks``, in GiB: tensors allocated
    (``peak_memory_gib``) and memory PyTorch's caching allocator held (``peak_reserved_gib``, closer
    to what must fit the card, less the CUDA context); nothing off CUDA."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
