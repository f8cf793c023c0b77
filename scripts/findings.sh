#!/usr/bin/env bash
# The Findings study (docs/findings.md), regenerated from scratch on a CPU:
#   1. pretrain  a ResNet50 with the FC head on the built-in shapes (64 px)   -> $OUT/pretrain
#   2. grid128   fine-tune it at 128 px (4x4 map, 512 input capsules):
#                head fc vs capsule x adapter none vs conv x optim adamw vs sgd,
#                routing 1 vs 3 for the capsule runs, $SEEDS seeds             -> $OUT/grid128_{fc,capsule}
#   3. seed224   capsule/none vs capsule/conv at 224 px (7x7 map, 1568 input capsules, the seed's shape)
#                                                                              -> $OUT/seed224
#   4. capsexp report on each step; its figures, a grad_map/features pair and a drift chart in docs/
#
#   scripts/findings.sh                      # the whole study (42 minutes on a shared 2-core CPU)
#   STEPS=300 SEEDS=0,1,2 scripts/findings.sh   # longer, more seeds (on a GPU, also drop JOBS/threads)
#   PRETRAIN="backbone.weights=IMAGENET1K_V2" scripts/findings.sh   # ImageNet weights instead of step 1
#
# A step whose folder already holds its finished runs is skipped, so an interrupted study continues
# where it stopped. Environment: OUT (default outputs/findings/seed_study), STEPS (fine-tuning steps,
# default 60), SEEDS (default 0,1), JOBS (parallel jobs, default 2: one per core, one thread each),
# CAPSEXP (the command), PRETRAIN (overrides that replace step 1's backbone), DOCS (figure folder).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-outputs/findings/seed_study}
STEPS=${STEPS:-60}
SEEDS=${SEEDS:-0,1}
JOBS=${JOBS:-2}
DOCS=${DOCS:-docs}
CAPSEXP=${CAPSEXP:-$(command -v capsexp || echo .venv/bin/capsexp)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per job: JOBS jobs share the cores without contention

# every fine-tuning run: the same data, validation, logging and lean checkpoints
COMMON="data.train_size=2000 data.val_size=256 trainer.max_steps=$STEPS trainer.max_epochs=100
        trainer.progress=false trainer.checkpoints=none grads.log_every_n_steps=5 grads.figure_every_n_steps=$STEPS
        optim.warmup_steps=5 hydra/launcher=local_parallel hydra.launcher.n_jobs=$JOBS"

done_marker() { [[ -f "$1/.complete" ]]; }

if [[ -z "${PRETRAIN:-}" ]]; then
  if ! done_marker "$OUT/pretrain"; then
    "$CAPSEXP" train head=fc data.image_size=64 data.train_size=4000 data.val_size=500 trainer.max_epochs=3 \
      trainer.progress=false grads.figure_every_n_steps=0 "hydra.run.dir=$OUT/pretrain"
    touch "$OUT/pretrain/.complete"
  fi
  PRETRAIN="backbone.weights=$OUT/pretrain/checkpoints/last.pt"
fi

sweep() {  # sweep <name> <overrides...>: one Hydra sweep into $OUT/<name>, unless it is complete
  local name=$1
  shift
  if ! done_marker "$OUT/$name"; then
    rm -rf "${OUT:?}/$name"  # an unfinished sweep starts again: its jobs keep no checkpoints
    # shellcheck disable=SC2086  # COMMON and PRETRAIN are lists of overrides
    "$CAPSEXP" train -m "$@" $COMMON $PRETRAIN "hydra.sweep.dir=$OUT/$name"
    touch "$OUT/$name/.complete"
  fi
}

sweep grid128_fc head=fc adapter=none,conv optim=adamw,sgd "seed=$SEEDS" data.image_size=128 data.batch_size=16
sweep grid128_capsule head=capsule adapter=none,conv optim=adamw,sgd head.routing.iterations=1,3 "seed=$SEEDS" \
  data.image_size=128 data.batch_size=16
sweep seed224 head=capsule adapter=none,conv "seed=$SEEDS" data.image_size=224 data.batch_size=8

for name in grid128_fc grid128_capsule seed224; do
  "$CAPSEXP" report "$OUT/$name"
done
mkdir -p "$DOCS"
# each step's report figure (a report over all of $OUT would also hold the pretraining run, and label
# every fine-tuning run with all the keys it shares with the others)
cp "$OUT/grid128_fc/report.png" "$DOCS/findings_grid128_fc.png"
cp "$OUT/grid128_capsule/report.png" "$DOCS/findings_grid128_capsule.png"
cp "$OUT/seed224/report.png" "$DOCS/findings_seed224.png"
"$(dirname "$CAPSEXP")/python" scripts/findings_figures.py "$OUT" "$DOCS"  # the python capsexp runs on
echo "tables: $OUT/<step>/report.md; figures: $DOCS/findings_*.png"
