"""`make demo`: the shipped demo model answering questions whose answers can be checked.

Every question below is one the model never saw in training: the arithmetic questions are drawn from
its held-out test set (scripts/demo_tasks.py), the word lists are drawn fresh, and the verse gaps are
filled from text on both sides, which a left-to-right model cannot read. Each answer is checked and
marked; the line before each group says what it shows. The CLI command that does the same is printed
once per group. Held-out accuracies with intervals: README, "Demo model".
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from demo_tasks import held_out_arithmetic, list_item
from prepare_demo_data import TEST_COUNTS

from llada import Engine, GenerationSettings
from llada.diffusion.infilling import encode_with_gaps, infill
from llada.engine.answer_text import answer_text
from llada.model.loading import DEMO_MODEL, load

SETTINGS = GenerationSettings(gen_length=32, block_length=8)
WORDS = ["stone", "river", "crown", "sword", "night", "honey", "tower", "heart", "storm", "lamb", "ocean", "grave"]
# (before, the words taken out, after): lines of the training text with a gap where the words were.
GAPS = [("To be, or not to be,", " that", " is the question:"),
        ("Now is the winter of our", " discontent", ""),
        ("Of Man's first", " disobedience", ", and the fruit")]
PLAIN_PROMPTS = ["The king", "O Romeo, Romeo!", "My lord,"]


def mark(answer: str, expected: str) -> str:
    return "ok" if answer.strip() == expected else f"WRONG (expected {expected})"


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

    lists = [list_item(kind, rng.sample(WORDS, 4)) for kind in ("reverse", "reverse", "sort", "sort")]
    print("\n== Word lists never seen in training: reversing (order matters, any position can be decoded first) and sorting")
    for item, answer in zip(lists, ask([i.prompt for i in lists])):
        print(f"   {item.prompt:<48} {answer:<32} {mark(answer, item.answer)}")

    print("\n== Infilling: the gap is filled from the words on BOTH sides (a left-to-right model sees only the left)")
    print("   (the gap's length in tokens is given: [MASK*N] is N masked tokens)")
    for before, expected, after in GAPS:
        text = f"{before}[MASK*{len(tokenizer.encode(expected, add_special_tokens=False))}]{after}"
        filled = infill(model, torch.tensor(encode_with_gaps(tokenizer, text)), generator=generator)
        result = tokenizer.decode(filled.tolist(), skip_special_tokens=True)
        gap = result[len(before):len(result) - len(after)] if result.startswith(before) and result.endswith(after) else result
        print(f"   llada infill {text!r:<48} -> {gap.strip()!r:<16} {mark(gap, expected.strip())}")

    print("\n== Plain continuation without the chat template (what /v1/completions and `generate --no-chat` do)")
    print("   llada generate --no-chat --prompt 'The king' --gen-length 32 --block-length 8")
    for prompt, answer in zip(PLAIN_PROMPTS, ask(PLAIN_PROMPTS, chat=False)):
        print(f"   {prompt!r} -> {answer.strip()[:70]!r}")

    recall = ["Which line follows \"To be, or not to be, that is the question:\"?", "Define the word \"king\"."]
    print("\n== Recall of the training text (verse and WordNet; memorised, not reasoned)")
    for question, answer in zip(recall, ask(recall)):
        print(f"   {question}\n      -> {answer}")


if __name__ == "__main__":
    main()
