#!/usr/bin/env bash
# IDEAL's protocol end to end: pre-train, fine-tune each row at each label fraction, evaluate, tabulate.
#
#   bash run.sh                      the synthetic phantom, demo preset: about 5 minutes on a 2-core laptop
#   DATA=/path/to/ACDC bash run.sh   the paper's protocol on real ACDC (L = 1.25, 2.5, 10, 100 %)
#
# Environment (all optional):
#   DATA       dataset folder (default: the synthetic phantom, written once to cache/phantom)
#   DATASET    acdc | mmwhs | own: label fractions and the paper's numbers shown (default: acdc)
#   PRESET     cpu | paper | demo (default: paper with a GPU, cpu without; demo for the phantom)
#   SEEDS      pipelines per setting: seed k pre-trains encoder k and fine-tunes from it (default: 1)
#   ROWS       rows of the table, see the case below (default: ideal pretrained-dice-ce pretrained-supervised
#              supervised global local same-decoders paper-literal; phantom: ideal supervised)
#   FRACTIONS  label percentages (default: acdc 1.25 2.5 10 100, mmwhs 10 20 40 100, own 10 100)
#   FRAMES     ed | both: the ACDC frames trained on (default: ed, the paper's protocol). both: the runs go to
#              OUT-both and the table is clinical (volumes, EF, mass; DSC on ED and ES), with the ED-trained runs of
#              the same rows in OUT beside them where they exist
#   TABLE      a separately named table <dataset>-<preset>[-TABLE]
#   PUBLISH    1: write tables and benches into results/ and paste them into README.md and results/EXPERIMENTS.md
#              (default: print them and write them under OUT only, so that a demo leaves the checkout as it was)
#   BENCH      1: also time the training step and the metrics (default: 1; 0 while other jobs run; only: the
#              benches alone, e.g. PRESET=cpu BENCH=only bash run.sh)
#   OUT        run folders (default: runs/<dataset>-<preset>)
#   JOBS       fine-tunings run side by side, each logging to <run folder>.log and using cores / JOBS threads
#              unless OMP_NUM_THREADS says otherwise (default: 1; the phantom: one per core, at most 5)
#   PRETRAIN_FLAGS, FINETUNE_FLAGS  extra flags for every pretrain / finetune call (e.g. --epochs 50)
# Re-running skips every finished training and evaluation (a run folder with done.json, an eval with summary.json;
# the tables are made again) and resumes a run folder that has last.pt but no done.json, so an interrupted protocol
# continues where it stopped. Two run.sh side by side on one machine: give each its share of the cores, e.g.
# OMP_NUM_THREADS=1 for each on 2 cores (two jobs that each take every core slow each other down 10-15x).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
DATASET=${DATASET:-acdc}
PRESET_GIVEN=${PRESET:-}
PRESET=${PRESET:-$($PY -c 'import torch; print("paper" if torch.cuda.is_available() else "cpu")')}
SEEDS=${SEEDS:-1}
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc alone obeys OMP_NUM_THREADS
DATA_FLAGS=()
BENCH_FLAGS=()
if [ -n "${DATA:-}" ]; then
  DATA_FLAGS=(--data "$DATA")
  BASE=$DATASET-$PRESET
  ROWS=${ROWS:-ideal pretrained-dice-ce pretrained-supervised supervised global local same-decoders paper-literal}
else
  PRESET=${PRESET_GIVEN:-demo}
  BASE=phantom-$PRESET
  ROWS=${ROWS:-ideal supervised}
  JOBS=${JOBS:-$((CORES < 5 ? CORES : 5))}  # its five small fine-tunings, one thread each, use the cores better
  BENCH_FLAGS=(--steps 20)
