#!/usr/bin/env bash
# The README's "Reading the gradient charts" table: gradient norm against update/weight and drift,
# FC vs capsule head, AdamW vs SGD, from the same random-init start (64 px, 80 steps, adapter=none).
#
#   scripts/grad_vs_update.sh          # 8 minutes on a shared 2-core CPU
#
# Environment: OUT (default outputs/findings/grad_vs_update; must not exist), CAPSEXP.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/findings/grad_vs_update}
CAPSEXP=${CAPSEXP:-$(command -v capsexp || echo .venv/bin/capsexp)}
if [[ -e "$OUT" ]]; then
  echo "$OUT exists; remove it (rm -rf $OUT) or set OUT=<new folder>." >&2
  exit 1
fi
"$CAPSEXP" train -m head=fc,capsule optim=adamw,sgd data.image_size=64 trainer.max_steps=80 \
  data.val_size=256 grads.log_every_n_steps=5 grads.figure_every_n_steps=80 trainer.checkpoints=none \
  trainer.progress=false "hydra.sweep.dir=$OUT"
"$CAPSEXP" report "$OUT"
