"""Model configuration: the architecture hyper-parameters, named presets, and the official config.json.

This module knows the *meaning* of the official LLaDA ``config.json`` keys (OLMo-style names such as
``d_model`` and ``mlp_hidden_size``) and which of their values this implementation supports. It does
not read or write files; ``checkpoint.py`` does that.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Official LLaDA-8B special token ids; used only as preset defaults. Checkpoints and tokenizer files
# override them, so no code path relies on these numbers for a checkpoint that says otherwise.
OFFICIAL_MASK_ID = 126336
OFFICIAL_EOS_ID = 126081
OFFICIAL_EOT_ID = 126348


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a LLaDA mask predictor (a LLaMA-style Transformer without a causal mask)."""

    d_model: int = 4096  # hidden size
    n_layers: int = 32
    n_heads: int = 32  # query heads
    n_kv_heads: int | None = None  # key/value heads; None means n_heads (multi-head attention)
    mlp_hidden_size: int = 12288  # SwiGLU inner width
    vocab_size: int = 126464  # tokens the tokenizer can produce
    embedding_size: int | None = None  # rows of the embedding / logits; None means vocab_size
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False  # share the embedding and output projection
    max_sequence_length: int = 4096  # longest sequence the RoPE tables cover
    init_std: float = 0.02
    mask_token_id: int = OFFICIAL_MASK_ID
    eos_token_id: int = OFFICIAL_EOS_ID
    pad_token_id: int | None = OFFICIAL_EOS_ID
    eot_token_id: int | None = OFFICIAL_EOT_ID  # end-of-turn; not an official config key

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size",
                     "embedding_size", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"config.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"config.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dimension d_model/n_heads = {self.head_dim} must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"config.embedding_size ({self.embedding_size}) is smaller than vocab_size ({self.vocab_size})")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "eot_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.embedding_size:
                raise ValueError(f"config.{name} = {value} is outside the embedding table (size {self.embedding_size})")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("config.rope_theta and config.rms_norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def num_parameters(self, include_embedding: bool = True) -> int:
        """Number of weights, counted from the shapes (the tests check it against a built model)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.d_model * (2 * self.d_model + 2 * kv_dim)  # q, attn_out, k, v
        mlp = 3 * self.d_model * self.mlp_hidden_size  # gate, up, down
        norms = 2 * self.d_model
        total = self.n_layers * (attention + mlp + norms) + self.d_model  # + final norm
        embedding = self.embedding_size * self.d_model
        output = 0 if self.weight_tying else embedding
        if include_embedding:
            total += embedding + output
        else:
            total += output
        return total

    def flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Matmul FLOPs per token for one forward pass (x3 with ``training`` for forward + backward).

        Counts 2 FLOPs per multiply-add of every weight matmul (the embedding lookup is free, the
        output projection is not) plus attention's QK^T and AV, which grow with ``seq_len``
        (bidirectional: every query sees all ``seq_len`` keys).
        """
        weight_flops = 2 * self.num_parameters(include_embedding=False)
        weight_flops -= 2 * (2 * self.n_layers + 1) * self.d_model  # norm weights are not matmuls
        attention_flops = 2 * 2 * self.n_layers * seq_len * self.d_model
        forward = weight_flops + attention_flops
        return float(3 * forward if training else forward)

    def memory_bytes(self, bytes_per_param: int = 2) -> int:
        """Bytes needed to hold the weights in a dtype of ``bytes_per_param`` bytes."""
        return self.num_parameters() * bytes_per_param

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # For unit tests: runs in milliseconds on a CPU.
    "tiny": ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=192, vocab_size=512,
                        max_sequence_length=512, mask_token_id=511, eos_token_id=510, pad_token_id=510,
                        eot_token_id=509),
    # The shipped demo model: ~24M parameters with a 4k vocabulary (49 MB in bf16). Deep and narrow:
    # its tasks (column arithmetic, list manipulation) reward depth more than width.
    "demo": ModelConfig(d_model=384, n_layers=12, n_heads=6, mlp_hidden_size=1024, vocab_size=4096,
                        max_sequence_length=1024, mask_token_id=4095, eos_token_id=4094, pad_token_id=4094,
                        eot_token_id=4093),
    # Tens of millions of parameters with a ~16k vocabulary.
    "small": ModelConfig(d_model=512, n_layers=8, n_heads=8, mlp_hidden_size=1536, vocab_size=16384,
                         max_sequence_length=1024, mask_token_id=16383, eos_token_id=16382, pad_token_id=16382,
                         eot_token_id=16381),
    # ~1B parameters with the official vocabulary: the training-throughput benchmark's model.
    "1b": ModelConfig(d_model=2048, n_layers=16, n_heads=16, mlp_hidden_size=5632, vocab_size=126464,
                      max_sequence_length=4096),
    # The released LLaDA-8B-Base / LLaDA-8B-Instruct architecture.
    "8b": ModelConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                      vocab_size=126464, embedding_size=126464, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_sequence_length=4096),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, optionally with fields changed."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


# --- the official config.json ------------------------------------------------------------------

# Keys of the official config.json that map one-to-one onto ModelConfig fields.
_DIRECT_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
                "rope_theta", "rms_norm_eps", "weight_tying", "max_sequence_length", "init_std", "mask_token_id",
                "eos_token_id", "pad_token_id", "eot_token_id")

