#!/usr/bin/env bash
# Retrieval speed before and after a change, alternated: `scripts/bench_cpu_parts.py` of git revision BASE (checked
# out in a temporary worktree, its script run by path so that its own package is imported, not the working tree's
# editable install) and of the working tree, one process at a time, ROUNDS times; prints each run's retrieval
# lines, old then new per round. On a shared, noisy machine two runs minutes apart can differ by 1.5x; rounds
# alternated meet the same neighbours, so compare the rounds, not single runs.
#
#   bash scripts/ab_cpu_parts.sh BASE ROUNDS [bench_cpu_parts.py arguments...]
#   bash scripts/ab_cpu_parts.sh HEAD~1 3 --index S/ours1 --index S/ours100 --queries-file S/queries.tsv --repeats 1
#
# Runs with the repo's .venv/bin/python (PYTHON overrides). Outputs stay in OUT (default a new /tmp directory).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0"
  exit 2
fi
base=$1 rounds=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
out=${OUT:-$(mktemp -d /tmp/ab-cpu-parts.XXXXXX)}
mkdir -p "$out"
tree=$(mktemp -d /tmp/ab-base.XXXXXX)
git -C "$repo" worktree add -q --detach "$tree" "$base"
trap 'git -C "$repo" worktree remove --force "$tree"' EXIT
echo "base $(git -C "$tree" log --oneline -1) against the working tree at $(git -C "$repo" log --oneline -1); $out"
for i in $(seq "$rounds"); do
  for side in old new; do
    if [ "$side" = old ]; then
      (cd "$tree" && PYTHONPATH="$tree" "$python" "$tree/scripts/bench_cpu_parts.py" "$@") > "$out/$side.$i.txt" 2>&1
    else
      (cd "$repo" && "$python" "$repo/scripts/bench_cpu_parts.py" "$@") > "$out/$side.$i.txt" 2>&1
    fi
    echo "round $i, $side:"
    grep "retrieval only" "$out/$side.$i.txt" || tail -5 "$out/$side.$i.txt"
  done
done
