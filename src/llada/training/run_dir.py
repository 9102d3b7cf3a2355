"""Claiming a run directory before training writes to it: one run at a time, and a rerun resumes only
the run that is there.

A rerun of ``llada train`` on a directory with checkpoints resumes it. Its recipe is compared with the
stored ``config.yaml`` first, before anything is written: a different network (``model.preset`` or
``model.overrides``), objective or LoRA shape is refused, naming the keys (its checkpoint cannot be
loaded into the new network, and the old recipe would be overwritten); other changes (more steps, a
new learning rate) are allowed and listed in a warning. A lock on ``OUT/.lock`` keeps a second process
from training into the same directory at the same time.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path
from typing import IO, Any

import yaml

from llada.training.checkpoints import checkpoint_dirs
from llada.training.config import TrainConfig, config_to_dict

logger = logging.getLogger(__name__)

RECIPE_FILE = "config.yaml"
LOCK_FILE = ".lock"
# Keys that decide which network is trained: a checkpoint of one cannot resume another.
NETWORK_KEYS = ("objective", "model.preset", "model.overrides", "lora.rank", "lora.targets")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (mappings under ``model.overrides`` kept whole)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name != "model.overrides":
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def recipe_changes(previous: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Key -> (stored value, new value) for every recipe key whose value differs."""
    old, new = flatten(previous), flatten(current)
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)}


def claim_run_dir(out_dir: Path, config: TrainConfig) -> IO[str]:
    """Lock ``out_dir`` for this process, check a resumed run's recipe, then record the recipe.

    Returns the open lock file: the lock lasts until it is closed (or the process ends).
    Raises ValueError if another process holds the directory or the recipe changes the network.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = (out_dir / LOCK_FILE).open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ValueError(f"{out_dir} is in use by another training process; wait for it or choose another "
                         f"out_dir") from None
    current = config_to_dict(config)
    stored = out_dir / RECIPE_FILE
    if stored.is_file() and checkpoint_dirs(out_dir):
        changes = recipe_changes(yaml.safe_load(stored.read_text()) or {}, current)
        described = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
        if any(key.startswith(NETWORK_KEYS) for key in changes):
            lock.close()
            raise ValueError(f"{out_dir} holds checkpoints of another network or objective ({described}); resume "
                             f"with its recipe ({stored}) or choose another out_dir")
        if changes:
            logger.warning("resuming %s with a changed recipe: %s", out_dir, described)
    stored.write_text(yaml.safe_dump(current, sort_keys=False))
    return lock
