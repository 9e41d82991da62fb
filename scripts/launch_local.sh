#!/usr/bin/env bash
# Runs N processes of one command on this machine as one multi-process JAX runtime (for tests and demos):
#   scripts/launch_local.sh 2 python scripts/train.py --config configs/tiny.yaml --out runs/tiny2
# Each process gets COLBERT_JAX_COORDINATOR=127.0.0.1:<free port>, COLBERT_JAX_NUM_PROCESSES=N and its
# COLBERT_JAX_PROCESS_ID; its output lines are prefixed with "[i] ". When one process fails, or on Ctrl-C or
# SIGTERM, all the others are stopped. Exit code: the first non-zero one (0 when all succeed).
# Fake CPU devices per process: XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu.
set -u

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N COMMAND [ARGS...]   (N >= 1 processes)" >&2
  exit 2
fi
n=$1
shift
python=${PYTHON:-python3}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') || exit 1

pids=()
stop_all() {  # TERM, then KILL whatever is left after a grace period
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < n; i++)); do
  # `exec` makes $! the command's own pid; sed prefixes each line as it comes (-u: unbuffered).
  (
    export COLBERT_JAX_COORDINATOR="127.0.0.1:$port" COLBERT_JAX_NUM_PROCESSES="$n" COLBERT_JAX_PROCESS_ID="$i"
    exec "$@"
  ) > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
done

status=0
live=("${pids[@]}")
while ((${#live[@]} > 0)); do
  next=()
  for pid in "${live[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      next+=("$pid")
      continue
    fi
    wait "$pid"
    rc=$?
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "[launch_local] process $pid exited with status $rc: stopping the others" >&2
      stop_all
    fi
  done
  live=("${next[@]}")
  ((${#live[@]} == 0)) || sleep 0.2
done
wait 2>/dev/null  # let the output prefixers finish
exit "$status"
