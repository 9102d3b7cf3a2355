"""The trainer: learning, exact resume, fault handling (NaN rollback, failed saves, SIGTERM), all objectives."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS

import llada.training.trainer as train_module
from llada.cli.main import main
from llada.diffusion.losses import Loss
from llada.model.tokenizer import Tokenizer
from llada.model.transformer import LLaDAModel
from llada.training.config import load_config
from llada.training.packing import tokenize_corpus
from llada.training.sft_data import build_sft_data
from llada.training.trainer import Trainer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    root = tmp_path_factory.mktemp("train")
    tokenizer.save_pretrained(root / "tok")
    (root / "corpus").mkdir()
    for i in range(8):
        (root / "corpus" / f"{i}.txt").write_text(" ".join(CORPUS[(i + j) % len(CORPUS)] for j in range(4)))
    tokenize_corpus([str(root / "corpus" / "*.txt")], root / "packed", root / "tok", workers=1, progress=False)
    chats = root / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {w}"},
                                                        {"role": "assistant", "content": w}]})
                               for w in ("fox", "dog", "earth", "heaven", "question", "nobler")) + "\n")
    build_sft_data([str(chats)], root / "sft", root / "tok", progress=False)
    return root


def recipe(workspace: Path, out: Path, *extra: str):
    return load_config(None, [f"data.path={workspace / 'packed'}", f"model.tokenizer={workspace / 'tok'}",
                              f"out_dir={out}", "data.seq_len=32", "batch_size=4", "steps=6", "optim.lr=3e-3",
                              "optim.warmup_steps=2", "log_every=1", "eval_every=0", "save_every=3", "device=cpu",
                              "data.eval_fraction=0.1", *extra])


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if not r["skipped"]}


def test_pretraining_learns(workspace: Path, tmp_path: Path) -> None:
    config = recipe(workspace, tmp_path / "run", "steps=40", "save_every=0", "eval_every=40", "batch_size=8")
    records = Trainer(config).run()
    first, last = sum(r["loss"] for r in records[:5]) / 5, sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.75 * first
    assert math.isfinite(records[-1]["eval_loss"])
    assert records[-1]["eval_perplexity_bound"] == pytest.approx(math.exp(records[-1]["eval_loss"]))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 41))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000040"
    saved = LLaDAModel.from_pretrained(checkpoint / "model")
    assert saved.config.n_layers == 2
    assert Tokenizer.from_pretrained(checkpoint / "model").ids.mask == saved.config.mask_token_id


def test_evaluating_another_dataset_is_the_split_when_given_the_split(workspace: Path, tmp_path: Path) -> None:
    """evaluate(dataset) scores other data the way the held-out split is scored: handed exactly the
    split's windows it gives the split's loss; handed other windows, another loss."""
    trainer = Trainer(recipe(workspace, tmp_path / "run", "eval_batches=3"))
    split = torch.utils.data.Subset(trainer.dataset, trainer.eval_indices)
    assert trainer.evaluate(split)["eval_loss"] == trainer.evaluate()["eval_loss"]
    others = torch.utils.data.Subset(trainer.dataset, range(len(trainer.eval_indices)))
    assert trainer.evaluate(others)["eval_loss"] != trainer.evaluate()["eval_loss"]
    assert trainer.evaluate(split, batches=1)["eval_loss"] != trainer.evaluate()["eval_loss"]


def test_resume_reproduces_losses_exactly(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash a step after the step-3 checkpoint, resume, and get the uninterrupted run's losses bit for
    bit; metrics.jsonl records each step once (the redone step 4 replaces the lost one)."""
    uninterrupted = losses(Trainer(recipe(workspace, tmp_path / "a", "micro_batch_size=2")).run())
    original = Trainer.train_step

    def crashing(self):
        if self.step == 4 + 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(KeyboardInterrupt):
        Trainer(recipe(workspace, tmp_path / "b", "micro_batch_size=2")).run()
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = losses(Trainer(recipe(workspace, tmp_path / "b", "micro_batch_size=2")).run())
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == uninterrupted[s] for s in resumed), (resumed, uninterrupted)
    assert list(logged_losses(tmp_path / "b")) == [1, 2, 3, 4, 5, 6]
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 6


