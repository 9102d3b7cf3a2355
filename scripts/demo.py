"""`make demo`: the shipped demo model answering questions whose answers can be checked.

Every question below is one the model never saw in training: the arithmetic questions are drawn from
its held-out test set (scripts/demo_tasks.py) and the word lists are drawn fresh. Infilling gives the
model an answer with a gap in the middle, filled from the words on both sides, which a left-to-right
model cannot read. Each answer is checked and marked; the line before each group says what it shows,
and the CLI command that does the same is printed once per group. Accuracies on the held-out
questions, with intervals: README, "Demo model".
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from demo_tasks import held_out_arithmetic, list_item, middle_gap
from prepare_demo_data import TEST_COUNTS

from llada import Engine, GenerationSettings
from llada.diffusion.infilling import infill_text
from llada.engine.answer_text import answer_text
from llada.model.loading import DEMO_MODEL, load

SETTINGS = GenerationSettings(gen_length=32, block_length=8)
# Words of the list tasks' vocabulary (the 1,500 commonest of the corpus): the lists are new, the words known.
WORDS = ["stone", "crown", "sword", "night", "honey", "heart", "storm", "grave", "horse", "gold", "ship", "queen"]
PLAIN_PROMPTS = ["The king", "O Romeo, Romeo!", "My lord,"]


def mark(answer: str, expected: str) -> str:
    return "ok" if answer.strip() == expected else f"WRONG (expected {expected})"


def mark_continuation(answer: str) -> str:
    return "ok" if answer.strip() else "WRONG (empty)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = load(args.model, "auto", "auto")
    engine = Engine(model)
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    rng = random.Random(args.seed)

    def ask(questions: list[str], chat: bool = True) -> list[str]:
        prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) if chat else tokenizer.encode(q)
                   for q in questions]
        return [answer_text(tokenizer, r.answer.tolist()) for r in engine.generate(prompts, SETTINGS, generator)]

    held_out = held_out_arithmetic(random.Random(0), TEST_COUNTS)
    arithmetic = [item for kind in ("add", "sub", "mul") for item in rng.sample([i for i in held_out if i.kind == kind], 2)]
    print("\n== Arithmetic on questions held out of training (the digits of the answer are decoded in parallel)")
    print("   llada generate --prompt 'What is 47 + 38?' --gen-length 32 --block-length 8")
    for item, answer in zip(arithmetic, ask([i.prompt for i in arithmetic])):
        print(f"   {item.prompt:<22} {answer:<8} {mark(answer, item.answer)}")

    reversals = [list_item("reverse", rng.sample(WORDS, 4)) for _ in range(3)]
    print("\n== Reversing word lists never seen in training (order matters; any position may be decoded first)")
    for item, answer in zip(reversals, ask([i.prompt for i in reversals])):
        print(f"   {item.prompt:<48} {answer:<32} {mark(answer, item.answer)}")

    sorts = [list_item("sort", rng.sample(WORDS, 4)) for _ in range(3)]
    print("\n== Infilling: a sorted answer with its middle words missing, filled from the words on BOTH sides")
    print("   (a left-to-right model writing the gap cannot see the last word; [MASK*N] is N masked tokens)")
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    for item in sorts:
        gapped = middle_gap(item.answer, count)
        filled = infill_text(model, tokenizer, gapped, item.prompt, generator=generator)
        print(f"   llada infill --question {item.prompt!r} {gapped!r}\n"
              f"      -> {filled.strip()!r:<34} {mark(filled, item.answer)}")

    print("\n== Plain continuation without the chat template (what /v1/completions and `generate --no-chat` do)")
    print("   llada generate --no-chat --prompt 'The king' --gen-length 32 --block-length 8")
    for prompt, answer in zip(PLAIN_PROMPTS, ask(PLAIN_PROMPTS, chat=False)):
        print(f"   {prompt!r} -> {answer.strip()[:70]!r} {mark_continuation(answer)}")

if __name__ == "__main__":
    main()
