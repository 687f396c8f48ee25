set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -c 'import nibabel' 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH=/tmp/site; }
exec > >(tee "$OUT/gpu2.log") 2>&1
t0=$(date +%s); stamp() { echo "== $* at $(( $(date +%s) - t0 )) s"; }
for i in 1 2; do
  echo "-- this commit (no host synchronisation in the losses)"; timeout 60 python3 ideal.py bench --preset paper; stamp new $i
  echo "-- base 1f7b65c"; timeout 60 python3 .gpu/base/ideal.py bench --preset paper; stamp base $i
done
timeout 90 python3 results/gpu/probe.py; stamp probe
echo "-- this commit, cpu preset"; timeout 40 python3 ideal.py bench --preset cpu; stamp new cpu
echo "-- base, cpu preset"; timeout 40 python3 .gpu/base/ideal.py bench --preset cpu; stamp base cpu
