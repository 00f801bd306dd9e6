#!/usr/bin/env bash
# The device run of scripts/gpu_recipe.py: the toy-scene and the CamVid pair train at once on one GPU
# (the models are small enough that one leaves the GPU mostly idle), and the asset tars land in $OUT.
# Prepared here (see docs/models.md): .whl/ (diffusers + pydantic wheels) and .gpu/camvid (prepare-camvid).
# PAIRS picks the pairs (default "toy camvid"); TOY_ARGS / CAMVID_ARGS add config overrides, e.g.
#   OUT=$OUT MINUTES=9 PAIRS=toy TOY_ARGS="base.preset=small-f2" bash scripts/gpu_recipe.sh
set -u
: "${OUT:?set OUT to the output folder}"
MIN=${MINUTES:-7.5}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PAIRS=${PAIRS:-toy camvid}
for pair in $PAIRS; do
  case $pair in
    # shellcheck disable=SC2086  # the overrides are word-split on purpose
    toy) python3 scripts/gpu_recipe.py train --pair toy --minutes "$MIN" --workers 7 --out "$OUT" ${TOY_ARGS:-} >"$OUT/toy.log" 2>&1 & ;;
    # shellcheck disable=SC2086
    camvid) python3 scripts/gpu_recipe.py train --pair camvid --data .gpu/camvid --minutes "$MIN" --workers 7 --out "$OUT" ${CAMVID_ARGS:-} >"$OUT/camvid.log" 2>&1 & ;;
    *) echo "unknown pair $pair (toy, camvid)"; exit 2 ;;
  esac
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
for pair in $PAIRS; do tail -n 3 "$OUT/$pair.log"; done
ls -la "$OUT"
exit $status
