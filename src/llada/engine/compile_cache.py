"""What ``torch.compile`` produces for a compiled engine, kept on disk so that the next process reuses it.

A compiled engine's first call of each shape traces a layer, lowers it through Inductor, generates
and benchmarks Triton kernels: about 8 s at the 8B shape on an H100, paid again by every new
``llada serve --compile``. PyTorch can serialise those results (Inductor's compiled graphs, AOT
autograd's, the kernels' autotuning choices) as one blob, ``torch.compiler.save_cache_artifacts``,
and preload them into a new process, ``load_cache_artifacts``; tracing still runs, the expensive
lowering and tuning are found in the cache.

Layout, under ``cache_root()`` (``$LLADA_CACHE_DIR``, else ``$XDG_CACHE_HOME/llada``, else
``~/.cache/llada``):

- ``compile/<key>/artifacts-<hash>.bin``: blobs saved by engines of one kind, ``<key>`` a hash of
  everything the compiled code depends on besides its shapes (the network's shape and dtype, fused
  projections, quantization, the GPU, and the PyTorch, Triton and CUDA versions), ``key.json``
  beside them says what. A blob holds what its process compiled or found in the cache, so one
  process's blob may lack shapes another compiled: each distinct blob is kept (named by the hash of
  its bytes) and all are preloaded;
- ``inductor/`` and ``triton/``: Inductor's and Triton's own on-disk caches, pointed there (unless
  ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` are set) so that one directory holds it all.

Clearing it is deleting the directory (``llada cache clear`` does that). Nothing in it is needed for
correctness: an unreadable blob is reported and skipped, and a cache directory that cannot be
created or written turns the cache off with a warning (the engine compiles as without it).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from llada.model.transformer import LLaDAModel

CACHE_ENV = "LLADA_CACHE_DIR"


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
    def for_engine(cls, model: LLaDAModel, fused: bool, root: Path | None = None) -> CompileCache | None:
        """The cache of this engine kind, its directory created; None (with a warning) where it cannot be."""
        key = engine_key(model, fused)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        cache = cls((root or cache_root()) / "compile" / digest)
        try:
            cache.directory.mkdir(parents=True, exist_ok=True)
            description = cache.directory / "key.json"
            if not description.exists():
                _write_atomically(description, json.dumps(key, indent=1, sort_keys=True).encode())
        except OSError as error:
            warnings.warn(f"compiling without a compile cache: {cache.directory} cannot be written ({error}); "
                          f"set {CACHE_ENV} to a writable directory", stacklevel=2)
            return None
        return cache

    @property
    def artifacts(self) -> list[Path]:
        """The saved blobs, oldest first."""
        return sorted(self.directory.glob("artifacts-*.bin"), key=lambda path: path.stat().st_mtime)

    def activate(self) -> int:
        """Point Inductor's and Triton's caches under the cache root (unless set already) and preload
        this engine kind's saved blobs; returns how many loaded."""
        root = self.directory.parent.parent
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
        loaded = 0
        for blob in self.artifacts:
            # PyTorch checks a blob (a checksum) and returns None for one it cannot read.
            if torch.compiler.load_cache_artifacts(blob.read_bytes()) is None:
                warnings.warn(f"skipping the unreadable compile cache blob {blob}", stacklevel=2)
            else:
                loaded += 1
        return loaded

    def save(self) -> bool:
        """Save what this process has compiled or loaded so far (PyTorch records it) as a blob named by
        its hash, unless an identical one is there; returns whether a blob was written."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        blob = self.directory / f"artifacts-{hashlib.sha256(saved[0]).hexdigest()[:20]}.bin"
        if blob.exists():
            return False
        _write_atomically(blob, saved[0])
        return True


def clear(root: Path | None = None) -> Path:
    """Delete the compile caches under ``root`` (default ``cache_root()``); returns the root."""
    root = root or cache_root()
    for name in ("compile", "inductor", "triton"):
        shutil.rmtree(root / name, ignore_errors=True)
    return root


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a unique file beside ``path``, flush it to disk, then rename it over ``path``."""
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
