#!/usr/bin/env bash
# The seed scenario in two steps, then one report over both:
#   1. train a backbone with the FC head            -> $OUT/fc_backbone (keeps checkpoints/last.pt)
#   2. capsule head (adapter none,conv) on it       -> $OUT/capsule  (experiment=seed_scenario, no checkpoints)
#   3. capsexp report $OUT                          -> $OUT/report.{md,csv,png}
#
#   scripts/seed_scenario.sh                         # quick CPU override (~5 min on 2 cores)
#   QUICK="data.image_size=224" scripts/seed_scenario.sh   # full size, on a GPU
#
# With ImageNet weights instead of step 1:
#   capsexp train -m experiment=seed_scenario backbone.weights=IMAGENET1K_V2
# Environment: QUICK (the size overrides, used by both steps), OUT (must not exist yet), CAPSEXP.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK-"data.image_size=32 data.train_size=192 data.val_size=96 data.batch_size=16 trainer.max_steps=24 grads.log_every_n_steps=4 optim.warmup_steps=4"}
OUT=${OUT:-outputs/findings/seed_scenario}
CAPSEXP=${CAPSEXP:-$(command -v capsexp || echo .venv/bin/capsexp)}

if [[ -e "$OUT" ]]; then
  echo "$OUT exists; remove it (rm -rf $OUT) or set OUT=<new folder>." >&2
  exit 1
fi
# shellcheck disable=SC2086  # QUICK is a list of overrides
"$CAPSEXP" train head=fc $QUICK trainer.progress=false "hydra.run.dir=$OUT/fc_backbone"
# shellcheck disable=SC2086
"$CAPSEXP" train -m experiment=seed_scenario $QUICK trainer.progress=false trainer.checkpoints=none \
  "backbone.weights=$OUT/fc_backbone/checkpoints/last.pt" "hydra.sweep.dir=$OUT/capsule"
"$CAPSEXP" report "$OUT"
