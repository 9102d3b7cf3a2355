#!/bin/bash
# Regional compilation (one layer compiled for all): cold start at the 8B shape, compiled-engine speed
# before (.carry/before = the whole-network compile) vs after, and the compile GPU tests.
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
( time PYTHONPATH=$PWD/src python3 benchmarks/cold_start.py prepare /tmp/ckpt-8b --preset 8b ) 2>&1 | tail -3
PYTHONPATH=$PWD/src timeout 200 python3 benchmarks/cold_start.py measure /tmp/ckpt-8b --cache /tmp/llada-cache --runs 3 --out $OUT/cold_start_8b_regional_h100.json 2>&1 | tail -6
du -sh /tmp/llada-cache/compile
export LLADA_CACHE_DIR=/tmp/ab-cache
( time timeout 330 python3 benchmarks/engine_ab.py --compile --a .carry/before/src --b src --rounds 1 --repeats 3 --cases demo_b32_gen32 8b_b1_p512_gen256 8b_b8_p512_gen64 --out $OUT/ab_regional_compile_h100.json ) 2>&1 | tail -12
set -o pipefail
PYTHONPATH=$PWD/src timeout 90 python3 -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -k compile 2>&1 | tee $OUT/cuda_tests_compile_h100.log | tail -3
