"""What ``torch.compile`` produces for a compiled engine, kept on disk so that the next process reuses it.

A compiled engine's first call of each shape traces the forward pass, lowers it through Inductor,
generates and benchmarks Triton kernels: tens of seconds at the 8B shape, paid again by every new
``llada serve --compile``. PyTorch can serialise those results (Inductor's compiled graphs, AOT
autograd's, the kernels' autotuning choices) as one blob, ``torch.compiler.save_cache_artifacts``,
and preload them into a new process, ``load_cache_artifacts``; tracing still runs, the expensive
lowering and tuning are found in the cache.

Layout, under ``cache_root()`` (``$LLADA_CACHE_DIR``, else ``$XDG_CACHE_HOME/llada``, else
``~/.cache/llada``):

- ``compile/<key>/artifacts.bin``: the blob of one engine kind, ``<key>`` a hash of everything the
  compiled code depends on (the network's shape and dtype, fused projections, quantization, the GPU,
  and the PyTorch, Triton and CUDA versions); ``compile/<key>/key.json`` says what the hash is of;
- ``inductor/`` and ``triton/``: Inductor's and Triton's own on-disk caches, pointed there (unless
  ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` are set) so that one directory holds it all.

Clearing it is deleting the directory (``llada cache clear`` does that); nothing in it is needed for
correctness, a corrupt or stale blob is reported and ignored.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llada.model.transformer import LLaDAModel

CACHE_ENV = "LLADA_CACHE_DIR"
ARTIFACTS = "artifacts.bin"


def cache_root() -> Path:
    """Where llada keeps caches: ``$LLADA_CACHE_DIR``, else ``$XDG_CACHE_HOME/llada``, else ``~/.cache/llada``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "llada"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def engine_key(model: LLaDAModel, fused: bool) -> dict:
    """Everything an engine's compiled code depends on besides the shapes it is called with (which
    PyTorch's cache keys itself): the network's configuration and dtype, fused projections, the
    layer types (quantization), the device, and the library versions."""
    device = model.device
    gpu = None
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        gpu = {"name": properties.name, "capability": [properties.major, properties.minor]}
    return {
        "config": {name: repr(value) for name, value in sorted(vars(model.config).items())},
        "dtype": str(model.dtype), "fused": fused,
        "layers": sorted({type(module).__name__ for module in model.modules()}),
        "device": device.type, "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton"),
    }


@dataclass(frozen=True)
class CompileCache:
    """The cache directory of one kind of compiled engine."""

    directory: Path

    @classmethod
    def for_engine(cls, model: LLaDAModel, fused: bool, root: Path | None = None) -> CompileCache:
        key = engine_key(model, fused)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        cache = cls((root or cache_root()) / "compile" / digest)
        cache.directory.mkdir(parents=True, exist_ok=True)
        description = cache.directory / "key.json"
        if not description.exists():
            _write_atomically(description, json.dumps(key, indent=1, sort_keys=True).encode())
        return cache

    @property
    def artifacts(self) -> Path:
        return self.directory / ARTIFACTS

    def activate(self) -> bool:
        """Point Inductor's and Triton's caches under the cache root (unless set already) and preload
        this engine's saved artifacts; returns whether there were any to load."""
        root = self.directory.parent.parent
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
        if not self.artifacts.is_file():
            return False
        # PyTorch checks the blob (a checksum) and returns None for one it cannot read: the engine then
        # compiles as without a cache and the blob is rewritten after it.
        if torch.compiler.load_cache_artifacts(self.artifacts.read_bytes()) is None:
            warnings.warn(f"ignoring the unreadable compile cache {self.artifacts}; it is rewritten after this run "
                          "compiles", stacklevel=2)
            return False
        return True

    def save(self) -> bool:
        """Write everything this process has compiled so far (PyTorch accumulates it) over the saved
        artifacts, atomically; returns whether there was anything to write."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        _write_atomically(self.artifacts, saved[0])
        return True


def clear(root: Path | None = None) -> Path:
    """Delete the compile caches under ``root`` (default ``cache_root()``); returns the root."""
    root = root or cache_root()
    for name in ("compile", "inductor", "triton"):
        shutil.rmtree(root / name, ignore_errors=True)
    return root


def _write_atomically(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_bytes(data)
    os.replace(staging, path)
