"""LoRA through peft: which weights it adapts, PEFT's own file layout (read back by peft itself),
merging, and loading an adapter directory as a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

pytest.importorskip("peft")
from peft import PeftModel

from llada.model.loading import load
from llada.model.lora import (
    adapter_base,
    adapter_state,
    add_lora,
    is_adapter,
    merge_adapter,
    read_adapter_state,
    save_adapter,
)
from llada.model.transformer import LLaDAModel

ALL = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


def _trained(model: LLaDAModel) -> None:
    """Non-zero adapters (peft starts B at zero, which would make every comparison trivial)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))


def test_only_block_projections_train_and_the_head_is_left_alone() -> None:
    model = tiny_model(torch.float32, weight_tying=False)
    base = {name: value.clone() for name, value in model.state_dict().items()}
    add_lora(model, rank=2, alpha=4.0, dropout=0.0, targets=ALL)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    adapted = {name.split(".lora_")[0] for name in trainable}
    assert adapted == {f"blocks.{i}.{target}" for i in range(model.config.n_layers) for target in ALL}
    assert isinstance(model.ff_out, torch.nn.Linear)  # the output head, also named ff_out, is not wrapped
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    _trained(model)
    model(ids).logits.sum().backward()
    assert all(p.grad is None for name, p in model.named_parameters() if not p.requires_grad)
    assert not torch.allclose(model(ids).logits, before)
    for name, value in base.items():  # the base weights are where peft moved them, unchanged
        moved = name.replace(".weight", ".base_layer.weight") if any(f".{t}." in name for t in ALL) \
            and name.startswith("blocks.") else name
        assert torch.equal(model.state_dict()[moved], value), name
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_model(), rank=0, alpha=1.0, dropout=0.0, targets=ALL)


def test_saved_adapter_is_peft_layout_and_merges(tmp_path: Path, checkpoint_dir: Path) -> None:
    model = LLaDAModel.from_pretrained(checkpoint_dir)
    handle = add_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "ff_out"), base=checkpoint_dir)
    _trained(model)
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(ids).logits
    save_adapter(tmp_path / "adapter", handle, model.state_dict())
    assert is_adapter(tmp_path / "adapter") and not is_adapter(checkpoint_dir)
    assert adapter_base(tmp_path / "adapter") == checkpoint_dir.resolve()
    # peft itself reads it back onto a fresh base: same outputs.
    fresh = PeftModel.from_pretrained(LLaDAModel.from_pretrained(checkpoint_dir), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, adapted)
    # Names come back as the adapted model gives them (what a resumed run loads).
    assert {k: v.shape for k, v in read_adapter_state(tmp_path / "adapter").items()} == \
        {k: v.shape for k, v in adapter_state(model.state_dict()).items()}
    merged = merge_adapter(LLaDAModel.from_pretrained(checkpoint_dir), tmp_path / "adapter")
    assert type(merged) is LLaDAModel and not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    # An adapter directory loads as a model: its base, merged.
    loaded, tokenizer = load(tmp_path / "adapter", "cpu", "fp32")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, adapted, rtol=1e-4, atol=1e-4)
    assert tokenizer.ids.mask == model.config.mask_token_id


def test_a_moved_or_unrecorded_base_is_a_clear_error(tmp_path: Path, checkpoint_dir: Path) -> None:
    model = LLaDAModel.from_pretrained(checkpoint_dir)
    handle = add_lora(model, rank=2, alpha=2.0, dropout=0.0, targets=ALL, base=tmp_path / "gone")
    save_adapter(tmp_path / "adapter", handle, model.state_dict())
    with pytest.raises(FileNotFoundError, match="edit base_model_name_or_path"):
        load(tmp_path / "adapter", "cpu", "fp32")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="records no base model"):
        adapter_base(tmp_path / "adapter")
