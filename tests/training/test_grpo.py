"""diffu-GRPO in the trainer: prompt data, rollouts and rewards, learning a rewarded behaviour,
exact resume in the middle of a cycle of inner steps, failing rewards, and 2 processes = 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llada.cli.main import main
from llada.model.tokenizer import Tokenizer
from llada.training.config import load_config
from llada.training.corpus import CorpusError
from llada.training.prompt_data import PromptDataset, build_prompt_data
from llada.training.rewards import RewardError
from llada.training.trainer import Trainer

REWARDS = '''
def letter_e(completion, record):
    """The share of the completion's characters that are "e": something a tiny model can learn."""
    return completion.count("e") / max(len(completion), 1)


def broken(completion, record):
    raise RuntimeError("no judge")
'''


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory, checkpoint_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("grpo")
    (root / "grpo_test_rewards.py").write_text(REWARDS)
    lines = [json.dumps({"prompt": f"{a} + {b} =", "answer": str(a + b)}) for a in range(6) for b in range(4)]
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    build_prompt_data([str(root / "questions.jsonl")], root / "prompts", checkpoint_dir, progress=False)
    return root


@pytest.fixture()
def rewards_on_path(prompts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(prompts))


def recipe(prompts: Path, checkpoint_dir: Path, out: Path, *extra: str):
    return load_config(None, [f"data.path={prompts / 'prompts'}", f"model.init_from={checkpoint_dir}",
                              f"out_dir={out}", "objective=grpo", "batch_size=4", "steps=6", "device=cpu",
                              "log_every=1", "eval_every=0", "save_every=0", "data.eval_fraction=0.2",
                              "optim.lr=3e-3", "optim.warmup_steps=0", "optim.schedule=constant",
                              "rl.group_size=4", "rl.rewards=[grpo_test_rewards:letter_e]",
                              "rl.rollout={gen_length: 8, block_length: 8, temperature: 1.0}", *extra])


def test_prompt_data_keeps_records_and_names_bad_lines(prompts: Path, checkpoint_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    dataset = PromptDataset(prompts / "prompts")
    ids, record = dataset[5]
    assert record == {"prompt": "1 + 1 =", "answer": "2"} and len(dataset) == 24
    tokenizer = Tokenizer.from_pretrained(checkpoint_dir)
    assert ids.tolist() == tokenizer.encode_chat([{"role": "user", "content": "1 + 1 ="}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"answer": "no prompt"}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2: .*messages"):
        build_prompt_data([str(bad)], tmp_path / "out", checkpoint_dir, progress=False)
    assert main(["data", "prompts", str(bad), "--tokenizer", str(checkpoint_dir), "--output", str(tmp_path / "out"),
                 "--on-error", "skip"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 1


@pytest.mark.usefixtures("rewards_on_path")
def test_grpo_raises_a_learnable_reward(prompts: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    records = Trainer(recipe(prompts, checkpoint_dir, tmp_path / "run", "steps=40", "optim.lr=1e-2",
                             "rl.inner_steps=2", "eval_every=40")).run()
    rewards = [r["reward_mean"] for r in records[::2]]  # one batch of rollouts per two inner steps
    assert all(r["reward_mean"] == r2["reward_mean"] for r, r2 in zip(records[::2], records[1::2]))
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.05, rewards
    assert {"kl", "clip_fraction", "rollout_tokens_per_s", "rollout_seconds", "zero_variance_groups",
            "reward_grpo_test_rewards:letter_e", "eval_reward_mean"} <= set(records[-1]) | set(records[-2])
    # A step that makes rollouts times them too: its wall time is at least the rollouts' time.
    assert all(r["step_seconds"] >= r["rollout_seconds"] > 0 for r in records[::2])
    # On the CPU the engine's numerics and the update's are the same float32 forward pass.
    assert all(r["logprob_mismatch"] == 0 for r in records)


@pytest.mark.usefixtures("rewards_on_path")
def test_resume_in_the_middle_of_a_cycle_is_exact(prompts: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    cycle = ["rl.inner_steps=2", "save_every=3", "lora.rank=2"]  # step 3 is the middle of a cycle
    whole = {r["step"]: r["loss"] for r in Trainer(recipe(prompts, checkpoint_dir, tmp_path / "a", *cycle)).run()}
    Trainer(recipe(prompts, checkpoint_dir, tmp_path / "b", *cycle, "steps=3")).run()
    resumed = {r["step"]: r["loss"] for r in Trainer(recipe(prompts, checkpoint_dir, tmp_path / "b", *cycle)).run()}
    assert resumed == {step: whole[step] for step in (4, 5, 6)}
    assert any(loss != 0 for loss in whole.values())


@pytest.mark.usefixtures("rewards_on_path")
def test_a_failing_reward_stops_the_run_with_the_sample(prompts: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RewardError, match=r"reward grpo_test_rewards:broken raised RuntimeError: no judge on "
                                          r"sample 0 \(completion .*record \{'prompt'"):
        Trainer(recipe(prompts, checkpoint_dir, tmp_path / "run", "rl.rewards=[grpo_test_rewards:broken]")).run()
    with pytest.raises(ValueError, match="rl.rollout: unknown generation setting"):
        recipe(prompts, checkpoint_dir, tmp_path / "run", "rl.rollout={gen_lenght: 8}")


@pytest.mark.slow  # two processes; .ci/run runs the slow tests too
def test_two_gloo_processes_match_one(prompts: Path, checkpoint_dir: Path, tmp_path: Path) -> None:
    """Under FSDP2 the rollouts come from the reference sampler (fixed steps keep the processes in
    step); 2 processes give the losses and rewards of 1."""
    common = [f"data.path={prompts / 'prompts'}", f"model.init_from={checkpoint_dir}", "objective=grpo",
              "batch_size=4", "micro_batch_size=1", "steps=4", "device=cpu", "log_every=1", "eval_every=0",
              "save_every=0", "data.eval_fraction=0.2", "optim.lr=3e-3", "optim.warmup_steps=0", "fsdp=true",
              "rl.group_size=2", "rl.inner_steps=2", "rl.rewards=[grpo_test_rewards:letter_e]",
              "rl.rollout={gen_length: 4, block_length: 4, temperature: 1.0, policy: fixed}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(prompts), *sys.path])}
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
                   str(27500 + os.getpid() % 1000 + processes), "-m", "llada.cli.main", "train"]
        for item in [*common, f"out_dir={out}"]:
            command += ["--set", item]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for one, two in zip(runs[1], runs[2], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-7), (one, two)
        assert two.get("reward_mean") == pytest.approx(one.get("reward_mean")), (one, two)


def test_logprob_mismatch_is_the_mean_token_difference_of_the_two_passes(checkpoint_dir: Path) -> None:
    """Against full logits: two models standing for the engine's and the update's numerics."""
    import contextlib

    import torch

    from llada.diffusion.policy_gradient import Rollouts, completion_mask
    from llada.model.transformer import LLaDAModel
    from llada.training.rollouts import RolloutMaker

    sampled, trained = LLaDAModel.from_pretrained(checkpoint_dir), LLaDAModel.from_pretrained(checkpoint_dir)
    with torch.no_grad():
        trained.ln_f.weight.mul_(1.5)
    tokenizer = Tokenizer.from_pretrained(checkpoint_dir)
    config = load_config(None, [f"data.path={checkpoint_dir}", f"model.init_from={checkpoint_dir}", "rl.rewards=[exact_answer]"])
    maker = RolloutMaker(sampled, trained, trained, tokenizer, config, False, contextlib.nullcontext)
    generator = torch.Generator().manual_seed(0)
    completions = torch.randint(0, 300, (3, 5), generator=generator)
    completions[1, 2] = tokenizer.ids.eos
    rollouts = Rollouts(torch.randint(0, 300, (3, 4), generator=generator), torch.ones(3, 4, dtype=torch.bool),
                        completions, completion_mask(completions, (tokenizer.ids.eos,)))
    ids = torch.cat([rollouts.prompts, torch.full_like(completions, sampled.config.mask_token_id)], dim=1)
    with torch.no_grad():
        log_probs = [model(ids).logits[:, 4:].log_softmax(-1).gather(-1, completions[..., None]).squeeze(-1)
                     for model in (sampled, trained)]
    real = rollouts.completion_real
    expected = ((log_probs[0] - log_probs[1]).abs() * real).sum() / real.sum()
    assert maker._mismatch(rollouts) == pytest.approx(expected.item(), rel=1e-3, abs=1e-6) and expected > 1e-3
