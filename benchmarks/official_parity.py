"""Parity with the official LLaDA code: same checkpoint, same inputs -> same logits and same tokens.

Needs a directory holding the official ``modeling_llada.py`` and ``configuration_llada.py`` (as shipped
with the released checkpoints) and the official ``generate.py``; none of them is part of this project.
The script writes a random checkpoint in the official layout with our ``save_model``, loads it with
both implementations (the official classes built from its config.json and given the safetensors
weights by their official names, which sidesteps version drift in ``transformers``' loading code),
and compares:
  1. logits, bit for bit, without and with a left-padding attention mask;
  2. ``generate`` outputs at temperature 0 (and with a shared RNG seed, at temperature > 0 and with
     random remasking) over a grid of step/block/CFG settings.

    python benchmarks/official_parity.py --official-dir /path/to/official --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from llada.diffusion.sampling import generate
from llada.model.checkpoint import save_model
from llada.model.config import preset
from llada.model.transformer import LLaDAModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRID = [  # (steps, gen_length, block_length, temperature, cfg_scale, remasking, left-padded prompts)
    (32, 32, 32, 0.0, 0.0, "low_confidence", False),
    (32, 64, 16, 0.0, 0.0, "low_confidence", False),
    (16, 64, 8, 0.0, 0.0, "low_confidence", False),
    (64, 64, 32, 0.0, 0.0, "low_confidence", False),
    (32, 64, 16, 0.0, 0.0, "low_confidence", True),
    (32, 32, 8, 0.0, 1.0, "low_confidence", False),
    (32, 32, 8, 0.0, 1.0, "low_confidence", True),
    (32, 32, 16, 0.0, 0.0, "random", False),
    (32, 32, 16, 0.7, 0.0, "low_confidence", False),
]


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_official_model(official_dir: Path, checkpoint: Path, scratch: Path, dtype: torch.dtype, device: str):
    """The official LLaDAModelLM with the checkpoint's weights (the modeling file uses relative imports,
    so it is imported as a package)."""
    package = scratch / "official_llada"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("modeling_llada.py", "configuration_llada.py"):
        shutil.copy(official_dir / name, package / name)
    sys.path.insert(0, str(scratch))
    modeling = importlib.import_module("official_llada.modeling_llada")
    config = modeling.LLaDAConfig(**json.loads((checkpoint / "config.json").read_text()))
    config.use_cache = False  # newer transformers no longer give every config this attribute
    model = modeling.LLaDAModelLM(config, init_params=False)
    weights = {}
    for file in checkpoint.glob("*.safetensors"):
        weights.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise SystemExit(f"official model: missing {missing}, unexpected {unexpected}")
    return model.to(device=device, dtype=dtype).eval()


def write_checkpoint(directory: Path, config_name: str, dtype: torch.dtype) -> None:
    config = preset(config_name)
    torch.manual_seed(0)
    model = LLaDAModel(config)
    with torch.no_grad():  # non-trivial norm gains, so that their placement matters
        for block in model.blocks:
            block.attn_norm.weight.uniform_(0.5, 1.5)
            block.ff_norm.weight.uniform_(0.5, 1.5)
    save_model(model, directory, dtype=dtype, max_shard_size="200MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", required=True, type=Path)
    parser.add_argument("--preset", default="tiny", help="model shape (tiny, small, ...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--prompt-length", type=int, default=24)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    official_generate = load_module(args.official_dir / "generate.py", "official_generate").generate
    report: dict = {"preset": args.preset, "device": args.device, "dtype": args.dtype, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "ckpt"
        write_checkpoint(directory, args.preset, dtype)
        ours = LLaDAModel.from_pretrained(directory, dtype=dtype, device=args.device)
        reference = load_official_model(args.official_dir, directory, Path(scratch), dtype, args.device)
        config = ours.config
        generator = torch.Generator().manual_seed(1)
        vocab = config.vocab_size - 8  # keep clear of the special ids at the top of the tiny presets
        ids = torch.randint(0, vocab, (2, 64), generator=generator).to(args.device)
        mask = torch.ones_like(ids)
        mask[0, :10] = 0
        with torch.no_grad():
            logits = {}
            for label, attention in (("no_mask", None), ("left_padding", mask)):
                a = ours(ids, attention_mask=attention).logits
                b = reference(ids, attention_mask=attention).logits
                real = slice(None) if attention is None else (attention.bool()[..., None].expand_as(a))
                diff = (a.float() - b.float()).abs()[real] if attention is not None else (a.float() - b.float()).abs()
                logits[label] = {"bitwise_equal": bool(torch.equal(a, b)), "max_abs_diff": diff.max().item()}
                print(f"logits {label:13s} bitwise equal: {logits[label]['bitwise_equal']}  "
                      f"max |diff| {logits[label]['max_abs_diff']:.3g}", flush=True)
        report["logits"] = logits

        prompts = torch.randint(0, vocab, (3, args.prompt_length), generator=generator).to(args.device)
        padded = torch.ones_like(prompts)
        padded[0, :7] = 0
        padded[2, :2] = 0
        rows = []
        for steps, gen_length, block_length, temperature, cfg_scale, remasking, pad in GRID:
            settings = {"steps": steps, "gen_length": gen_length, "block_length": block_length,
                        "temperature": temperature, "cfg_scale": cfg_scale, "remasking": remasking,
                        "mask_id": config.mask_token_id}
            # The official code needs a mask whenever cfg_scale > 0; an all-ones mask means "no padding".
            attention = padded if pad else torch.ones_like(prompts)
            inputs = torch.where(attention.bool(), prompts, config.eos_token_id)
            torch.manual_seed(1234)
            expected = official_generate(reference, inputs, attention_mask=attention, **settings)
            torch.manual_seed(1234)
            got = generate(ours, inputs, attention_mask=attention, **settings)
            same = [bool(torch.equal(expected[i], got[i])) for i in range(prompts.shape[0])]
            agreement = (expected[:, args.prompt_length:] == got[:, args.prompt_length:]).float().mean().item()
            rows.append({**settings, "left_padded": pad, "identical_rows": sum(same), "rows": len(same),
                         "token_agreement": agreement})
            print(f"generate steps={steps:3d} gen={gen_length:3d} block={block_length:3d} T={temperature} "
                  f"cfg={cfg_scale} {remasking:14s} padded={pad!s:5s}: {sum(same)}/{len(same)} identical, "
                  f"token agreement {agreement:.4f}", flush=True)
        report["generate"] = rows
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if all(r["identical_rows"] == r["rows"] for r in rows if r["temperature"] == 0) else 1)


if __name__ == "__main__":
    main()
