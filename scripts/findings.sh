#!/usr/bin/env bash
# Reproduces a README "Findings" table and figure: a sweep into outputs/findings/<name>, then
# `capsexp report` on it, then its figure copied to docs/findings_<name>.png.
#
#   scripts/findings.sh <name> <capsexp train overrides...>
#
# The README's findings, exactly as they were made (2-core CPU):
#   scripts/findings.sh fc_vs_capsule_64px head=fc,capsule adapter=none,conv
#   scripts/findings.sh fc_vs_capsule experiment=fc_vs_capsule $QUICK
#   scripts/findings.sh routing_sweep experiment=routing_sweep $QUICK
# with QUICK="data.image_size=32 data.train_size=192 data.val_size=96 data.batch_size=16
#             trainer.max_steps=24 grads.log_every_n_steps=4 optim.warmup_steps=4"
# On a GPU, drop $QUICK and add e.g. data.image_size=224.
#
# Environment: CAPSEXP (the command; default: capsexp on PATH, else .venv/bin/capsexp).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
name=$1
shift
out=outputs/findings/$name
CAPSEXP=${CAPSEXP:-$(command -v capsexp || echo .venv/bin/capsexp)}

if [[ -e "$out" ]]; then
  echo "$out exists; remove it (rm -rf $out) or choose another name: runs are never overwritten." >&2
  exit 1
fi
# no checkpoints: the report reads metrics.json and the event files only
"$CAPSEXP" train -m "$@" trainer.progress=false trainer.checkpoints=none "hydra.sweep.dir=$out"
"$CAPSEXP" report "$out"
mkdir -p docs
cp "$out/report.png" "docs/findings_$name.png"
echo "table: $out/report.md  figure: docs/findings_$name.png"
