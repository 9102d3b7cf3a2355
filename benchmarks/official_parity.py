"""Parity with the official LLaDA code: same checkpoint, same inputs -> same logits and same tokens.

Needs a directory holding the official ``modeling_llada.py`` and ``configuration_llada.py`` (as shipped
with the released checkpoints) and the official ``generate.py``; none of them is part of this project.
The script writes a random checkpoint in the official layout with our ``save_model``, loads it with
both implementations (the official one through ``transformers`` with ``trust_remote_code``), and
compares:
  1. logits, bit for bit, without and with a left-padding attention mask;
  2. ``generate`` outputs at temperature 0 (and with a shared RNG seed, at temperature > 0 and with
     random remasking) over a grid of step/block/CFG settings.

    python benchmarks/official_parity.py --official-dir /path/to/official --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from llada.checkpoint import save_model
from llada.config import preset
from llada.model import LLaDAModel
from llada.sampling import generate

AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRID = [  # (steps, gen_length, block_length, temperature, cfg_scale, remasking)
    (32, 32, 32, 0.0, 0.0, "low_confidence"),
    (32, 64, 16, 0.0, 0.0, "low_confidence"),
    (16, 64, 8, 0.0, 0.0, "low_confidence"),
    (64, 64, 32, 0.0, 0.0, "low_confidence"),
    (32, 32, 8, 0.0, 1.0, "low_confidence"),
    (32, 32, 16, 0.0, 0.0, "random"),
    (32, 32, 16, 0.7, 0.0, "low_confidence"),
]


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_checkpoint(directory: Path, official_dir: Path, config_name: str, dtype: torch.dtype) -> None:
    config = preset(config_name)
    torch.manual_seed(0)
    model = LLaDAModel(config)
    with torch.no_grad():  # non-trivial norm gains, so that their placement matters
        for block in model.blocks:
            block.attn_norm.weight.uniform_(0.5, 1.5)
            block.ff_norm.weight.uniform_(0.5, 1.5)
    save_model(model, directory, dtype=dtype, max_shard_size="200MB")
    for name in ("modeling_llada.py", "configuration_llada.py"):
        shutil.copy(official_dir / name, directory / name)
    raw = json.loads((directory / "config.json").read_text())
    raw["auto_map"] = AUTO_MAP
    (directory / "config.json").write_text(json.dumps(raw, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official-dir", required=True, type=Path)
    parser.add_argument("--preset", default="tiny", help="model shape (tiny, small, ...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--prompt-length", type=int, default=24)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import AutoModel

    dtype = DTYPES[args.dtype]
    official_generate = load_module(args.official_dir / "generate.py", "official_generate").generate
    report: dict = {"preset": args.preset, "device": args.device, "dtype": args.dtype, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch) / "ckpt"
        write_checkpoint(directory, args.official_dir, args.preset, dtype)
        ours = LLaDAModel.from_pretrained(directory, dtype=dtype, device=args.device)
        reference = AutoModel.from_pretrained(directory, trust_remote_code=True, torch_dtype=dtype).to(args.device).eval()
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
        rows = []
        for steps, gen_length, block_length, temperature, cfg_scale, remasking in GRID:
            settings = dict(steps=steps, gen_length=gen_length, block_length=block_length, temperature=temperature,
                            cfg_scale=cfg_scale, remasking=remasking, mask_id=config.mask_token_id)
            torch.manual_seed(1234)
            expected = official_generate(reference, prompts, **settings)
            torch.manual_seed(1234)
            got = generate(ours, prompts, **settings)
            same = [bool(torch.equal(expected[i], got[i])) for i in range(prompts.shape[0])]
            agreement = (expected[:, args.prompt_length:] == got[:, args.prompt_length:]).float().mean().item()
            rows.append({**settings, "identical_rows": sum(same), "rows": len(same), "token_agreement": agreement})
            print(f"generate steps={steps:3d} gen={gen_length:3d} block={block_length:3d} T={temperature} "
                  f"cfg={cfg_scale} {remasking:14s}: {sum(same)}/{len(same)} identical, "
                  f"token agreement {agreement:.4f}", flush=True)
        report["generate"] = rows
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if all(r["identical_rows"] == r["rows"] for r in rows if r["temperature"] == 0) else 1)


if __name__ == "__main__":
    main()
