#!/usr/bin/env bash
# Train the demo model end to end (on a GPU): pretraining, export, SFT, export in bf16. Its scores on
# the held-out task questions: python benchmarks/demo_tasks.py --model DEST --tests data/demo/tasks_test.jsonl
# Needs data/demo from: python scripts/prepare_demo_data.py --out data/demo --tokenizer-vocab 4096
set -euo pipefail
DEST=${1:-demo-model}
llada train configs/demo_pretrain.yaml "${@:2}"
llada export runs/demo-pretrain runs/demo-base --dtype fp32
llada train configs/demo_sft.yaml
llada export runs/demo-sft "$DEST" --dtype bf16 --max-shard-size 15MB
