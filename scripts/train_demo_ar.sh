#!/usr/bin/env bash
# The autoregressive baseline of the demo model (on a GPU): the same network, data, steps and batch
# sizes as scripts/train_demo.sh, trained left to right (objective autoregressive, then
# autoregressive_sft with loss on the answers only). For the paper's comparisons
# (benchmarks/reversal_curse.py).
set -euo pipefail
DEST=${1:-demo-model-ar}
llada train configs/demo_pretrain.yaml --set objective=autoregressive --set out_dir=runs/demo-ar-pretrain \
    --set data.random_length_probability=0 "${@:2}"
llada export runs/demo-ar-pretrain runs/demo-ar-base --dtype fp32
llada train configs/demo_sft.yaml --set objective=autoregressive_sft --set model.init_from=runs/demo-ar-base \
    --set out_dir=runs/demo-ar-sft
llada export runs/demo-ar-sft "$DEST" --dtype bf16 --max-shard-size 15MB
