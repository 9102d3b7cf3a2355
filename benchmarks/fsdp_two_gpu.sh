#!/usr/bin/env bash
# Loss parity, scaling efficiency and cross-world-size resume of FSDP2 training on a 2-GPU machine.
# Needs .carry/ from benchmarks/make_synthetic_data.py. Writes metrics and logs to $OUT (default ./out).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-out}; RUNS=${RUNS:-/tmp/fsdp-runs}; RECIPE=configs/bench_1b_synthetic.yaml
mkdir -p "$OUT" "$RUNS"
run() {  # name, processes, extra overrides...
  local name=$1 procs=$2; shift 2
  timeout 170 python -m torch.distributed.run --nproc-per-node "$procs" -m llada.cli.main train "$RECIPE" \
    --set out_dir="$RUNS/$name" "$@" >> "$OUT/logs.txt" 2>&1
  echo "$name ($procs GPU) exit $?" | tee -a "$OUT/logs.txt"
  cp "$RUNS/$name/metrics.jsonl" "$OUT/$name.jsonl" 2>/dev/null
}
seed_from() {  # copy the step-8 checkpoint of run $1 into the fresh run $2
  mkdir -p "$RUNS/$2/checkpoints" && cp -r "$RUNS/$1/checkpoints/step-00000008" "$RUNS/$2/checkpoints/"
}
run one-gpu 1
run two-gpu 2
seed_from two-gpu resume-2-on-1 && run resume-2-on-1 1
seed_from one-gpu resume-1-on-2 && run resume-1-on-2 2
