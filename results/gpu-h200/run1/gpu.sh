#!/usr/bin/env bash
# One prepared GPU check: the paper preset's bench, then a short real-ACDC pretrain -> finetune -> eval.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, numpy, nibabel; print('torch', torch.__version__, 'numpy', numpy.__version__, 'nibabel', nibabel.__version__)"
D=.device/acdc-ed R=$OUT/runs
t0=$(date +%s)
python3 ideal.py bench --preset paper --steps 10 2>&1 | tee $OUT/bench-paper.txt
python3 ideal.py bench --preset cpu --steps 10 2>&1 | tee $OUT/bench-cpu-preset-on-gpu.txt
echo "bench done at $(( $(date +%s) - t0 )) s"
python3 ideal.py pretrain --preset paper --data $D --out $R/pre --epochs ${PRE_EPOCHS:-20} 2>&1 | tail -n 25 | tee $OUT/pretrain.txt
echo "pretrain done at $(( $(date +%s) - t0 )) s"
python3 ideal.py finetune --preset paper --data $D --out $R/ft --pretrained $R/pre/encoder.pt --labeled 10 --epochs ${FT_EPOCHS:-10} 2>&1 | tail -n 25 | tee $OUT/finetune.txt
echo "finetune done at $(( $(date +%s) - t0 )) s"
python3 ideal.py eval --preset paper --data $D --run $R/ft 2>&1 | tee $OUT/eval.txt
echo "all done at $(( $(date +%s) - t0 )) s"
rm -f $R/*/last.pt $R/*/best.pt $R/*/encoder.pt
