"""Post-training in the trainer: DPO / VRPO against a frozen reference, LoRA adapters (with any
objective), their checkpoints, exact resume, several processes, and export with --merge-lora."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from llada.cli.main import main
from llada.model.loading import load
from llada.model.transformer import LLaDAModel
from llada.training.config import load_config
from llada.training.preference_data import build_preference_data
from llada.training.sft_data import build_sft_data
from llada.training.trainer import Trainer

QUESTIONS = [(a, b) for a in range(2, 7) for b in range(2, 6)]  # 20 sums


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, checkpoint_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("post")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a} + {b} =", "chosen": str(a + b), "rejected": str(a * b + 1)})
                             + "\n" for a, b in QUESTIONS))
    build_preference_data([str(pairs)], root / "pairs", checkpoint_dir, progress=False)
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a} + {b} ="},
                                                      {"role": "assistant", "content": str(a + b)}]}) + "\n"
                             for a, b in QUESTIONS))
    build_sft_data([str(chats)], root / "sft", checkpoint_dir, progress=False)
    return root


def recipe(data: Path, checkpoint_dir: Path, out: Path, *extra: str):
    return load_config(None, [f"data.path={data / 'pairs'}", f"model.init_from={checkpoint_dir}", f"out_dir={out}",
                              "objective=vrpo", "batch_size=4", "steps=6", "optim.lr=1e-3", "optim.warmup_steps=0",
                              "optim.schedule=constant", "log_every=1", "eval_every=0", "save_every=3", "device=cpu",
                              "data.eval_fraction=0.2", "preference.budget=2", "spike_factor=0", *extra])


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if not r["skipped"]}


def test_vrpo_starts_at_log_two_and_learns_the_preference(data: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    """Policy = reference at step 1 and antithetic draws share every mask, so every margin is exactly 0
    and the loss exactly log 2; training then separates chosen from rejected on held-out pairs too."""
    records = Trainer(recipe(data, checkpoint_dir, tmp_path / "run", "steps=80", "save_every=0", "eval_every=80",
                             "optim.lr=3e-3", "preference.beta=0.5")).run()
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["reward_margin"] == 0.0
    assert sum(r["loss"] for r in records[-10:]) / 10 < 0.5 * math.log(2)
    assert records[-1]["eval_reward_accuracy"] > 0.5 and records[-1]["eval_reward_margin"] > 0
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"reward_accuracy", "reward_margin", "eval_loss", "eval_reward_accuracy"} <= set(logged)


def test_plain_dpo_draws_independently(data: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    records = Trainer(recipe(data, checkpoint_dir, tmp_path / "run", "objective=dpo", "steps=1")).run()
    assert records[0]["loss"] != pytest.approx(math.log(2), abs=1e-6)  # independent draws: noisy margins at step 1


def test_lora_vrpo_resumes_exactly_and_exports(data: Path, checkpoint_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    base_before = LLaDAModel.from_pretrained(checkpoint_dir).state_dict()
    lora = ["lora.rank=4", "lora.alpha=8"]
    whole = losses(Trainer(recipe(data, checkpoint_dir, tmp_path / "whole", *lora)).run())
    assert whole[1] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the base: adapters start at zero
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-00000006"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file() and not (checkpoint / "model").exists()
    assert (checkpoint / "adapter" / "tokenizer.json").is_file()
    Trainer(recipe(data, checkpoint_dir, tmp_path / "split", *lora, "steps=3")).run()
    resumed = losses(Trainer(recipe(data, checkpoint_dir, tmp_path / "split", *lora)).run())
    assert resumed == {step: whole[step] for step in (4, 5, 6)}
    after = LLaDAModel.from_pretrained(checkpoint_dir).state_dict()
    assert all(torch.equal(after[name], value) for name, value in base_before.items())  # the base is untouched

    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    adapted, _ = load(checkpoint / "adapter", "cpu", "fp32")
    assert main(["export", str(tmp_path / "whole"), str(tmp_path / "merged"), "--merge-lora", "--dtype", "fp32"]) == 0
    merged = LLaDAModel.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, LLaDAModel.from_pretrained(checkpoint_dir)(ids).logits)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert main(["export", str(tmp_path / "whole"), str(tmp_path / "adapter-copy")]) == 0
    assert (tmp_path / "adapter-copy" / "adapter_config.json").is_file()
    capsys.readouterr()
    Trainer(recipe(data, checkpoint_dir, tmp_path / "full", "steps=1")).run()
    assert main(["export", str(tmp_path / "full"), str(tmp_path / "x"), "--merge-lora"]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err


def test_lora_sft_trains_only_the_adapters(data: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(recipe(data, checkpoint_dir, tmp_path / "run", "objective=sft", f"data.path={data / 'sft'}",
                             "lora.rank=2", "lora.targets=[q_proj, v_proj]", "save_every=0"))
    frozen = {name: p.clone() for name, p in trainer.model.named_parameters() if not p.requires_grad}
    adapters = {name: p.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(adapters) and all(".q_proj." in n or ".v_proj." in n for n in adapters)
    records = trainer.run()
    assert all(math.isfinite(r["loss"]) for r in records)
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in frozen.items())
    assert any(not torch.equal(params[name], value) for name, value in adapters.items())


@pytest.mark.parametrize("problem", ["lora.rank=-1", "lora.targets=[wte]", "preference.beta=0",
                                     "preference.budget=3 preference.masks_per_count=2"])
def test_bad_post_training_recipes_name_the_key(data: Path, checkpoint_dir: Path, tmp_path: Path,
                                                problem: str) -> None:
    with pytest.raises(ValueError, match=problem.split(".")[0]):
        recipe(data, checkpoint_dir, tmp_path, *problem.split())
    with pytest.raises(ValueError, match="model.init_from"):
        load_config(None, [f"data.path={data / 'pairs'}", "objective=dpo"])


@pytest.mark.slow  # two processes; .ci/run runs the slow tests too
@pytest.mark.parametrize("rank", [0, 4], ids=["reference-copy", "lora"])
def test_two_gloo_processes_match_one_with_a_reference(data: Path, checkpoint_dir: Path, tmp_path: Path,
                                                       rank: int) -> None:
    """The policy, and the reference (a sharded second copy, or the LoRA base), under FSDP2 on 2 processes."""
    common = [f"data.path={data / 'pairs'}", f"model.init_from={checkpoint_dir}", "objective=vrpo", "batch_size=4",
              "micro_batch_size=2", "optim.lr=1e-3", "optim.schedule=constant", "optim.warmup_steps=0", "log_every=1",
              "eval_every=0", "save_every=0", "device=cpu", "data.eval_fraction=0.2", "preference.budget=2",
              f"lora.rank={rank}", "steps=3"]
    single = losses(Trainer(load_config(None, [*common, f"out_dir={tmp_path / 'one'}"])).run())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(28500 + os.getpid() % 1000), "-m", "llada.cli.main", "train"]
    for item in [*common, f"out_dir={tmp_path / 'two'}"]:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    sharded = {r["step"]: r["loss"] for r in map(json.loads, lines)}
    assert sorted(sharded) == [1, 2, 3]
    for step, loss in sharded.items():
        assert loss == pytest.approx(single[step], rel=1e-4), (step, sharded, single)