# Official keys whose value must be exactly this for the architecture implemented here; any other
# value would silently change the network, so it is rejected.
_REQUIRED_VALUES: dict[str, Any] = {
    "block_type": "llama",
    "activation_type": "silu",
    "layer_norm_type": "rms",
    "rope": True,
    "alibi": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "scale_logits": False,
    "attention_layer_norm": False,
    "input_emb_norm": False,
    "clip_qkv": None,
    "multi_query_attention": None,
    "bias_for_layer_norm": False,
    "layer_norm_with_affine": True,
    "block_group_size": 1,
}

# Official keys whose other values keep the architecture but change numerics slightly; this
# implementation always computes RoPE in float32 and attention with SDPA, so it says so.
_NUMERICS_VALUES: dict[str, Any] = {"rope_full_precision": True, "flash_attention": False}

# Official keys that only matter for training-time behaviour or bookkeeping of the original code base,
# and the bookkeeping keys Hugging Face's ``PretrainedConfig`` writes: read and ignored in silence.
_IGNORED_KEYS = {
    "activation_type", "alibi_bias_max", "architectures", "attention_layer_norm_with_affine",
    "auto_map", "bos_token_id", "flash_attention", "init_cutoff_factor", "init_device",
    "init_fn", "mlp_ratio", "model_type", "precision", "rope_full_precision", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "layer_norm_eps", "tie_word_embeddings", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention", "_name_or_path",
    "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params",
    "keys_to_ignore_at_inference",
}
# Dropout applies only while training: inference is the same whatever its rate, and this
# implementation trains without it, which the loader says once when a checkpoint asks for it.
_DROPOUT_KEYS = ("attention_dropout", "residual_dropout", "embedding_dropout")


def config_from_hf_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a ``config.json`` the official LLaDA code (or a fine-tune of it) wrote.

    Raises ValueError naming the key when a value would change what the network computes (e.g. a
    non-llama ``block_type``) or when a required key is missing. Training-only values (dropout) and keys
    this implementation does not know are accepted with one warning naming them. ``null`` means the
    official default: ``bias_for_layer_norm`` follows ``include_bias``, ``n_kv_heads`` is ``n_heads``,
    ``mlp_hidden_size`` is ``mlp_ratio * d_model`` and ``embedding_size`` is ``vocab_size``.
    """
    raw = dict(raw)
    if raw.get("bias_for_layer_norm", False) is None:
        raw["bias_for_layer_norm"] = raw.get("include_bias", False)
    for key, required in _REQUIRED_VALUES.items():
        value = raw.get(key, required)
        if value != required and not (required in (None, False) and value in (None, False)):
            raise ValueError(f"{source}: unsupported {key}={value!r} (this implementation supports {required!r})")
    dropouts = {key: raw[key] for key in _DROPOUT_KEYS if raw.get(key)}
    if dropouts:
        logger.warning("%s: dropout %s is used only in training; answers are unaffected, and training here "
                       "runs without dropout", source, dropouts)
    for key, usual in _NUMERICS_VALUES.items():
        if key in raw and raw[key] != usual:
            logger.warning("%s: %s=%r is computed as %s=%r here (same architecture, slightly different rounding)",
                           source, key, raw[key], key, usual)
    missing = [key for key in ("d_model", "n_layers", "n_heads", "vocab_size") if key not in raw]
    if missing:
        raise ValueError(f"{source} lacks required keys {missing}; is this a LLaDA checkpoint?")
    known = set(_DIRECT_KEYS) | set(_REQUIRED_VALUES) | _IGNORED_KEYS | set(_DROPOUT_KEYS)
    unknown = sorted(set(raw) - known)
    if unknown:
        logger.warning("%s: ignoring keys this implementation does not know: %s", source, unknown)
    fields = {key: raw[key] for key in _DIRECT_KEYS if raw.get(key) is not None}
    mlp_ratio = raw.get("mlp_ratio")
    if "mlp_hidden_size" not in fields and mlp_ratio:
        fields["mlp_hidden_size"] = int(mlp_ratio * raw["d_model"])
    if "tie_word_embeddings" in raw and "weight_tying" not in raw:
        fields["weight_tying"] = bool(raw["tie_word_embeddings"])
    if "eot_token_id" not in raw:
        fields["eot_token_id"] = None  # known only from the tokenizer files
    try:
        return ModelConfig(**fields)
    except TypeError as error:  # a field of the wrong kind, e.g. a string for an int
        raise ValueError(f"{source}: {error}") from error


def config_to_hf_dict(config: ModelConfig) -> dict[str, Any]:
    """The official ``config.json`` dictionary for ``config`` (loadable by the original modeling code)."""
    raw: dict[str, Any] = {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "clip_qkv": None,
        "embedding_dropout": 0.0,
        "flash_attention": False,
        "include_bias": False,
        "init_device": "meta",
        "init_fn": "mitchell",
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mlp_ratio": math.ceil(config.mlp_hidden_size / config.d_model),
        "multi_query_attention": None,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rope": True,
        "rope_full_precision": True,
        "scale_logits": False,
        "use_cache": False,
    }
    for key in _DIRECT_KEYS:
        value = getattr(config, key)
        if key == "eot_token_id" and value is None:
            continue
        raw[key] = value
    return dict(sorted(raw.items()))
