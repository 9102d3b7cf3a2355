"""The compile cache: where it lives, what separates two engines' caches, and reuse across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from engine_support import model

from llada.cli.main import main
from llada.engine import compile_cache
from llada.engine.compile_cache import CompileCache, cache_root


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLADA_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LLADA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "llada"


def test_each_kind_of_engine_has_its_own_directory_described_by_its_key(tmp_path: Path) -> None:
    net = model()
    first = CompileCache.for_engine(net, fused=False, root=tmp_path)
    assert CompileCache.for_engine(net, fused=False, root=tmp_path) == first
    others = {CompileCache.for_engine(net, fused=True, root=tmp_path).directory,
              CompileCache.for_engine(model().float(), fused=False, root=tmp_path).directory,
              CompileCache.for_engine(model(n_layers=3), fused=False, root=tmp_path).directory}
    assert first.directory not in others and len(others) == 3
    key = json.loads((first.directory / "key.json").read_text())
    assert key["dtype"] == "torch.float64" and key["torch"] == torch.__version__ and key["fused"] is False


def test_an_unreadable_blob_is_reported_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # set, then removed: restored after the test
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    cache = CompileCache.for_engine(model(), fused=False, root=tmp_path)
    assert cache.activate() == 0  # nothing saved yet
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    (cache.directory / "artifacts-torn.bin").write_bytes(b"not a cache")
    with pytest.warns(UserWarning, match="unreadable compile cache blob"):
        assert cache.activate() == 0


def test_an_unwritable_cache_directory_turns_the_cache_off(tmp_path: Path) -> None:
    """A read-only home or a file in the way: compiling goes on without a cache, with a warning."""
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    with pytest.warns(UserWarning, match="without a compile cache"):
        assert CompileCache.for_engine(model(), fused=False, root=blocker) is None


def test_cache_commands_show_and_clear_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = CompileCache.for_engine(model(), fused=False, root=tmp_path)
    (cache.directory / "artifacts-0.bin").write_bytes(b"x" * 10)
    assert main(["cache", "info", "--dir", str(tmp_path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["compiled_engines"] == [cache.directory.name] and shown["bytes"]["compile"] > 10
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert not (tmp_path / "compile").exists()
    compile_cache.clear(tmp_path)  # clearing nothing is fine


COMPILED_RUN = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from engine_support import model, prompts
    import torch
    from llada.engine.engine import Engine, GenerationSettings
    net = model() if sys.argv[2] == "cpu" else model().to(sys.argv[2], torch.bfloat16)
    engine = Engine(net, compile=True)
    loaded = engine.runtime.compile_cache_loaded
    settings = GenerationSettings(gen_length=8, block_length=4, threshold=0.3)
    engine.warm_up(settings, prompt_lengths=(6,), progress=False)
    result = engine.generate(prompts((4, 6)), settings)
    print(json.dumps({"had_cache": loaded, "tokens": [r.tokens for r in result]}))
""")


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.inductor),
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
])
def test_a_second_process_starts_from_the_first_ones_compiled_artifacts(tmp_path: Path, device: str) -> None:
    """Two processes compile the same engine with one cache root: the first writes the artifacts, the
    second finds them (and answers the same). On a GPU the engine also captures CUDA graphs (in bf16)."""
    environment = {**os.environ, "LLADA_CACHE_DIR": str(tmp_path)}
    environment.pop("TORCHINDUCTOR_CACHE_DIR", None)
    environment.pop("TRITON_CACHE_DIR", None)
    tests = str(Path(__file__).parents[1])
    runs = [json.loads(subprocess.run([sys.executable, "-c", COMPILED_RUN, tests, device], env=environment,
                                      check=True, capture_output=True, text=True,
                                      timeout=900).stdout.splitlines()[-1])
            for _ in range(2)]
    assert runs[0]["had_cache"] == 0 and runs[1]["had_cache"] >= 1
    assert runs[0]["tokens"] == runs[1]["tokens"]
    assert (tmp_path / "inductor").is_dir() and any((tmp_path / "compile").glob("*/artifacts-*.bin"))
