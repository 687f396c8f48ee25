#!/usr/bin/env bash
# The GPU checks of issues 9 and 11, prepared scripts for a lent GPU (raw output: results/gpu/<card>/).
# TASK=check (default):
#   1. `ideal.py bench` at the paper preset and at the cpu preset (step / bare-model throughput ratios).
#   2. The paper preset's model (ResNet-50, 192 px, batch 32) on real ACDC ED frames: pre-training, then the
#      fixed fine-tuning default (row ideal) and its control without unlabeled slices (row pretrained-supervised)
#      at L = 1.25 % and 10 %, the four fine-tunings side by side on the one GPU, then eval on the 20 test patients.
#   The learning rate is 1e-3 for both stages instead of the paper's 1e-5, which learns little in the minutes a lent
#   GPU gives (an earlier H200 check: DSC 0.21 after 1000 steps at 1e-5); every other setting is the default.
# TASK=table: the cpu preset's ACDC table of issue 9 (rows ideal, pretrained-supervised, supervised at L = 1.25, 10,
#   2.5 %, seeds 0-2; ROWS and FRACTIONS choose a part), made by run.sh with JOBS fine-tunings sharing the GPU, from
#   the encoder in $RUNS/pretrain-both (carried: the one pre-trained on the CPU). After LIMIT seconds the unfinished
#   runs are stopped. On an H100 with 14 side by side all 27 runs take longer than one call may run (h100.md): the
#   nine ideal runs reached epoch 27-28 of 30 in 470 s, so give them a call of their own. $OUT/runs.tar.gz keeps
#   the run folders' text files and ideal/L10/seed0/best.pt, which run.sh at home collects into
#   results/acdc-cpu.md and scores on the ED and ES frames.
# Needs DATA (an ACDC folder; ED frames suffice), WHL (a folder with the nibabel wheel, if nibabel is missing) and
# OUT. Local dry runs of the plumbing: PRESET=demo BENCH=demo BENCH_STEPS=5 PRE_EPOCHS=1 FT_EPOCHS=1 STEPS=2
# DATA=.device/acdc-ed OUT=$(mktemp -d) bash results/gpu/gpu.sh, and TASK=table JOBS=3 SEEDS=1
# FINETUNE_FLAGS='--epochs 1 --steps-per-epoch 2' RUNS=<a copy of pretrain-both's parent> with the same DATA and OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
PRESET=${PRESET:-paper} PRE_EPOCHS=${PRE_EPOCHS:-60} FT_EPOCHS=${FT_EPOCHS:-15} LR=${LR:-1e-3}
STEPS=${STEPS:-100} FT_LIMIT=${FT_LIMIT:-240} THREADS=${THREADS:-4} BENCH=${BENCH:-paper cpu}
R=$(mktemp -d)  # run folders, checkpoints included; only a tar of their text files goes to $OUT
if ! python3 -c 'import nibabel' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$R/site" "$WHL"/*.whl || exit 1
  export PYTHONPATH=$R/site
fi
exec > >(tee "$OUT/gpu.log") 2>&1
t0=$(date +%s)
stamp() { echo "== $* at $(( $(date +%s) - t0 )) s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, numpy, nibabel; print("torch", torch.__version__, "numpy", numpy.__version__,
  "nibabel", nibabel.__version__, "cuda", torch.cuda.is_available())'
git log -1 --format='commit %h %s' 2>/dev/null
if [ "${TASK:-check}" = table ]; then
  RUNS=${RUNS:-runs/acdc-cpu-h100}
  OMP_NUM_THREADS=1 timeout "${LIMIT:-420}" env DATA="$DATA" PRESET=cpu SEEDS="${SEEDS:-3}" BENCH=0 TABLE=h100 \
    ROWS="${ROWS:-ideal pretrained-supervised supervised}" FRACTIONS="${FRACTIONS:-1.25 10 2.5}" \
    JOBS="${JOBS:-14}" OUT="$RUNS" bash run.sh
  stamp "run.sh (exit $?)"
  pkill -f "ideal.py (finetune|eval) --(out|run) $RUNS/" && sleep 3  # the runs a timeout left behind
  for f in "$RUNS"/*/L*/seed*.log; do echo "-- $f"; tail -n 2 "$f"; done
  find "$RUNS" \( -name png -o -name '*.pt' ! -path '*/ideal/L10/seed0/best.pt' \) -prune -o -type f -print \
    | tar -czf "$OUT/runs.tar.gz" -T -
  stamp done
  exit 0
fi
for p in $BENCH; do
  timeout 120 python3 ideal.py bench --preset "$p" ${BENCH_STEPS:+--steps $BENCH_STEPS}
  stamp "bench $p"
done
timeout 200 python3 ideal.py pretrain --preset "$PRESET" --data "$DATA" --out "$R/pretrain-both" --lr "$LR" \
  --epochs "$PRE_EPOCHS" --quiet
stamp pretrain
pids=()
for row in ideal pretrained-supervised; do
  extra=()
  [ "$row" = pretrained-supervised ] && extra=(--unlabeled-weight 0 --unlabeled-batch 0)
  for L in 1.25 10; do
    timeout "$FT_LIMIT" python3 ideal.py finetune --preset "$PRESET" --data "$DATA" --out "$R/$row/L$L/seed0" \
      --pretrained "$R/pretrain-both/encoder.pt" --labeled "$L" --lr "$LR" --epochs "$FT_EPOCHS" \
      --steps-per-epoch "$STEPS" --threads "$THREADS" --quiet "${extra[@]}" > "$R/$row-L$L.out" 2>&1 &
    pids+=($!)
  done
done
wait "${pids[@]}"  # not a bare wait: since bash 5.1 that also waits for the tee above
stamp finetune
for f in "$R"/*.out; do echo "-- runs/${f#"$R"/}"; tail -n 4 "$f"; done
pids=()
for run in "$R"/*/L*/seed0; do
  timeout 120 python3 ideal.py eval --run "$run" --threads "$THREADS" --quiet > "$run/eval.out" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
stamp eval
for run in "$R"/*/L*/seed0; do echo "-- runs/${run#"$R"/}"; cat "$run/eval.out"; done
python3 ideal.py report --runs "$R" --out "$R/table" --title "IDEAL on ACDC ED frames (paper preset model, GPU check)" \
  --made-by "bash results/gpu/gpu.sh" --commit "$(git rev-parse --short HEAD 2>/dev/null)"
find "$R" \( -name '*.pt' -o -name 'pred' -o -name 'png' -o -name site \) -prune -o -type f -print | sed "s|^$R/||" \
  | tar -czf "$OUT/runs.tar.gz" -C "$R" -T -
rm -rf "$R"
stamp done
