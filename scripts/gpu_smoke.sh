#!/usr/bin/env bash
# GPU smoke: 3 RL steps of SmolLM2-135M on one GPU (bf16-mixed), plain / checkpointing + packing / FSDP2, with step
# time and peak memory; then a short pytest subset. scripts/gpu_smoke.py says what it runs and its SMOKE_* settings.
#
# Made for a GPU machine whose Python has torch, lightning, transformers, peft and torchmetrics but that reaches no
# package registry: the project's other pure-Python dependencies come as wheels in .whl/ (scripts/gpu_wheels.sh
# downloads them where a registry is reachable), installed here into a folder of their own; the package itself is
# used from src/ without installing it. Output: $OUT when set, else logs/gpu_smoke/<time>/.
#
#   bash scripts/gpu_smoke.sh                                    # on the GPU machine
#   SMOKE_DEVICE=cpu SMOKE_MODEL=tiny SMOKE_STEPS=1 bash scripts/gpu_smoke.sh    # the CPU dry run
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
site=${SMOKE_SITE:-/tmp/simko-smoke-site}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$py" scripts/gpu_smoke.py "$@"
