#!/usr/bin/env bash
# GPU check 2: the paper preset's bench, then run.sh (cpu preset, 3 seeds, IDEAL vs supervised at L = 1.25 %)
# on the real ACDC ED frames (cropped to the preprocessing field of view so that they travel).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
python3 ideal.py bench --preset paper --steps 20 2>&1 | tee $OUT/bench-paper.txt
python3 ideal.py bench --preset cpu --steps 20 2>&1 | tee $OUT/bench-cpu-preset.txt
echo "bench done at $(( $(date +%s) - t0 )) s"
DATA=.device/acdc-ed PRESET=cpu SEEDS=3 ROWS="ideal supervised" FRACTIONS=1.25 OUT=$OUT/runs timeout 420 bash run.sh > $OUT/run.log 2>&1
echo "run.sh rc $? at $(( $(date +%s) - t0 )) s"
cp results/acdc-cpu.* $OUT/ 2>/dev/null
tail -n 12 $OUT/run.log
mkdir -p $OUT/flat
for f in $OUT/runs/*/L*/seed*/eval-test/summary.json; do
  k=$(echo "$f" | awk -F/ '{print $(NF-4)"_"$(NF-3)"_"$(NF-2)}'); cp "$f" "$OUT/flat/$k.summary.json"
  cp "$(dirname "$(dirname "$f")")/log.jsonl" "$OUT/flat/$k.log.jsonl"
done
cp $OUT/runs/pretrain-both/log.jsonl $OUT/flat/pretrain-both.log.jsonl 2>/dev/null
rm -rf $OUT/runs
