#!/bin/bash
# Cold start of the compiled engine at the 8B shape: eager, first compiled (empty cache), second compiled.
export PYTHONPATH=$PWD/src TQDM_DISABLE=1 PYTHONUNBUFFERED=1
( time python3 benchmarks/cold_start.py prepare /tmp/ckpt-8b --preset 8b ) 2>&1 | tail -4
timeout 480 python3 benchmarks/cold_start.py measure /tmp/ckpt-8b --cache /tmp/llada-cache --runs 3 --out $OUT/cold_start_8b_h100.json 2>&1 | tail -30
du -sh /tmp/llada-cache; find /tmp/llada-cache -maxdepth 3 | head -20
