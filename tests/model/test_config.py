"""ModelConfig: parameter and FLOP counts against built models, presets, and the official config.json mapping."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llada.model.config import PRESETS, ModelConfig, config_from_hf_dict, config_to_hf_dict, preset
from llada.model.transformer import LLaDAModel


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tied", [False, True])
def test_num_parameters_matches_built_model(name: str, tied: bool) -> None:
    """The formula counts exactly the parameters of the module tree (built on meta: no memory)."""
    config = preset(name, weight_tying=tied)
    with torch.device("meta"):
        model = LLaDAModel(config)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_8b_preset_is_the_released_architecture() -> None:
    """LLaDA-8B: 32 layers of width 4096, SwiGLU 12288, vocabulary 126464, about 8.0B weights."""
    config = preset("8b")
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads) == (4096, 32, 32, 32)
    assert (config.mlp_hidden_size, config.vocab_size, config.rope_theta, config.rms_norm_eps) == (12288, 126464, 5e5, 1e-5)
    assert 8.0e9 < config.num_parameters() < 8.05e9


@pytest.mark.parametrize("length", [8, 33])
def test_flops_per_token_matches_flop_counter(length: int) -> None:
    """flops_per_token equals what torch's FLOP counter measures on a real forward pass.

    The math SDPA backend is forced because the counter does not see the fused CPU attention kernel.
    """
    config = preset("tiny")
    model = LLaDAModel(config)
    batch = 2
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, config.vocab_size, (batch, length)))
    assert counter.get_total_flops() == pytest.approx(batch * length * config.flops_per_token(length), rel=1e-9)
    assert config.flops_per_token(length, training=True) == 3 * config.flops_per_token(length)


def test_hf_dict_round_trip() -> None:
    config = preset("tiny", weight_tying=True)
    assert config_from_hf_dict(config_to_hf_dict(config)) == config


def test_official_8b_config_parses() -> None:
    """The keys and values of the released config.json give the 8b preset."""
    raw = {"activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
           "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
           "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
           "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
           "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
           "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
           "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096, "mlp_hidden_size": 12288,
           "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32,
           "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05,
           "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
           "transformers_version": "4.46.3", "use_cache": False, "vocab_size": 126464, "weight_tying": False}
    config = config_from_hf_dict(raw)
    assert config == preset("8b", eot_token_id=None)


@pytest.mark.parametrize("key,value", [("block_type", "sequential"), ("alibi", True), ("include_bias", True),
                                       ("scale_logits", True), ("clip_qkv", 8.0), ("activation_type", "gelu")])
def test_unsupported_values_are_named(key: str, value: object) -> None:
    raw = config_to_hf_dict(preset("tiny"))
    raw[key] = value
    with pytest.raises(ValueError, match=key):
        config_from_hf_dict(raw)


def test_unknown_keys_are_a_warning_and_missing_keys_an_error(caplog: pytest.LogCaptureFixture) -> None:
    raw = config_to_hf_dict(preset("tiny"))
    assert config_from_hf_dict({**raw, "sliding_window": 128}) == preset("tiny")
    assert "does not know: ['sliding_window']" in caplog.text
    del raw["d_model"]
    with pytest.raises(ValueError, match="d_model"):
        config_from_hf_dict(raw)


@pytest.mark.parametrize("changes,field", [({"d_model": 65}, "n_heads"), ({"n_kv_heads": 3}, "n_kv_heads"),
                                           ({"mask_token_id": 10_000}, "mask_token_id"), ({"n_layers": 0}, "n_layers"),
                                           ({"embedding_size": 10}, "embedding_size")])
def test_invalid_configs_are_rejected(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        preset("tiny", **changes)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="tiny"):
        preset("huge")


def test_gqa_config_defaults() -> None:
    config = ModelConfig(d_model=64, n_layers=1, n_heads=4, mlp_hidden_size=8, vocab_size=32, mask_token_id=31,
                         eos_token_id=30, pad_token_id=None, eot_token_id=None)
    assert config.n_kv_heads == 4 and config.embedding_size == 32


# What LLaDAConfig() writes with nothing set (the official configuration's dataclass defaults, GPT-2's
# shape and block), as ``save_pretrained`` stores it.
OFFICIAL_DEFAULTS = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "n_layers": 12, "mlp_ratio": 4, "mlp_hidden_size": None,
    "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1, "alibi": False,
    "alibi_bias_max": 8.0, "rope": False, "rope_full_precision": True, "flash_attention": False,
    "attention_dropout": 0.1, "multi_query_attention": None, "attention_layer_norm": False, "residual_dropout": 0.1,
    "embedding_dropout": 0.1, "input_emb_norm": False, "layer_norm_type": "default", "layer_norm_with_affine": True,
    "rms_norm_eps": 1e-05, "attention_layer_norm_with_affine": True, "max_sequence_length": 1024,
    "rope_theta": 10000.0, "include_qkv_bias": False, "include_bias": False, "bias_for_layer_norm": None,
    "scale_logits": False, "vocab_size": 50257, "embedding_size": 50304, "weight_tying": True,
    "eos_token_id": 50256, "pad_token_id": 50256, "mask_token_id": 50256, "init_device": None, "init_fn": "normal",
    "init_std": 0.02, "init_cutoff_factor": None, "precision": None, "use_cache": False,
    "architectures": ["LLaDAModelLM"], "model_type": "llada", "transformers_version": "4.46.3",
}


def test_a_fine_tune_saved_with_the_official_defaults_loads(caplog: pytest.LogCaptureFixture) -> None:
    """A llama-shaped checkpoint whose config keeps the official class's other defaults (null
    bias_for_layer_norm, n_kv_heads and mlp_hidden_size, 0.1 dropouts) and extra training keys."""
    raw = OFFICIAL_DEFAULTS | {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
                               "weight_tying": False, "mask_token_id": 50255, "train_max_sequence_length": 4096,
                               "use_scheduler_head": False, "torch_dtype": "bfloat16", "return_dict": True}
    config = config_from_hf_dict(raw)
    assert (config.n_kv_heads, config.mlp_hidden_size, config.embedding_size) == (12, 3072, 50304)
    assert "dropout" in caplog.text and "used only in training" in caplog.text
    assert "['train_max_sequence_length', 'use_scheduler_head']" in caplog.text
    assert caplog.text.count("used only in training") == 1  # said once, not once per key


def test_the_official_default_architecture_is_refused_by_name() -> None:
    """Left at its defaults the official class describes a GPT-2-like sequential block: not this network."""
    with pytest.raises(ValueError, match="block_type='sequential'"):
        config_from_hf_dict(OFFICIAL_DEFAULTS)
    with pytest.raises(ValueError, match="bias_for_layer_norm=True"):
        config_from_hf_dict(config_to_hf_dict(preset("tiny")) | {"bias_for_layer_norm": True})
    with pytest.raises(ValueError, match="include_bias=True"):  # a null bias_for_layer_norm follows it
        config_from_hf_dict(config_to_hf_dict(preset("tiny")) | {"bias_for_layer_norm": None, "include_bias": True})


def test_numerics_only_keys_are_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    raw = config_to_hf_dict(preset("tiny")) | {"flash_attention": True, "rope_full_precision": False}
    assert config_from_hf_dict(raw) == preset("tiny")
    assert "flash_attention=True" in caplog.text and "rope_full_precision=False" in caplog.text