fi
JOBS=${JOBS:-1}
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: error: JOBS must be a positive integer, got '$JOBS'" >&2; exit 2; }
# Each fine-tuning takes its share of the cores (OMP_NUM_THREADS wins when given): jobs side by side whose
# threads outnumber the cores slow each other down 10-15x.
JOB_THREADS=${OMP_NUM_THREADS:-$((CORES / JOBS > 1 ? CORES / JOBS : 1))}
NAME=$BASE${TABLE:+-$TABLE}
case $DATASET in
  acdc) FRACTIONS=${FRACTIONS:-1.25 2.5 10 100} ;;
  mmwhs) FRACTIONS=${FRACTIONS:-10 20 40 100} ;;
  own) FRACTIONS=${FRACTIONS:-10 100} ;;
  *) echo "run.sh: error: DATASET must be acdc, mmwhs or own, got '$DATASET'" >&2; exit 2 ;;
esac
FRAMES=${FRAMES:-ed}
[[ $FRAMES =~ ^(ed|both)$ ]] || { echo "run.sh: error: FRAMES must be ed or both, got '$FRAMES'" >&2; exit 2; }
OUT=${OUT:-runs/$BASE}
OUT_ED=$OUT
[ "$FRAMES" = ed ] || OUT=$OUT-$FRAMES
DEST=$OUT/tables
[ "${PUBLISH:-0}" = 1 ] && DEST=results
read -r -a PRETRAIN_EXTRA <<< "${PRETRAIN_FLAGS:-}"
read -r -a FINETUNE_EXTRA <<< "${FINETUNE_FLAGS:-}"
COMMON=(--preset "$PRESET" --frames "$FRAMES" "${DATA_FLAGS[@]}")
START=$(date +%s)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

say() { echo "+ $*" >&2; "$@"; }

# Up to JOBS fine-tunings at once: wait for one to end before starting the next; a failed one stops the protocol.
running=0
settle() {  # N: wait until at most N jobs run
  while ((running > $1)); do
    if ! wait -n; then
      echo "run.sh: error: a fine-tuning failed; its log is <run folder>.log under $OUT" >&2
      kill $(jobs -p) 2>/dev/null
      exit 1
    fi
    running=$((running - 1))
  done
}

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

pretrained() {  # LOSS SEED -> encoder.pt of the pre-training with that loss and seed (a seed is the whole pipeline)
  train pretrain "$OUT/pretrain-$1/seed$2" --loss "$1" --seed "$2" "${PRETRAIN_EXTRA[@]}" >&2
  echo "$OUT/pretrain-$1/seed$2/encoder.pt"
}

bench() {  # time the training step and the metrics
  mkdir -p "$DEST"
  say "$PY" ideal.py bench --preset "$PRESET" "${BENCH_FLAGS[@]}" > "$DEST/bench-$PRESET.txt"
  say "$PY" metrics.py --bench > "$DEST/metrics-bench.txt"
  PASTE+=("bench-$PRESET.txt" metrics-bench.txt)
}

# With PUBLISH=1, paste each results/FILE into README.md and results/EXPERIMENTS.md between its markers
# <!-- results/FILE --> ... <!-- /results/FILE -->, wherever they are.
paste_results() {
  [ "$DEST" = results ] || return 0
  for file in "${PASTE[@]}"; do
    for doc in README.md results/EXPERIMENTS.md; do
      grep -q "<!-- results/$file -->" "$doc" 2>/dev/null || continue
      awk -v start="<!-- results/$file -->" -v stop="<!-- /results/$file -->" -v path="results/$file" '
        $0 == start { print; if (path ~ /\.txt$/) print "```"; while ((getline line < path) > 0) print line;
                      if (path ~ /\.txt$/) print "```"; skip = 1; next }
        $0 == stop { skip = 0 }
        !skip' "$doc" > "$doc.tmp" && mv "$doc.tmp" "$doc"
    done
  done
}

PASTE=()
if [ "${BENCH:-1}" = only ]; then  # the benches alone, no training and no table
  bench
  paste_results
  exit 0
fi

