#!/usr/bin/env bash
# The Findings study (docs/findings.md and the README's summary), regenerated from scratch on a CPU.
# Everything is in scripts/findings.py; its --help lists the profiles and options:
#   scripts/findings.sh                      # the CPU profile: pretrain, fine-tune every arm x 3 seeds, write the page
#   scripts/findings.sh --profile gpu        # the seed's scale on one GPU (its page: outputs/findings/gpu/docs)
# Finished runs are skipped and interrupted ones continue, so a stopped study is resumed by running it again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3)}
[[ -x .venv/bin/python ]] && [[ -z "${VIRTUAL_ENV:-}" ]] && PYTHON=.venv/bin/python
exec "$PYTHON" scripts/findings.py "$@"
