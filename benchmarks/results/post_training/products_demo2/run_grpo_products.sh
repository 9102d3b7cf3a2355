#!/bin/bash
# diffu-GRPO on 2-digit x 2-digit products from the shipped demo model; before/after on the same GPU.
export PYTHONPATH=$PWD/src TQDM_DISABLE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m llada "$@"\n' > /tmp/bin/llada && chmod +x /tmp/bin/llada && export PATH=/tmp/bin:$PATH
NAME=${NAME:-grpo_products}; R=$OUT/$NAME; mkdir -p $R
STEPS=${STEPS:-400}
( time python3 benchmarks/preference_demo.py evaluate --model models/demo --pairs data/demo/products/heldout.jsonl --draws 32 --out $R/before_h100.json ) 2>&1 | tail -4 &
( time timeout 470 llada train configs/demo_grpo.yaml --set data.path=data/demo/grpo-products --set out_dir=/tmp/R --set steps=$STEPS --set save_every=$STEPS ) > $R/train.log 2>&1
tail -5 $R/train.log
wait
cp /tmp/R/metrics.jsonl /tmp/R/config.yaml $R/ 2>/dev/null
llada export /tmp/R /tmp/M --dtype fp32 && \
( time python3 benchmarks/preference_demo.py evaluate --model /tmp/M --pairs data/demo/products/heldout.jsonl --draws 32 --out $R/after_h100.json ) 2>&1 | tail -4
python3 benchmarks/preference_demo.py compare $R/before_h100.json $R/after_h100.json 2>&1 | tee $R/compare.txt
llada plot /tmp/R --output $R/grpo_products_curves.png 2>&1 | tail -2
cd $OUT && tar czf $NAME.tgz $NAME && rm -rf $NAME
