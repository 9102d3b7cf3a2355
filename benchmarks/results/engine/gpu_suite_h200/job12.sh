#!/bin/bash
# The GPU cases not yet run on the device (two-process compile cache, trainer peak memory), then the rest of the suite.
export PYTHONPATH=$PWD/src TQDM_DISABLE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
( time timeout ${LIMIT:-200} python3 -m pytest -m cuda tests/engine/test_compile_cache.py tests/training/test_trainer.py tests/test_cuda.py -q -p no:cacheprovider -rA 2>&1 | tee $OUT/cuda_tests_partial.log | tail -60 ) 2>&1
