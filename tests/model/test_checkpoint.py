"""Checkpoint files: the official names and layout, round trips, sharding, atomic writes and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from llada.model import checkpoint
from llada.model.checkpoint import CheckpointError, load_model, save_model
from llada.model.transformer import LLaDAModel

BLOCK_KEYS = {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "attn_norm", "ff_norm"}


def stored_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118 - safe_open is not iterable
    return tensors


def test_official_weight_names_and_values(tmp_path: Path) -> None:
    """Files hold exactly the official names, each with its module's weight."""
    model = tiny_model(torch.float32)
    save_model(model, tmp_path / "ckpt")
    tensors = stored_tensors(tmp_path / "ckpt")
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    expected |= {f"model.transformer.blocks.{i}.{key}.weight" for i in range(2) for key in BLOCK_KEYS}
    assert set(tensors) == expected
    torch.testing.assert_close(tensors["model.transformer.blocks.1.k_proj.weight"], model.blocks[1].k_proj.weight)
    torch.testing.assert_close(tensors["model.transformer.blocks.0.up_proj.weight"], model.blocks[0].up_proj.weight)
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert raw["architectures"] == ["LLaDAModelLM"] and raw["d_model"] == 64 and raw["torch_dtype"] == "float32"


def test_tied_checkpoint_has_no_output_projection(tmp_path: Path) -> None:
    model = tiny_model(weight_tying=True)
    save_model(model, tmp_path / "c")
    assert "model.transformer.ff_out.weight" not in stored_tensors(tmp_path / "c")
    ids = torch.randint(0, 500, (1, 5))
    torch.testing.assert_close(load_model(tmp_path / "c")(ids).logits, model(ids).logits)


@pytest.mark.parametrize("shard_size", ["5GB", "60KB"])
def test_round_trip_single_and_sharded(tmp_path: Path, shard_size: str) -> None:
    model = tiny_model()
    save_model(model, tmp_path / "c", max_shard_size=shard_size)
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    if shard_size == "5GB":
        assert files == ["config.json", "model.safetensors"]
    else:
        index = json.loads((tmp_path / "c" / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        for shard in shards:  # each shard fits the limit, or is one tensor larger than the limit on its own
            with safe_open(str(tmp_path / "c" / shard), framework="pt") as handle:
                sizes = [handle.get_tensor(n).numel() * 8 for n in handle.keys()]  # noqa: SIM118 - safe_open is not iterable
            assert sum(sizes) <= 60_000 or len(sizes) == 1
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                      for t in stored_tensors(tmp_path / "c").values())
    loaded = load_model(tmp_path / "c")
    assert loaded.dtype == torch.float64 and not any(p.is_meta for p in loaded.parameters())
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 500, (2, 9))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-12, atol=1e-14)  # BLAS may vary with alignment


def test_load_casts_dtype_and_saves_in_dtype(tmp_path: Path) -> None:
    save_model(tiny_model(), tmp_path / "c", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in stored_tensors(tmp_path / "c").values())
    model = LLaDAModel.from_pretrained(tmp_path / "c", dtype=torch.float32)
    assert model.dtype == torch.float32 and model.rope.dtype == torch.float32


def test_overwrite_keeps_tokenizer_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "c"
    save_model(tiny_model(seed=1), target, max_shard_size="60KB")
    (target / "tokenizer.json").write_text("{}")
    save_model(tiny_model(seed=2), target)  # now a single file: the old shards must be gone
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing shards (simulated) neither corrupts the old checkpoint nor leaves debris."""
    target = tmp_path / "c"
    original = tiny_model(seed=1)
    save_model(original, target)
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model(seed=2), target, max_shard_size="60KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    ids = torch.randint(0, 500, (1, 4))
    torch.testing.assert_close(load_model(target)(ids).logits, original(ids).logits)


def test_missing_directory_config_and_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path / "empty")
    save_model(tiny_model(), tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path / "c")


def test_missing_shard_is_named(tmp_path: Path) -> None:
    save_model(tiny_model(), tmp_path / "c", max_shard_size="60KB")
    shards = sorted((tmp_path / "c").glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[1].name} is missing \(index lists {len(shards)} shards"):
        load_model(tmp_path / "c")


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    save_model(tiny_model(), tmp_path / "c")
    file = tmp_path / "c" / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(tmp_path / "c")


def test_corrupt_config(tmp_path: Path) -> None:
    save_model(tiny_model(), tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"d_model": 64, "n_layers": 2, "n_heads": 4,
                                                            "vocab_size": 512, "block_type": "sequential"}))
    with pytest.raises(CheckpointError, match="block_type"):
        load_model(tmp_path / "c")


def test_missing_unknown_and_misshaped_weights(tmp_path: Path) -> None:
    save_model(tiny_model(), tmp_path / "c")
    file = tmp_path / "c" / "model.safetensors"
    tensors = stored_tensors(tmp_path / "c")

    def rewrite(changed: dict[str, torch.Tensor]) -> None:
        save_file(changed, str(file))

    rewrite({k: v for k, v in tensors.items() if k != "model.transformer.blocks.1.v_proj.weight"})
    with pytest.raises(CheckpointError, match="1 weights missing.*blocks.1.v_proj"):
        load_model(tmp_path / "c")
    rewrite({**tensors, "model.transformer.blocks.2.q_proj.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unknown weights.*blocks.2.q_proj"):
        load_model(tmp_path / "c")
    rewrite({**tensors, "model.transformer.ln_f.weight": torch.zeros(65)})
    with pytest.raises(CheckpointError, match=r"ln_f.weight has shape \(65,\)"):
        load_model(tmp_path / "c")


def test_index_pointing_nowhere_or_malformed(tmp_path: Path) -> None:
    save_model(tiny_model(), tmp_path / "c")
    (tmp_path / "c" / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(tmp_path / "c")


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1.5 KB", 1500), (7, 7)])
def test_parse_size(text, expected) -> None:
    assert checkpoint.parse_size(text) == expected


@pytest.mark.parametrize("text", ["5 parsecs", "", "-3GB", 0])
def test_parse_size_rejects(text) -> None:
    with pytest.raises(ValueError):
        checkpoint.parse_size(text)
