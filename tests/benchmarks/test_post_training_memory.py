"""The shipped 8B post-training recipes run end to end, with LoRA, on a tiny network of the demo
tokenizer (the benchmark that measures their GPU memory, on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_8b_recipes_train_a_few_steps_on_prepared_data(tmp_path: Path) -> None:
    script = [sys.executable, str(ROOT / "benchmarks" / "post_training_memory.py")]
    environment = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run([*script, "prepare", str(tmp_path), "--preset", "tiny", "--tokenizer", str(ROOT / "models/demo"),
                    "--sft-length", "48", "--prompt-length", "12", "--answer-length", "12", "--samples", "12"],
                   check=True, cwd=ROOT, env=environment, capture_output=True)
    subprocess.run([*script, "measure", str(tmp_path), "--steps", "2", "--answer-length", "8", "--out",
                    str(tmp_path / "out.json")], check=True, cwd=ROOT, env=environment, capture_output=True)
    rows = {row["objective"]: row for row in json.loads((tmp_path / "out.json").read_text())["rows"]}
    assert set(rows) == {"sft", "dpo", "vrpo", "grpo"}
    for objective, row in rows.items():
        records = [json.loads(line) for line in (tmp_path / f"run-{objective}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2] and row["tokens_per_s"] > 0
        config = (tmp_path / f"run-{objective}" / "config.yaml").read_text()
        assert "rank: 16" in config and "activation_checkpointing: true" in config
    assert rows["grpo"]["rollout_seconds"] > 0
