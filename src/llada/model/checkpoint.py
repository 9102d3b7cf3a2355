"""Checkpoint files: the official LLaDA Hugging Face layout, read and written exactly.

A checkpoint directory holds ``config.json`` (official keys), the weights as ``model.safetensors`` or
as shards ``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json``, and usually the
tokenizer files. This is the only module that knows weight names: the official names (for example
``model.transformer.blocks.3.q_proj.weight``) are mapped here to the model's own parameter names.

Loading builds the model on the meta device and fills it shard by shard straight into the target
dtype and device, so an 8B checkpoint never needs twice its size in memory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llada.model.config import ModelConfig, config_from_hf_dict, config_to_hf_dict
from llada.model.transformer import LLaDAModel

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_PREFIX = "model.transformer."


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or for another architecture."""


# --- names and shapes --------------------------------------------------------------------------

def official_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the official layout with its shape, in file order."""
    e, kv = config.d_model, config.n_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {f"{_PREFIX}wte.weight": (config.embedding_size, e)}
    for i in range(config.n_layers):
        block = f"{_PREFIX}blocks.{i}."
        shapes.update({
            block + "attn_norm.weight": (e,),
            block + "q_proj.weight": (e, e),
            block + "k_proj.weight": (kv, e),
            block + "v_proj.weight": (kv, e),
            block + "attn_out.weight": (e, e),
            block + "ff_norm.weight": (e,),
            block + "ff_proj.weight": (config.mlp_hidden_size, e),
            block + "up_proj.weight": (config.mlp_hidden_size, e),
            block + "ff_out.weight": (e, config.mlp_hidden_size),
        })
    shapes[f"{_PREFIX}ln_f.weight"] = (e,)
    if not config.weight_tying:
        shapes[f"{_PREFIX}ff_out.weight"] = (config.embedding_size, e)
    return shapes


def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own state dict under the official weight names."""
    return {_PREFIX + name: tensor for name, tensor in state_dict.items()}


def from_official(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official weight names -> the model's own state dict."""
    return {name.removeprefix(_PREFIX): tensor for name, tensor in tensors.items()}


# --- reading -----------------------------------------------------------------------------------

def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory."""
    directory = Path(path)
    config_path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing; a checkpoint directory needs the official config.json")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    try:
        return config_from_hf_dict(raw, source=str(config_path))
    except ValueError as error:
        raise CheckpointError(str(error)) from error


def weight_files(path: str | Path) -> dict[str, Path]:
    """Official weight name -> the safetensors file that holds it, checking that every file exists."""
    directory = Path(path)
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path} is malformed (needs a 'weight_map' object): {error}") from error
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint shard {missing[0]} is missing (index lists {len(shards)} shards, "
                                  f"{len(missing)} absent) in {directory}")
        return {name: directory / shard for name, shard in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.is_file():
        with _open_safetensors(single, "cpu") as handle:
            return {name: single for name in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
    if any(_SHARD_PATTERN.fullmatch(p.name) for p in directory.iterdir()):
        raise CheckpointError(f"{directory} has weight shards but no {INDEX_FILE}")
    raise CheckpointError(f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards")


def verify_weight_files(path: str | Path) -> list[Path]:
    """The checkpoint's weight files after opening each one and checking it holds the weights its index
    places there; raises CheckpointError naming a truncated, corrupt or incomplete file."""
    placed: dict[Path, set[str]] = {}
    for name, file in weight_files(path).items():
        placed.setdefault(file, set()).add(name)
    for file, names in placed.items():
        with _open_safetensors(file, "cpu") as handle:
            if missing := sorted(names - set(handle.keys())):
                raise CheckpointError(f"{file} lacks {len(missing)} weights its index places there, e.g. {missing[0]}")
    return sorted(placed)


class _open_safetensors:
    """``safe_open`` whose errors name the file (a truncated download is the usual cause)."""

    def __init__(self, file: Path, device: str) -> None:
        self.file, self.device = file, device

    def __enter__(self):
        try:
            self.context = safe_open(str(self.file), framework="pt", device=self.device)
            return self.context.__enter__()
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"{self.file} is not a readable safetensors file (truncated or corrupt?): "
                                  f"{error}") from error

    def __exit__(self, *exc: object) -> None:
        self.context.__exit__(*exc)


def _check_names(expected: dict[str, tuple[int, ...]], found: Iterable[str], directory: Path) -> None:
    found = set(found)
    missing = [name for name in expected if name not in found]
    unknown = sorted(found - set(expected))
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} weights missing, e.g. {missing[:3]}; the checkpoint "
                              f"does not match its config.json (n_layers, weight_tying?)")
    if unknown:
        raise CheckpointError(f"{directory}: {len(unknown)} unknown weights, e.g. {unknown[:3]}; this does not "
                              f"look like a LLaDA checkpoint for this config")


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    config: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under the model's parameter names, each read straight to ``device``/``dtype``.

    Every name and shape is checked against config.json before use.
    """
    directory = Path(path)
    config = config or read_config(directory)
    files = weight_files(directory)
    expected = official_shapes(config)
    _check_names(expected, files, directory)
    device = torch.device(device)
    load_device = str(device) if device.type in ("cpu", "cuda") else "cpu"
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with _open_safetensors(file, load_device) as handle:
            for name in names:
                try:
                    tensor = handle.get_tensor(name)
                except (SafetensorError, RuntimeError) as error:
                    raise CheckpointError(f"{file}: cannot read {name}: {error}") from error
                if tuple(tensor.shape) != expected[name]:
                    raise CheckpointError(f"{file}: {name} has shape {tuple(tensor.shape)}, config.json implies "
                                          f"{expected[name]}")
                state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    return from_official(state)


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               config: ModelConfig | None = None) -> LLaDAModel:
    """Load a checkpoint directory into a new model.

    Args:
        path: directory in the official layout.
        dtype: target dtype; None keeps the dtype stored in the files.
        device: where the weights go; each tensor is read straight to it (safetensors memory-maps
            the file, and nothing is ever materialised twice in full).
        config: overrides config.json (rarely needed).
    Returns:
        The model in eval mode.
    """
    config = config or read_config(path)
    state = read_state_dict(path, dtype=dtype, device=device, config=config)
    with torch.device("meta"):
        model = LLaDAModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope()
    return model.eval()


