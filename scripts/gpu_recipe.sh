#!/usr/bin/env bash
# The device run of scripts/gpu_recipe.py: the toy-scene and the CamVid pair train at once on one GPU
# (the models are small enough that one leaves the GPU mostly idle), and the asset tars land in $OUT.
# Prepared here (see docs/models.md): .whl/ (diffusers + pydantic wheels) and .gpu/camvid (prepare-camvid).
set -u
: "${OUT:?set OUT to the output folder}"
MIN=${MINUTES:-7.5}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 scripts/gpu_recipe.py train --pair toy --minutes "$MIN" --workers 7 --out "$OUT" >"$OUT/toy.log" 2>&1 &
python3 scripts/gpu_recipe.py train --pair camvid --data .gpu/camvid --minutes "$MIN" --workers 7 --out "$OUT" >"$OUT/camvid.log" 2>&1 &
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
tail -n 3 "$OUT/toy.log" "$OUT/camvid.log"
ls -la "$OUT"
exit $status
