#!/bin/bash
# kill -9 a 2-process `lumen train-lumen` after a checkpoint, resume it, and compare its ControlNet with
# an uninterrupted run's (docs/scaling.md, "Fault tolerance"). About 3 minutes on 2 idle cores.
#   bash scripts/ddp_kill_resume.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/lumen-ddp-kill}
ARGS=(configs/tiny-lumen.yaml lumen.train_steps=16 lumen.checkpoint_every=4 lumen.validate_every=1000
      data.num_images=32 runner.devices=2 device=cpu)
export OMP_NUM_THREADS=1
rm -rf "$WORK" && mkdir -p "$WORK"
lumen train-lumen "${ARGS[@]}" --out "$WORK/full" > "$WORK/full.log" 2>&1
lumen train-lumen "${ARGS[@]}" --out "$WORK/killed" > "$WORK/killed-1.log" 2>&1 &
PID=$!
until [ -d "$WORK/killed/lumen_train/checkpoints/step-000008" ]; do sleep 0.5; done
RANKS=$(pgrep -P "$PID" -f multiprocessing | tr '\n' ' ' || true)
kill -9 "$PID"
wait "$PID" 2>/dev/null || true
sleep 5
echo "killed $PID after the step-8 checkpoint"
for r in $RANKS; do kill -0 "$r" 2>/dev/null && echo "rank process $r STILL ALIVE" || echo "rank process $r gone"; done
lumen train-lumen "${ARGS[@]}" --out "$WORK/killed" > "$WORK/killed-2.log" 2>&1
python - "$WORK" <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file
work = sys.argv[1]
a = load_file(f"{work}/full/lumen/diffusion_pytorch_model.safetensors")
b = load_file(f"{work}/killed/lumen/diffusion_pytorch_model.safetensors")
diff = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
steps = [ln.split(",")[0] for ln in open(f"{work}/killed/lumen_train/train_log.csv").read().splitlines()[1:]]
print(f"max |weight difference|, killed + resumed vs uninterrupted: {diff:.3g}")
print(f"logged steps: {steps}")
sys.exit(0 if diff < 1e-6 and steps == [str(i) for i in range(1, 17)] else 1)
PY
