#!/usr/bin/env bash
# The one command to measure issue 14's CPU bars on a new CPU type, side by side with colbert-ai: builds what
# is missing (the venvs, the scale indexes at 1x/10x/100x, the held-out collection and its two indexes), runs
# the benchmarks and judges every bar (`scripts/cpu_report.py`).
#
#   bash scripts/cpu_check.sh            # everything: about 40 minutes on 2 cores with nothing built, 15 after
#   bash scripts/cpu_check.sh --report   # only the report, from the results already collected
#
# WORK (default /work/bench) keeps the data between runs: WORK/scale (bench_scale.py's indexes), WORK/heldout
# (the held-out collection, `ours` and `ref` indexes); results and logs go to OUT (default WORK/cpu-check-DATE).
# REF_PYTHON is colbert-ai's Python (default /work/refvenv/bin/python, built with
# ../shared/tools/setup-reference-venv.sh when missing and that script is there). REPEATS (default 2) sets the
# repeats of bench_scale and bench_cpu_parts; bench_encoder runs 3. Don't run it beside other heavy work: the
# figures are only as quiet as the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-/work/bench}"
OUT="${OUT:-$WORK/cpu-check-$(date -u +%Y%m%d-%H%M)}"
REF_PYTHON="${REF_PYTHON:-/work/refvenv/bin/python}"
REPEATS="${REPEATS:-2}"
S="$WORK/scale"
H="$WORK/heldout"

if [[ "${1:-}" == "--report" ]]; then
  latest="$(ls -d "$WORK"/cpu-check-* 2>/dev/null | sort | tail -1)"
  [[ -n "$latest" ]] || { echo "no results under $WORK/cpu-check-*" >&2; exit 1; }
  exec .venv/bin/python scripts/cpu_report.py --results "$latest"
fi

mkdir -p "$OUT" "$S" "$H"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/steps.log" >&2; }

# -- environment ------------------------------------------------------------------------------------
bash scripts/setup_env.sh
PY=.venv/bin/python
if [[ ! -x "$REF_PYTHON" ]]; then
  setup=../shared/tools/setup-reference-venv.sh
  [[ -f "$setup" ]] || { echo "no colbert-ai Python at $REF_PYTHON and no $setup to build one: set REF_PYTHON" >&2; exit 1; }
  log "building colbert-ai's venv at $(dirname "$(dirname "$REF_PYTHON")")"
  bash "$setup" "$(dirname "$(dirname "$REF_PYTHON")")"
fi
export JAX_PLATFORMS=cpu

{
  grep -m1 "model name" /proc/cpuinfo || true
  grep -m1 -E "^cpu family" /proc/cpuinfo || true
  grep -m1 -E "^model\s" /proc/cpuinfo || true
  echo "cores: $(nproc)"
  echo "vector flags: $(grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|avx512f|avx512_vnni|avx512_bf16|amx_tile|amx_int8|amx_bf16|avx_vnni)$' | tr '\n' ' ')"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)'), $(date -u +%Y-%m-%dT%H:%MZ)"
} > "$OUT/cpu.txt"
cat "$OUT/cpu.txt" >&2

# -- data (kept in WORK) ----------------------------------------------------------------------------
if [[ ! -f "$S/base/metadata.json" ]]; then
  corpus="$($PY -c 'from colbert_jax.quickstart import corpus_file; print(corpus_file())')"
  log "indexing the built-in corpus into $S/base"
  .venv/bin/colbert-jax index --collection "$corpus" --index "$S/base" --nbits 2 > "$OUT/build-base.log" 2>&1
fi
if [[ ! -f "$S/READY" || ! -f "$S/ref100/DONE" ]]; then
  log "building the 1x/10x/100x indexes, ours and colbert-ai's"
  $PY scripts/bench_scale.py --base-index "$S/base" --work "$S" --factors 1 10 100 --ref-python "$REF_PYTHON" \
    --build-only > "$OUT/build-scale.log" 2>&1
fi
if [[ ! -f "$H/queries.tsv" ]]; then
  log "writing the held-out collection (docstrings of colbert-ai's venv's packages)"
  "$REF_PYTHON" scripts/make_docstring_collection.py --packages torch transformers numpy networkx sympy \
    --passages 4000 --queries 366 --out "$H" > "$OUT/build-heldout.log" 2>&1
fi

# -- benchmarks -------------------------------------------------------------------------------------
log "bench_cpu_peak"
$PY scripts/bench_cpu_peak.py --repeats 3 > "$OUT/peak.txt" 2> "$OUT/peak.log"
log "bench_encoder (3 repeats)"
$PY scripts/bench_encoder.py --repeats 3 --ref-python "$REF_PYTHON" --index "$S/ours1" --json "$OUT/encoder.json" \
  > "$OUT/encoder.txt" 2> "$OUT/encoder.log"
log "bench_scale ($REPEATS repeats)"
$PY scripts/bench_scale.py --base-index "$S/base" --work "$S" --factors 1 10 100 --engine plaid \
  --ref-python "$REF_PYTHON" --repeats "$REPEATS" --json "$OUT/scale.json" > "$OUT/scale.txt" 2> "$OUT/scale.log"
log "bench_cpu_parts on the 100x index"
$PY scripts/bench_cpu_parts.py --index "$S/ours100" --queries-file "$S/queries.tsv" --repeats "$REPEATS" \
  --ref-python "$REF_PYTHON" --json "$OUT/parts.json" > "$OUT/parts.txt" 2> "$OUT/parts.log"
log "bench_search on the held-out collection (builds its indexes the first time)"
$PY scripts/bench_search.py --nbits 2 --collection "$H/collection.tsv" --queries-file "$H/queries.tsv" \
  --single 200 --ours-index "$H/ours" --ref-index "$H/ref" --ref-python "$REF_PYTHON" --json "$OUT/heldout.json" \
  > "$OUT/heldout.txt" 2> "$OUT/heldout.log"

$PY scripts/cpu_report.py --results "$OUT"
log "report: $OUT/report.md"
