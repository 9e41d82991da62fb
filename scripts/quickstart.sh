#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv, then runs `colbert-jax quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m colbert_jax.quickstart "$@"