cell() {  # FOLDER FLAGS...: one fine-tuning and its evaluation on the test split (best and final checkpoint)
  local dir=$1
  local -x OMP_NUM_THREADS=$JOB_THREADS
  shift
  train finetune "$dir" "$@"
  local todo=()
  [ -f "$dir/eval-test/summary.json" ] || todo+=(best)
  [ -f "$dir/eval-test-final/summary.json" ] || todo+=(final)
  ((${#todo[@]} == 0)) || say "$PY" ideal.py eval --run "$dir" --quiet --save-png --checkpoint "${todo[@]}"
}

for row in $ROWS; do
  case $row in  # each row pins only what differs from ideal.py's DEFAULTS
    ideal) enc=both; init=() ;;
    pretrained-dice-ce) enc=both; init=(--unlabeled-weight 0) ;;
    pretrained-supervised) enc=both; init=(--unlabeled-weight 0 --sup-loss ce) ;;
    supervised) enc=; init=(--pretrained none --unlabeled-weight 0 --sup-loss ce) ;;
    global | local) enc=$row; init=() ;;
    same-decoders) enc=both; init=(--same-decoders) ;;
    paper-literal) enc=both; init=(--forward joint --pseudo same --threshold 0 --rampup 0 --sup-loss ce) ;;
    *) echo "run.sh: error: unknown row '$row' (see the rows in run.sh)" >&2
       exit 2 ;;
  esac
  for frac in $FRACTIONS; do
    if [ -z "${DATA:-}" ] && [ "$row" = supervised ] && [ "$frac" != "${FRACTIONS%% *}" ]; then
      continue  # the embedded default runs the supervised baseline at the lowest fraction only
    fi
    for ((seed = 0; seed < SEEDS; seed++)); do
      dir=$OUT/$row/L$frac/seed$seed
      settle $((JOBS - 1))  # first, so that a pre-training started here shares the cores with JOBS - 1 others
      encoder=()
      [ -n "$enc" ] && encoder=(--pretrained "$(pretrained "$enc" "$seed")")
      if [ "$JOBS" = 1 ]; then
        cell "$dir" --labeled "$frac" --seed "$seed" "${encoder[@]}" "${init[@]}" "${FINETUNE_EXTRA[@]}"
        continue
      fi
      mkdir -p "$(dirname "$dir")"
      echo "+ $dir (log: $dir.log)" >&2
      cell "$dir" --labeled "$frac" --seed "$seed" "${encoder[@]}" "${init[@]}" "${FINETUNE_EXTRA[@]}" > "$dir.log" 2>&1 &
      running=$((running + 1))
    done
  done
done
settle 0

REPORT=()
if [ "$FRAMES" = both ]; then  # clinical: the ED-trained runs of the same rows, scored on both frames too
  for dir in "$OUT_ED"/*/L*/seed*; do
    row=${dir#"$OUT_ED"/}
    if [[ " $ROWS " == *" ${row%%/*} "* ]] && [ -f "$dir/done.json" ] && [ ! -f "$dir/eval-test-both/summary.json" ]
    then
      say "$PY" ideal.py eval --run "$dir" --frames both --quiet
    fi
  done
  REPORT=(--clinical --runs "$OUT" "$OUT_ED")
else
  REPORT=(--runs "$OUT")
fi
mkdir -p "$DEST"
made_by="${DATA:+DATA=$DATA }PRESET=$PRESET SEEDS=$SEEDS ROWS='$ROWS' FRACTIONS='$FRACTIONS'${TABLE:+ TABLE=$TABLE}"
[ "$FRAMES" = ed ] || made_by="$made_by FRAMES=$FRAMES"
say "$PY" ideal.py report "${REPORT[@]}" --out "$DEST/$NAME" --dataset "${DATA:+$DATASET}" --rows "$ROWS" \
  --title "IDEAL on $([ -n "${DATA:-}" ] && basename "$DATA" || echo the synthetic phantom) ($PRESET preset)" \
  --made-by "$made_by bash run.sh" --commit "$COMMIT"
threads=""
if ((JOBS > 1)); then threads=" ($JOBS fine-tunings side by side, $JOB_THREADS thread(s) each)"; fi
echo "wall time: $(( $(date +%s) - START )) s on $CORES cores$threads" >> "$DEST/$NAME.md"
PASTE=("$NAME.md")
[ "${BENCH:-1}" = 1 ] && bench
paste_results
cat "$DEST/$NAME.md"
echo "run.sh: done in $(( $(date +%s) - START )) s; tables in $DEST" >&2
