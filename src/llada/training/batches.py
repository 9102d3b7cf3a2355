"""What each training step reads, and its randomness: both pure functions of the seed and the step,
so that a resumed run (or one on another number of processes) repeats an uninterrupted one."""

from __future__ import annotations

import torch


class EpochBatches:
    """Index batches in a fresh seeded permutation each epoch; the position is resumable state."""

    def __init__(self, indices: list[int], batch_size: int, seed: int) -> None:
        if len(indices) < batch_size:
            raise ValueError(f"the training split has {len(indices)} samples, fewer than batch_size {batch_size}")
        self.indices, self.batch_size, self.seed = indices, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return [self.indices[i] for i in torch.randperm(len(self.indices), generator=generator).tolist()]

    def next(self) -> list[int]:
        if self.position + self.batch_size > len(self._order):  # drop the ragged tail of an epoch
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        batch = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation()


def step_generator(seed: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """The randomness (t, masks, truncation) of one micro-batch: a pure function of seed and position."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 1_009 + micro)
