"""The training loop: pretraining, SFT, preference optimization (DPO, VRPO), RL (GRPO) and the
autoregressive baseline from one recipe, training every weight or LoRA adapters.

What it guarantees:
- Exact resume: the masks of step s come from a generator seeded by (seed, s), the data order from
  per-epoch permutations of the seed, and a checkpoint stores the model, the optimiser, the step and
  the data position, so a resumed run reproduces the losses of an uninterrupted one bit for bit (CPU).
- Checkpoints are atomic (written beside, then renamed), the last ``keep_last`` are kept, and each holds
  the model in the official checkpoint layout (or, with LoRA, the adapter in PEFT's layout), so it
  can be used or exported as is.
- A non-finite or spiking loss skips the step; ``max_bad_steps`` in a row roll the model and optimiser
  back to the last checkpoint and lower the learning rate (the paper met this once, at 1.2T tokens).
- SIGTERM or Ctrl-C (SIGINT) saves a checkpoint at the end of the current step, then exits; a second
  Ctrl-C interrupts at once.
- Under ``torchrun`` the model is sharded with FSDP2 and each process takes its slice of every global
  batch; the masks of a sample depend on its place in the global batch, not on the number of
  processes, so N processes train like one (up to float summation order). Checkpoints hold full,
  unsharded states, so a run can resume on any number of processes.

Metrics go to ``metrics.jsonl`` (TensorBoard too with ``tensorboard: true``); samples to ``samples.jsonl``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from llada.diffusion.losses import Loss
from llada.diffusion.preference import VarianceReduction
from llada.model.checkpoint import save_state_dict
from llada.model.loading import resolve_device
from llada.model.lora import save_adapter
from llada.model.tokenizer import Tokenizer, tokenizer_files
from llada.training.batches import EpochBatches, step_generator
from llada.training.checkpoints import ADAPTER_DIR, MODEL_DIR, checkpoint_dirs, read_checkpoint, write_checkpoint
from llada.training.config import CHECKPOINTS, TrainConfig, config_to_dict
from llada.training.network import attach_adapters, autocast_dtype, build_model, build_reference
from llada.training.objectives import OBJECTIVES, Batch, LossSettings, greedy_text
from llada.training.parallelize import apply_fsdp, compile_model, init_process_group
from llada.training.rollouts import RolloutCycle, grpo_settings
from llada.training.run_dir import claim_run_dir
from llada.training.run_log import RunLog, memory_peaks, peak_flops, start_memory_peaks
from llada.training.schedule import lr_multiplier
from llada.training.token_rows import check_made_with

logger = logging.getLogger(__name__)

class TrainingError(RuntimeError):
    """Training cannot go on (e.g. rollback needed but no checkpoint exists)."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    skipped: bool
    metrics: dict[str, float]  # the objective's own (a preference objective's reward accuracy), averaged


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Trainer:
    """Runs a TrainConfig; ``run()`` trains to ``config.steps``, resuming from ``out_dir`` if it has checkpoints."""

    def __init__(self, config: TrainConfig) -> None:
        config.validate()
        self.config = config
        self.objective = OBJECTIVES[config.objective]
        self.device = resolve_device(config.device)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.sharded = config.fsdp if config.fsdp is not None else self.world > 1
        if self.world > 1 and not self.sharded:
            raise ValueError("several processes need fsdp (leave it unset or set fsdp=true)")
        if self.sharded and not dist.is_initialized():
            init_process_group(self.device)
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.micro_batch_size = config.micro_batch_size or config.batch_size // self.world
        if config.batch_size % (self.world * self.micro_batch_size):
            raise ValueError(f"batch_size ({config.batch_size}) must be a multiple of processes ({self.world}) x "
                             f"micro_batch_size ({self.micro_batch_size})")
        self.out_dir = Path(config.out_dir)
        self.tokenizer_dir = Path(config.model.tokenizer or config.model.init_from or "")
        self.tokenizer = self._load_tokenizer()
        self.model = build_model(config, self.tokenizer, self.device)
        self.adapters = attach_adapters(self.model, config)  # the PEFT handle with LoRA, else None
        self.dataset, self.collate = self._load_data()
        eval_count = int(len(self.dataset) * config.data.eval_fraction)
        split = len(self.dataset) - eval_count
        self.eval_indices = list(range(split, len(self.dataset)))
        self.batches = EpochBatches(list(range(split)), config.batch_size, config.seed)
        self.mesh = init_device_mesh(self.device.type, (self.world,)) if self.sharded else None
        self.forward_model = self._parallelize()
        self.reference = self._build_reference() if self.objective.needs_reference else None
        self.cycle = None if self.objective.preparer is None else RolloutCycle(
            self.objective.preparer(self.model, self.forward_model, self.reference, self.tokenizer, config,
                                    self.sharded, self._autocast).prepare, config.rl.inner_steps, self.world)
        self.optimizer = self._build_optimizer()
        self.step = 0
        self.lr_scale = 1.0
        self.loss_mean: float | None = None  # running mean of accepted losses, for spike detection
        self.bad_steps = 0
        self.stop_requested = False
        self.log = RunLog(self.out_dir, config.tensorboard, writes=self.rank == 0)

    def _parallelize(self) -> torch.nn.Module:
        """Shard and/or compile the model; returns what the loss functions should call."""
        if self.sharded:
            if self.config.compile:  # per block, before sharding (whole-model compile and FSDP hooks do not mix)
                for block in self.model.blocks:
                    block.compile(dynamic=None)
            apply_fsdp(self.model, self.mesh, param_dtype=self._fsdp_dtype())
            return self.model
        return compile_model(self.model, dynamic=None, fullgraph=False) if self.config.compile else self.model

    def _fsdp_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.config, self.device)

    def _build_reference(self) -> torch.nn.Module:
        reference = build_reference(self.config, self.forward_model, self.adapters, self.device)
        if self.sharded and self.adapters is None:  # a second copy: sharded like the policy
            apply_fsdp(reference, self.mesh, param_dtype=self._fsdp_dtype())
        return reference

    # --- construction ------------------------------------------------------------------------

    def _load_tokenizer(self) -> Tokenizer:
        if not str(self.tokenizer_dir) or not (self.tokenizer_dir / "tokenizer.json").is_file():
            raise ValueError("training needs a tokenizer: set model.tokenizer (or model.init_from) to a directory "
                             "with tokenizer.json")
        return Tokenizer.from_pretrained(self.tokenizer_dir)

    def _load_data(self) -> tuple[torch.utils.data.Dataset, Callable[[list], Batch]]:
        path = self.config.data.path
        dataset = self.objective.dataset(path, self.config.data.seq_len)
        collate = functools.partial(self.objective.collate, eos_id=self.tokenizer.ids.eos)
        if dataset.index["vocab_size"] > self.model.config.embedding_size:
            raise ValueError(f"{path} holds ids up to {dataset.index['vocab_size'] - 1}, but the model's embedding "
                             f"has {self.model.config.embedding_size} rows (set model.overrides.vocab_size)")
        check_made_with(dataset.index, path, self.tokenizer, self.tokenizer_dir)
        return dataset, collate

    def _build_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:  # frozen LoRA base weights
                continue
            (decay if param.dim() == 2 and not name.startswith("wte") else no_decay).append(param)
        optim = self.config.optim
        groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                 fused=self.device.type == "cuda")

    # --- one step ----------------------------------------------------------------------------

    def _autocast(self):
        dtype = autocast_dtype(self.config, self.device)
        return torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def _loss(self, batch: Batch, generator: torch.Generator) -> Loss:
        preference = self.config.preference
        settings = LossSettings(mask_id=self.model.config.mask_token_id, eps=self.config.mask_eps,
                                random_length_probability=self.config.data.random_length_probability,
                                training=self.model.training, reference=self.reference, beta=preference.beta,
                                reduction=VarianceReduction(preference.budget, preference.masks_per_count,
                                                            preference.antithetic), grpo=grpo_settings(self.config))
        with self._autocast():
            return self.objective.loss(self.forward_model, {**batch, "input_ids": batch["input_ids"].to(self.device)},
                                       settings, generator)

    def _micro_batches(self, indices: list[int]) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(indices), self.micro_batch_size):
            yield self.collate([self.dataset[i] for i in indices[start:start + self.micro_batch_size]])

    def _fresh_batches(self) -> Iterator[Batch]:
        """This process's micro-batches of the next ``batch_size`` samples."""
        indices = self.batches.next()
        share = len(indices) // self.world
        return self._micro_batches(indices[self.rank * share:(self.rank + 1) * share])

    def _generator(self, micro: int, count: int) -> torch.Generator:
        # Randomness by the micro-batch's place in the global batch: the same for any process count.
        return step_generator(self.config.seed, self.step, self.rank * count + micro, self.device)

    def train_step(self) -> StepResult:
        """One optimiser step over ``batch_size`` samples (this process's share, with accumulation); an
        objective that prepares its batches (RL) reuses them for ``rl.inner_steps`` steps."""
        batches = list(self._fresh_batches()) if self.cycle is None else \
            self.cycle.batches(self.step, self._fresh_batches, self._generator)
        accumulation = len(batches)
        total = torch.zeros((), device=self.device)
        tokens = 0
        metrics: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        for micro, batch in enumerate(batches):
            generator = self._generator(micro, accumulation)
            loss = self._loss(batch, generator)
            (loss.value / accumulation).backward()
            total += loss.value.detach() / accumulation
            tokens += loss.n_tokens
            for key, value in loss.metrics.items():
                metrics[key] = metrics.get(key, 0.0) + value / accumulation
        if self.world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.AVG)
            metrics = self._average(metrics)
        clip = self.config.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm)
        loss_value = float(total)
        tokens *= self.world
        if self._is_bad(loss_value, grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_value, grad_norm, tokens, skipped=True, metrics=metrics)
        for group in self.optimizer.param_groups:
            group["lr"] = self.current_lr()
        self.optimizer.step()
        self.loss_mean = loss_value if self.loss_mean is None else 0.95 * self.loss_mean + 0.05 * loss_value
        return StepResult(loss_value, grad_norm, tokens, skipped=False, metrics=metrics)

    def _average(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the processes (all of them log the same keys)."""
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        if values.numel():
            dist.all_reduce(values, op=dist.ReduceOp.AVG)
        return dict(zip(metrics, values.tolist()))

    def current_lr(self) -> float:
        optim = self.config.optim
        return optim.lr * self.lr_scale * lr_multiplier(self.step, self.config.steps, optim.schedule, optim.warmup_steps,
                                                        optim.decay_fraction, optim.min_lr_ratio)

    def _is_bad(self, loss: float, grad_norm: float) -> bool:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return True
        factor = self.config.spike_factor if self.objective.spikes_detectable else 0.0
        return bool(factor and self.loss_mean is not None and self.step > self.config.optim.warmup_steps
                    and loss > factor * self.loss_mean)

    @torch.no_grad()
    def evaluate(self, dataset: torch.utils.data.Dataset | None = None, batches: int | None = None) -> dict[str, float]:
        """``eval_loss``, the mean objective on the held-out split with fixed randomness (comparable
        between evaluations), and the objective's own metrics as ``eval_<name>``; empty without a split.
        For the diffusion objectives the loss is the masked-diffusion bound on the NLL, in nats per token.
        ``dataset`` (items like the training data's, e.g. held-out documents packed the same way)
        replaces the split, and ``batches`` the recipe's ``eval_batches``."""
        source = self.dataset if dataset is None else dataset
        indices = self.eval_indices if dataset is None else list(range(len(dataset)))
        if not indices:
            return {}
        self.model.eval()
        values, metrics = [], {}
        size, count, batches = self.micro_batch_size, len(indices), batches or self.config.eval_batches
        for number in range(batches):
            chosen = [indices[(number * size + k) % count] for k in range(min(size, count))]
            batch = self.collate([source[i] for i in chosen])
            generator = torch.Generator(device=self.device).manual_seed(10_007 + number)
            if self.cycle is not None:  # RL: held-out rollouts and their rewards, at the first inner step
                batch = {**self.cycle.prepare(batch, generator, inner_steps=1), "inner_step": 0}
            loss = self._loss(batch, generator)
            values.append(loss.value.item())
            for key, value in loss.metrics.items():
                metrics[f"eval_{key}"] = metrics.get(f"eval_{key}", 0.0) + value / batches
        self.model.train()
        return {"eval_loss": sum(values) / len(values), **metrics}

    # --- checkpoints -------------------------------------------------------------------------

    def checkpoint_dirs(self) -> list[Path]:
        return checkpoint_dirs(self.out_dir)

    def save_checkpoint(self) -> Path:
        """Write the model (official layout) or the LoRA adapter (PEFT's layout), the tokenizer and
        the trainer state to checkpoints/step-N, atomically.

        The states are gathered unsharded to process 0, which writes them; the others wait.
        """
        model_state = get_model_state_dict(self.model, options=FULL_STATE)
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=FULL_STATE)
        prepared = None if self.cycle is None else self.cycle.state_dict()  # every process takes part
        target = self.out_dir / CHECKPOINTS / f"step-{self.step:08d}"
        if self.rank == 0:
            state = {"step": self.step, "optimizer": optimizer_state, "data": self.batches.state_dict(),
                     "lr_scale": self.lr_scale, "loss_mean": self.loss_mean, "config": config_to_dict(self.config),
                     "prepared": prepared}
            extras = tokenizer_files(self.tokenizer_dir)

            def write_weights(staging: Path) -> None:
                if self.adapters is None:
                    save_state_dict(model_state, self.model.config, staging / MODEL_DIR, extra_files=extras)
                else:
                    save_adapter(staging / ADAPTER_DIR, self.adapters, model_state)
                    for extra in extras:
                        shutil.copy2(extra, staging / ADAPTER_DIR / extra.name)

            write_checkpoint(target, write_weights, state, self.config.keep_last)
        self._barrier()
        return target

    def load_checkpoint(self, directory: Path, restore_data: bool = True) -> None:
        """Load a checkpoint written by any number of processes into this (possibly sharded) run."""
        weights, state = read_checkpoint(directory)
        set_model_state_dict(self.model, weights,
                             options=StateDictOptions(full_state_dict=True, strict=self.adapters is None))
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        self.step, self.lr_scale, self.loss_mean = state["step"], state["lr_scale"], state["loss_mean"]
        if self.cycle is not None:
            self.cycle.load_state_dict(state.get("prepared"), self.rank, self.device)
        if restore_data:
            self.batches.load_state_dict(state["data"])

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def rollback(self) -> None:
        """Back to the last checkpoint with a lower learning rate; the data stream moves on past the bad batches."""
        checkpoints = self.checkpoint_dirs()
        if not checkpoints:
            raise TrainingError(f"{self.bad_steps} bad steps in a row and no checkpoint to roll back to; "
                                f"lower optim.lr or save checkpoints more often (save_every)")
        lr_scale = self.lr_scale * self.config.rollback_lr_factor
        self.load_checkpoint(checkpoints[-1], restore_data=False)
        self.lr_scale = lr_scale
        logger.warning("rolled back to %s; learning rate scaled by %.3g", checkpoints[-1].name, self.lr_scale)

    # --- the loop ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self) -> list[dict]:
        """Greedy generations from ``sample_prompts`` (the reference sampler, or left to right for the
        autoregressive objectives), appended to samples.jsonl."""
        self.model.eval()
        rows = []
        for prompt in self.config.sample_prompts:
            with self._autocast():
                text = greedy_text(self.model, self.tokenizer, prompt, self.config.sample_length, self.objective)
            rows.append({"step": self.step, "prompt": prompt, "text": text})
        self.model.train()
        self.log.samples(rows)
        return rows

    def run(self) -> list[dict]:
        """Train to ``config.steps``; returns the per-step records also written to metrics.jsonl."""
        lock = claim_run_dir(self.out_dir, self.config) if self.rank == 0 else None
        self._barrier()
        if checkpoints := self.checkpoint_dirs():
            self.load_checkpoint(checkpoints[-1])
            self.log.forget_after(self.step)
            logger.info("resumed from %s", checkpoints[-1])
        previous = {signum: signal.signal(signum, self._request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        records = []
        peak = peak_flops(self.device, self.config.peak_tflops)
        flops_per_token = self.model.config.flops_per_token(self.config.data.seq_len, training=True)
        # Other ranks stay silent; rank 0 leaves `disable` unset so that TQDM_DISABLE=1 silences it.
        bar = tqdm(total=self.config.steps, initial=self.step, desc="training", unit="step",
                   **({"disable": True} if self.rank else {}))
        try:
            while self.step < self.config.steps:
                start_memory_peaks(self.device)
                start = time.perf_counter()
                result = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds = time.perf_counter() - start
                record = {"step": self.step + 1, "loss": result.loss, "lr": self.current_lr(), "step_seconds": seconds,
                          "grad_norm": result.grad_norm, "tokens_per_s": result.tokens / seconds,
                          "skipped": result.skipped, **result.metrics, **memory_peaks(self.device)}
                if peak:  # per device: all processes' tokens over all devices' peak
                    record["mfu"] = flops_per_token * result.tokens / seconds / (peak * self.world)
                if result.skipped:
                    self.bad_steps += 1
                    logger.warning("step %d skipped: loss %.4g, grad norm %.4g", self.step + 1, result.loss,
                                   result.grad_norm)
                    if self.bad_steps >= self.config.max_bad_steps:
                        self.rollback()
                        self.bad_steps = 0
                        record["rollback"] = True
                    self.log.metrics(record)
                    records.append(record)
                    continue
                self.bad_steps = 0
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:,.0f}")
                if self.config.eval_every and self.step % self.config.eval_every == 0:
                    record.update(self.evaluate())
                    if "eval_loss" in record and self.objective.per_token_bound:
                        # exp of the per-token bound: an upper bound on perplexity (exact for autoregressive)
                        record["eval_perplexity_bound"] = math.exp(min(record["eval_loss"], 50.0))
                if self.config.sample_every and self.step % self.config.sample_every == 0:
                    self.sample()
                records.append(record)
                if self.step % self.config.log_every == 0 or "eval_loss" in record or self.step == self.config.steps:
                    self.log.metrics(record)
                self._agree_on_stop()
                if self.stop_requested or self.step == self.config.steps or \
                        (self.config.save_every and self.step % self.config.save_every == 0):
                    self.save_checkpoint()
                if self.stop_requested:
                    logger.warning("stop signal: saved a checkpoint at step %d and stopped", self.step)
                    break
        finally:
            bar.close()
            if lock is not None:
                lock.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.log.close()
        return records

    def _request_stop(self, signum: int, frame: object) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user will not wait for the step to end
        self.stop_requested = True

    def _agree_on_stop(self) -> None:
        """Stop everywhere if any process got SIGTERM, so that all of them save the same step."""
        if self.world > 1:
            flag = torch.tensor(float(self.stop_requested), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.stop_requested = bool(flag.item())


def train(config: TrainConfig) -> list[dict]:
    """Build a Trainer for ``config`` and run it."""
    return Trainer(config).run()
