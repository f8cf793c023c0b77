#!/usr/bin/env bash
# Reproduces the README's FC-vs-capsule table and figure (docs/findings_fc_vs_capsule.png):
# the fc_vs_capsule preset (head fc,capsule x adapter none,conv,linear; 6 runs) into
# outputs/findings/fc_vs_capsule, then `capsexp report` on that folder, then the figure into docs/.
#
#   scripts/findings_fc_vs_capsule.sh                        # quick CPU override (~10-15 min on 2 cores)
#   QUICK="data.image_size=224" scripts/findings_fc_vs_capsule.sh   # full size, on a GPU
#
# Environment: QUICK (the size overrides), OUT (the sweep folder; must not exist yet: runs are never
# overwritten), CAPSEXP (the command, default: capsexp on PATH, else .venv/bin/capsexp).
# Extra arguments are passed to `capsexp train`, e.g. hydra/launcher=local_parallel.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK-"data.image_size=32 data.train_size=192 data.val_size=96 data.batch_size=16 trainer.max_steps=24 grads.log_every_n_steps=4 optim.warmup_steps=4"}
OUT=${OUT:-outputs/findings/fc_vs_capsule}
CAPSEXP=${CAPSEXP:-$(command -v capsexp || echo .venv/bin/capsexp)}

if [[ -e "$OUT" ]]; then
  echo "$OUT exists; remove it (rm -rf $OUT) or set OUT=<new folder>." >&2
  exit 1
fi
# shellcheck disable=SC2086  # QUICK is a list of overrides
"$CAPSEXP" train -m experiment=fc_vs_capsule $QUICK trainer.progress=false "hydra.sweep.dir=$OUT" "$@"
"$CAPSEXP" report "$OUT"
mkdir -p docs
cp "$OUT/report.png" docs/findings_fc_vs_capsule.png
echo "table: $OUT/report.md  figure: docs/findings_fc_vs_capsule.png"