# --- writing -----------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" / "500MiB" (decimal and binary units)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def _plan_shards(tensors: list[tuple[str, torch.Tensor]], max_bytes: int,
                 dtype: torch.dtype | None) -> list[list[tuple[str, torch.Tensor]]]:
    """Greedy split into shards of at most ``max_bytes`` as stored (a single larger tensor gets its own)."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    used = 0
    for name, tensor in tensors:
        size = tensor.numel() * (dtype or tensor.dtype).itemsize
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, tensor))
        used += size
    return shards


def save_model(model: LLaDAModel, path: str | Path, max_shard_size: int | str = "5GB",
               dtype: torch.dtype | None = None, extra_files: Iterable[str | Path] = ()) -> None:
    """Write ``model`` in the official layout, atomically.

    Everything is written to a temporary directory beside ``path`` and renamed into place, so a crash
    never leaves a half-written checkpoint under ``path``. If ``path`` already exists, its files that
    are not weights or config (tokenizer files, for instance) are kept.

    Args:
        model: the model to save.
        path: target directory.
        max_shard_size: largest shard (e.g. "5GB"); a single shard is written as model.safetensors.
        dtype: cast weights to this dtype on the way out (None keeps theirs).
        extra_files: files copied into the checkpoint too (e.g. tokenizer files).
    """
    if getattr(model, "quantized", None):
        raise CheckpointError(f"this model's weights are quantized ({model.quantized}) for inference; the official "
                              "layout holds the original weights: save the model before quantizing it")
    save_state_dict(model.state_dict(), model.config, path, max_shard_size=max_shard_size, dtype=dtype,
                    extra_files=extra_files)


def save_state_dict(state_dict: dict[str, torch.Tensor], config: ModelConfig, path: str | Path,
                    max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None,
                    extra_files: Iterable[str | Path] = ()) -> None:
    """``save_model`` for a bare state dict (e.g. one gathered from a sharded model); same layout and guarantees."""
    target = Path(path)
    max_bytes = parse_size(max_shard_size)
    names = official_shapes(config)
    official = to_official(state_dict)
    missing = [name for name in names if name not in official]
    if missing:
        raise CheckpointError(f"state dict lacks {len(missing)} weights, e.g. {missing[:3]}")
    tensors = [(name, official[name]) for name in names]
    shards = _plan_shards(tensors, max_bytes, dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        hf_config = config_to_hf_dict(config)
        stored = dtype or tensors[0][1].dtype
        hf_config["torch_dtype"] = str(stored).removeprefix("torch.")
        (staging / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        weight_map: dict[str, str] = {}
        total = 0
        for number, shard in enumerate(shards, start=1):
            file = SINGLE_FILE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            payload = {name: t.detach().to("cpu", dtype or t.dtype).contiguous() for name, t in shard}
            save_file(payload, str(staging / file), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in payload.values())
            weight_map.update({name: file for name in payload})
            del payload
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for extra in extra_files:
            shutil.copy2(extra, staging / Path(extra).name)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("saved %d weights in %d file(s) to %s", len(tensors), len(shards), target)


def _is_weight_file(name: str) -> bool:
    return name in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE) or bool(_SHARD_PATTERN.fullmatch(name))


def _swap_into_place(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` directory to ``target``, keeping target's non-weight files."""
    for file in staging.iterdir():
        os.chmod(file, 0o644)
    os.chmod(staging, 0o755)
    if not target.exists():
        os.replace(staging, target)
        return
    if not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory")
    for old in target.iterdir():
        if not _is_weight_file(old.name) and not (staging / old.name).exists():
            if old.is_dir():
                shutil.copytree(old, staging / old.name)
            else:
                shutil.copy2(old, staging / old.name)
    # Two renames: at every instant either the old or the new complete checkpoint is on disk.
    backup = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, backup)
    os.replace(staging, target)
    shutil.rmtree(backup, ignore_errors=True)
