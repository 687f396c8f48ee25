#!/usr/bin/env bash
# IDEAL's protocol end to end: pre-train, fine-tune each row at each label fraction, evaluate, tabulate.
#
#   bash run.sh                      the embedded default: synthetic phantom, cpu preset, short schedule
#                                    (about 10 minutes on a 2-core laptop)
#   DATA=/path/to/ACDC bash run.sh   the paper's protocol on real ACDC (L = 1.25, 2.5, 10, 100 %)
#
# Environment (all optional):
#   DATA       dataset folder (default: the synthetic phantom, written once to cache/phantom)
#   DATASET    acdc | mmwhs | own: label fractions and the paper's numbers shown (default: acdc)
#   PRESET     cpu | paper (default: paper with a GPU, cpu without)
#   SEEDS      fine-tuning runs per setting; the paper reports the mean of 5 (default: 1)
#   ROWS       any of: ideal supervised global local same-decoders pretrained-supervised ideal-w1
#              (default: the first five; phantom: ideal supervised)
#   FRACTIONS  label percentages (default: acdc 1.25 2.5 10 100, mmwhs 10 20 40 100, own 10 100)
#   OUT        run folders (default: runs/<dataset>-<preset>)
#   PRETRAIN_FLAGS, FINETUNE_FLAGS  extra flags for every pretrain / finetune call (e.g. --epochs 50)
# Re-running skips every finished step (a run folder with done.json, an eval with summary.json) and resumes a
# run folder that has last.pt but no done.json, so an interrupted protocol continues where it stopped.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DATASET=${DATASET:-acdc}
PRESET=${PRESET:-$($PY -c 'import torch; print("paper" if torch.cuda.is_available() else "cpu")')}
SEEDS=${SEEDS:-1}
DATA_FLAGS=()
if [ -n "${DATA:-}" ]; then
  DATA_FLAGS=(--data "$DATA")
  NAME=$DATASET-$PRESET
  ROWS=${ROWS:-ideal supervised global local same-decoders}
else
  NAME=phantom-$PRESET
  ROWS=${ROWS:-ideal supervised}
  PRETRAIN_FLAGS=${PRETRAIN_FLAGS:---epochs 15}
  FINETUNE_FLAGS=${FINETUNE_FLAGS:---epochs 4 --steps-per-epoch 20 --batch-size 8}
fi
case $DATASET in
  acdc) FRACTIONS=${FRACTIONS:-1.25 2.5 10 100} ;;
  mmwhs) FRACTIONS=${FRACTIONS:-10 20 40 100} ;;
  own) FRACTIONS=${FRACTIONS:-10 100} ;;
  *) echo "run.sh: error: DATASET must be acdc, mmwhs or own, got '$DATASET'" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/$NAME}
read -r -a PRETRAIN_EXTRA <<< "${PRETRAIN_FLAGS:-}"
read -r -a FINETUNE_EXTRA <<< "${FINETUNE_FLAGS:-}"
COMMON=(--preset "$PRESET" "${DATA_FLAGS[@]}")
START=$(date +%s)

say() { echo "+ $*" >&2; "$@"; }

# train KIND FOLDER FLAGS...: pretrain/finetune into FOLDER unless finished; resume a started one (the same
# flags, so that architecture overrides match the checkpoint; the stored configuration wins for the rest).
train() {
  local kind=$1 dir=$2
  shift 2
  if [ -f "$dir/done.json" ]; then
    echo "= $dir finished, skipped" >&2
    return
  fi
  local resume=()
  [ -f "$dir/last.pt" ] && resume=(--resume)
  say "$PY" ideal.py "$kind" --out "$dir" "${resume[@]}" "${COMMON[@]}" "$@"
}

pretrained() {  # LOSS -> encoder.pt of the pre-training with that loss (run once, seed 0)
  train pretrain "$OUT/pretrain-$1" --loss "$1" "${PRETRAIN_EXTRA[@]}" >&2
  echo "$OUT/pretrain-$1/encoder.pt"
}

for row in $ROWS; do
  case $row in
    ideal) encoder=$(pretrained both); init=(--pretrained "$encoder") ;;
    supervised) init=(--no-pretrain --unlabeled-weight 0) ;;
    global | local) encoder=$(pretrained "$row"); init=(--pretrained "$encoder") ;;
    same-decoders) encoder=$(pretrained both); init=(--pretrained "$encoder" --same-decoders) ;;
    pretrained-supervised) encoder=$(pretrained both); init=(--pretrained "$encoder" --unlabeled-weight 0) ;;
    ideal-w1) encoder=$(pretrained both); init=(--pretrained "$encoder" --unlabeled-weight 1 --rampup 0.4) ;;
    *) echo "run.sh: error: unknown row '$row' (ideal supervised global local same-decoders" \
         "pretrained-supervised ideal-w1)" >&2
       exit 2 ;;
  esac
  for frac in $FRACTIONS; do
    if [ -z "${DATA:-}" ] && [ "$row" = supervised ] && [ "$frac" != "${FRACTIONS%% *}" ]; then
      continue  # the embedded default runs the supervised baseline at the lowest fraction only
    fi
    for ((seed = 0; seed < SEEDS; seed++)); do
      dir=$OUT/$row/L$frac/seed$seed
      train finetune "$dir" --labeled "$frac" --seed "$seed" "${init[@]}" "${FINETUNE_EXTRA[@]}"
      [ -f "$dir/eval-test/summary.json" ] || say "$PY" ideal.py eval --run "$dir" "${COMMON[@]}" --quiet --save-png
    done
  done
done

mkdir -p results
say "$PY" ideal.py report --runs "$OUT" --out "results/$NAME" --dataset "$DATASET" \
  --title "IDEAL on ${DATA:-the synthetic phantom} ($PRESET preset)" \
  --made-by "${DATA:+DATA=$DATA }PRESET=$PRESET SEEDS=$SEEDS ROWS='$ROWS' FRACTIONS='$FRACTIONS' bash run.sh" \
  --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "$PY" ideal.py bench --preset "$PRESET" > "results/bench-$PRESET.txt"
say "$PY" metrics.py --bench > results/metrics-bench.txt
echo "wall time: $(( $(date +%s) - START )) s on $(nproc) cores" >> "results/$NAME.md"

# Paste each results file into README.md between its markers <!-- results/FILE --> ... <!-- /results/FILE -->.
for file in "results/$NAME.md" "results/bench-$PRESET.txt" results/metrics-bench.txt; do
  grep -q "<!-- $file -->" README.md 2>/dev/null || continue
  awk -v start="<!-- $file -->" -v stop="<!-- /$file -->" -v path="$file" '
    $0 == start { print; if (path ~ /\.txt$/) print "```"; while ((getline line < path) > 0) print line;
                  if (path ~ /\.txt$/) print "```"; skip = 1; next }
    $0 == stop { skip = 0 }
    !skip' README.md > README.md.tmp && mv README.md.tmp README.md
done
cat "results/$NAME.md"
echo "run.sh: done in $(( $(date +%s) - START )) s" >&2