def test_nan_losses_skip_then_roll_back(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Trainer._loss
    poisoned = {"left": 3}

    def poisoning(self, batch, generator):
        loss = original(self, batch, generator)
        if self.step == 4 and poisoned["left"] > 0:
            poisoned["left"] -= 1
            return Loss(value=loss.value * float("nan"), n_masked=loss.n_masked, n_tokens=loss.n_tokens)
        return loss

    monkeypatch.setattr(Trainer, "_loss", poisoning)
    trainer = Trainer(recipe(workspace, tmp_path / "run", "max_bad_steps=3"))
    records = trainer.run()
    skipped = [r for r in records if r["skipped"]]
    assert len(skipped) == 3 and skipped[-1].get("rollback")
    assert trainer.step == 6 and trainer.lr_scale == 0.5
    assert [r["step"] for r in records if not r["skipped"]] == [1, 2, 3, 4, 4, 5, 6]  # step 4 redone after rollback
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    # metrics.jsonl is strict JSON (a NaN loss is null) and holds every skipped step, once
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl")) for line in lines]
    assert sum(r["skipped"] for r in logged) == 3 and all(r["loss"] is None for r in logged if r["skipped"])


def test_rollback_without_checkpoint_is_an_error(workspace: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Trainer, "_is_bad", lambda self, loss, norm: True)
    with pytest.raises(train_module.TrainingError, match="2 bad steps in a row and no checkpoint to roll back to"):
        Trainer(recipe(workspace, tmp_path / "run", "max_bad_steps=2")).run()


def test_failed_save_leaves_previous_checkpoints(workspace: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(recipe(workspace, tmp_path / "run", "save_every=1", "steps=4"))
    saves = {"count": 0}
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        saves["count"] += 1
        if saves["count"] == 3:
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(train_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.run()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000001", "step-00000002"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_keep_last_and_stop_signals(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    signum: int) -> None:
    """SIGTERM and Ctrl-C both save at the end of the step and stop, without a traceback."""
    original = Trainer.train_step

    def interrupted(self):
        if self.step == 4:
            os.kill(os.getpid(), signum)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    trainer = Trainer(recipe(workspace, tmp_path / "run", "save_every=3", "keep_last=2", "steps=10"))
    trainer.run()
    assert trainer.step == 5
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000003", "step-00000005"]
    assert signal.getsignal(signum) is not trainer._request_stop


def test_a_second_ctrl_c_interrupts_at_once(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = Trainer.train_step

    def interrupted(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    trainer = Trainer(recipe(workspace, tmp_path / "run", "save_every=0", "steps=10"))
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found is back


@pytest.mark.parametrize("objective", ["sft", "autoregressive", "autoregressive_sft"])
def test_other_objectives_train(workspace: Path, tmp_path: Path, objective: str) -> None:
    data = workspace / ("sft" if objective.endswith("sft") else "packed")
    records = Trainer(recipe(workspace, tmp_path / "run", f"objective={objective}", f"data.path={data}",
                             "data.eval_fraction=0.2", "eval_every=3", "sample_every=6", "sample_length=4",
                             "sample_prompts=[Hi]")).run()
    assert len(losses(records)) == 6 and all(math.isfinite(r["loss"]) for r in records)
    assert math.isfinite(records[2]["eval_loss"])
    assert (tmp_path / "run" / "samples.jsonl").read_text().count("\n") == 1  # each objective's own sampler


def test_cli_train_and_export(workspace: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"data:\n  path: {workspace / 'packed'}\n  seq_len: 32\nmodel:\n  tokenizer: "
                           f"{workspace / 'tok'}\nsteps: 3\nbatch_size: 4\ndevice: cpu\nout_dir: {tmp_path / 'run'}\n")
    assert main(["train", str(recipe_file), "--set", "optim.warmup_steps=1"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    model = LLaDAModel.from_pretrained(tmp_path / "exported")
    assert model.dtype == torch.bfloat16 and (tmp_path / "exported" / "tokenizer.json").is_file()
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert main(["train", str(recipe_file), "--set", "optim.lrr=1"]) == 2
    assert "unknown config key optim.lrr" in capsys.readouterr().err


def test_tqdm_disable_silences_the_training_bar(workspace: Path, tmp_path: Path) -> None:
    """TQDM_DISABLE=1 (tqdm's own switch, read when tqdm is imported: hence a fresh process) turns the
    bar off, as sweeps that log many runs to files need; without it the bar is drawn."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(f"data:\n  path: {workspace / 'packed'}\n  seq_len: 32\nmodel:\n  tokenizer: "
                           f"{workspace / 'tok'}\nsteps: 2\nbatch_size: 4\ndevice: cpu\noptim:\n  warmup_steps: 1\n")
    outputs = {}
    for disable in ("1", ""):
        env = {**os.environ, "TQDM_DISABLE": disable} if disable else {k: v for k, v in os.environ.items()
                                                                        if k != "TQDM_DISABLE"}
        done = subprocess.run([sys.executable, "-m", "llada", "train", str(recipe_file), "--set",
                               f"out_dir={tmp_path / f'run{disable}'}"], env=env, capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, done.stderr
        outputs[disable] = done.stderr
    assert "training:" not in outputs["1"] and "training:" in outputs[""]


def logged_losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if not r["skipped"]}


def test_two_gloo_processes_match_one(workspace: Path, tmp_path: Path) -> None:
    """FSDP2 over 2 CPU processes (gloo) trains like 1 process, and its checkpoint resumes in 1 process."""
    common = [f"data.path={workspace / 'packed'}", f"model.tokenizer={workspace / 'tok'}", "data.seq_len=32",
              "batch_size=4", "micro_batch_size=2", "optim.lr=3e-3", "optim.schedule=constant",
              "optim.warmup_steps=0", "log_every=1", "eval_every=0", "save_every=3", "device=cpu",
              "data.eval_fraction=0.1"]
    single = losses(Trainer(load_config(None, [*common, "steps=6", f"out_dir={tmp_path / 'one'}"])).run())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29500 + os.getpid() % 1000), "-m", "llada.cli.main", "train"]
    for item in [*common, "steps=3", f"out_dir={tmp_path / 'two'}"]:
        command += ["--set", item]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = logged_losses(tmp_path / "two")
    assert sorted(sharded) == [1, 2, 3]
    for step in sharded:
        assert sharded[step] == pytest.approx(single[step], rel=1e-4), (step, sharded, single)
    resumed = losses(Trainer(load_config(None, [*common, "steps=6", f"out_dir={tmp_path / 'two'}"])).run())
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(single[step], rel=1e-4), (step, resumed, single)


def test_fsdp_in_a_single_process(workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsdp=true without torchrun: a 1-process mesh, same losses as the unsharded model."""
    import torch.distributed as dist

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(30500 + os.getpid() % 1000)),
                       ("RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    plain = losses(Trainer(recipe(workspace, tmp_path / "plain", "steps=3")).run())
    try:
        sharded = losses(Trainer(recipe(workspace, tmp_path / "fsdp", "steps=3", "fsdp=true")).run())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert sorted(sharded) == [1, 2, 3]
    assert all(sharded[s] == pytest.approx(plain[s], rel=1e-5) for s in plain)


def test_samples_and_tensorboard(workspace: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    config = recipe(workspace, tmp_path / "run", "steps=4", "sample_every=2", "sample_length=8",
                    "tensorboard=true", "sample_prompts=[The quick, In the beginning]")
    Trainer(config).run()
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(2, "The quick"), (2, "In the beginning"),
                                                          (4, "The quick"), (4, "In the beginning")]
    assert all(isinstance(s["text"], str) for s in samples)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_activation_checkpointing_changes_nothing_but_memory(workspace: Path, tmp_path: Path) -> None:
    plain = losses(Trainer(recipe(workspace, tmp_path / "a", "steps=3")).run())
    recomputed = losses(Trainer(recipe(workspace, tmp_path / "b", "steps=3", "activation_checkpointing=true")).run())
    assert all(recomputed[s] == pytest.approx(plain[s], rel=1e-6) for s in plain)


CHILD = """
import sys, time
import llada.training.trainer as train
from llada.training.config import load_config
real = train.save_state_dict
def slow(*args, **kwargs):
    real(*args, **kwargs)
    time.sleep(0.3)  # widen the window in which the parent kills us mid-checkpoint
train.save_state_dict = slow
train.Trainer(load_config(None, sys.argv[1:])).run()
"""


def test_checkpoint_survives_sigkill_during_save(workspace: Path, tmp_path: Path) -> None:
    """SIGKILL while a checkpoint is being written: every step-N directory left is complete and resumable."""
    import time

    out = tmp_path / "run"
    base = [f"data.path={workspace / 'packed'}", f"model.tokenizer={workspace / 'tok'}", f"out_dir={out}",
            "data.seq_len=32", "batch_size=4", "device=cpu", "eval_every=0", "data.eval_fraction=0.1"]
    child = subprocess.Popen([sys.executable, "-c", CHILD, *base, "steps=50", "save_every=1"],
                             stderr=subprocess.DEVNULL)
    caught_mid_save = False
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # wait until a later checkpoint is half written
            staged = list((out / "checkpoints").glob(".step-*.tmp")) if (out / "checkpoints").is_dir() else []
            if any((s / "model").is_dir() for s in staged) and list((out / "checkpoints").glob("step-*")):
                caught_mid_save = True
                break
            time.sleep(0.01)
        child.kill()
    finally:
        child.wait()
    assert caught_mid_save, "the child never reached a second checkpoint"
    finished = sorted((out / "checkpoints").glob("step-*"))
    for directory in finished:
        assert (directory / "trainer.pt").is_file() and (directory / "model" / "config.json").is_file()
    last = int(finished[-1].name.removeprefix("step-"))
    records = Trainer(load_config(None, [*base, f"steps={last + 1}", "save_every=0"])).run()
    assert [r["step"] for r in records] == [last + 1]


@pytest.mark.parametrize("data", ["packed", "sft"])
def test_data_made_with_another_tokenizer_is_refused(workspace: Path, tmp_path: Path, data: str) -> None:
    """Same vocabulary size and EOS id, other tokens: the ids would mean other text, so training refuses,
    naming both tokenizers."""
    from llada.model.tokenizer import train_tokenizer

    other = train_tokenizer([text[::-1] for text in CORPUS], vocab_size=320, min_frequency=1)
    other.save_pretrained(tmp_path / "other")
    assert other.vocab_size == Tokenizer.from_pretrained(workspace / "tok").vocab_size
    objective = "pretrain" if data == "packed" else "sft"
    config = recipe(workspace, tmp_path / "run", f"model.tokenizer={tmp_path / 'other'}", f"objective={objective}",
                    f"data.path={workspace / data}")
    with pytest.raises(ValueError, match="made with another tokenizer") as error:
        Trainer(config)
    assert str((workspace / "tok").resolve()) in str(error.value) and str(tmp_path / "other") in str(error.value)


def test_a_rerun_resumes_only_the_same_network(workspace: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A changed architecture is refused before anything is written (the stored recipe stays); other
    changes resume with a warning naming them."""
    Trainer(recipe(workspace, tmp_path / "run", "steps=3")).run()
    stored = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"model.overrides: \{\} -> \{'n_layers': 3\}"):
        Trainer(recipe(workspace, tmp_path / "run", "steps=3", "model.overrides={n_layers: 3}")).run()
    assert (tmp_path / "run" / "config.yaml").read_text() == stored
    trainer = Trainer(recipe(workspace, tmp_path / "run", "steps=5", "optim.lr=1e-3"))
    trainer.run()
    assert trainer.step == 5
    assert "optim.lr: 0.003 -> 0.001" in caplog.text and "steps: 3 -> 5" in caplog.text


def test_two_runs_cannot_share_a_run_directory(workspace: Path, tmp_path: Path) -> None:
    from llada.training.run_dir import claim_run_dir

    first = claim_run_dir(tmp_path / "run", recipe(workspace, tmp_path / "run"))
    with pytest.raises(ValueError, match="in use by another training process"):
        Trainer(recipe(workspace, tmp_path / "run")).run()
    first.close()
    Trainer(recipe(workspace, tmp_path / "run", "steps=2")).run()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_steps_on_a_gpu_log_their_peak_memory(workspace: Path, tmp_path: Path) -> None:
    """Each step's record holds the step's own peak GPU memory: at least the float32 weights, their
    gradients and Adam's two moments, which live through every step."""
    trainer = Trainer(recipe(workspace, tmp_path / "run", "device=cuda", "steps=3", "save_every=0"))
    state_gib = 4 * sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / 2**30
    records = trainer.run()
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(state_gib <= r["peak_memory_gib"] <= r["peak_reserved_gib"] < state_gib + 1 for r in records)
