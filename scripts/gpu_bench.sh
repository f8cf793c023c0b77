#!/usr/bin/env bash
# The GPU figures of the README's "Performance" section, measured on this machine's GPU:
#
#   scripts/gpu_bench.sh [extra overrides...]    # e.g. trainer.device=cuda:1
#
# Runs `capsexp bench` with the CUDA defaults (bf16 or fp16 autocast, channels-last) for:
#   224 px batch 32, every row            capsule vs FC throughput; diagnostics overhead
#   224 px batch 64, fc + capsule r3      the memory margin of the capsule head
#   224 px batch 256, fc                  FC-head ResNet50 training throughput, to compare with a
#                                         published figure for the GPU (e.g. NVIDIA
#                                         DeepLearningExamples, PyTorch ResNet50 v1.5 README,
#                                         "Training performance", mixed precision, 1 GPU)
#   224 px batch 32, trainer.compile=true the same with torch.compile, fc + capsule-conv-r3
# and writes every table, with the device named, to $OUT/summary.md (Markdown, ready for the README).
# Every table also gives what drift/<stage> adds to a validation on the GPU (grads.drift.probe_images
# probe images at that size), per model, in ms and in training steps.
# WARMUP and STEPS set the untimed and timed steps per row (default 10 and 50).
set -euo pipefail
if [[ -n "${OUT:-}" ]]; then
  OUT=$(realpath -m -- "$OUT")  # a folder given from anywhere stays where it was meant
fi
if [[ -n "${CAPSEXP:-}" && "$CAPSEXP" == */* ]]; then
  CAPSEXP=$(realpath -m -- "$CAPSEXP")
fi
cd "$(dirname "$0")/.."
CAPSEXP=${CAPSEXP:-$(command -v capsexp || echo .venv/bin/capsexp)}
OUT=${OUT:-outputs/gpu_bench/$(date +%Y-%m-%d_%H-%M-%S)}
WARMUP=${WARMUP:-10}
STEPS=${STEPS:-50}
if [[ -e "$OUT" ]]; then
  echo "$OUT exists; remove it or set OUT=<new folder>: results are never overwritten." >&2
  exit 1
fi

names=()
bench() {  # bench <name> <overrides...>
  local name=$1
  shift
  names+=("$name")
  "$CAPSEXP" bench trainer.precision=auto "bench.warmup_steps=$WARMUP" "bench.steps=$STEPS" "$@" \
    "hydra.run.dir=$OUT/$name"
}

bench 224px_batch32 data.image_size=224 data.batch_size=32 "$@"
bench 224px_batch64 data.image_size=224 data.batch_size=64 "bench.rows=[fc,capsule-conv-r3,capsule-none-r3]" "$@"
bench 224px_batch256_fc data.image_size=224 data.batch_size=256 "bench.rows=[fc,fc-grads-off]" "$@"
bench 224px_batch32_compile data.image_size=224 data.batch_size=32 trainer.compile=true \
  "bench.rows=[fc,capsule-conv-r3]" "$@"

for name in "${names[@]}"; do  # in the order they ran
  printf '### %s\n\n' "$name"
  cat "$OUT/$name/bench.md"
  printf '\n'
done > "$OUT/summary.md"
echo "tables: $OUT/summary.md"
