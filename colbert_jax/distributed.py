"""Several processes (hosts) as one JAX runtime, started the same way for every job (train, index, search).

Each process is started with the same command and, in its environment:

    COLBERT_JAX_COORDINATOR=host:port   process 0's address, reachable from every process
    COLBERT_JAX_NUM_PROCESSES=N         how many processes take part
    COLBERT_JAX_PROCESS_ID=i            this process's rank, 0..N-1 (process 0 runs the coordinator)

or `COLBERT_JAX_COORDINATOR=auto` where `jax.distributed`'s own cluster detection applies (SLURM, Open MPI,
Cloud TPU pods, Kubernetes): it finds the coordinator, the process count and this process's rank itself.
Without COLBERT_JAX_COORDINATOR the job runs as one process. `initialize()` must run before anything else
touches JAX (its first device query fixes the runtime). `scripts/launch_local.sh N CMD...` starts N
processes on one machine for tests and demos.
"""

from __future__ import annotations

import os

import jax

__all__ = [
    "initialize",
    "joined",
    "shutdown",
    "barrier",
    "publish",
    "receive",
    "retract",
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
]

ENV_COORDINATOR = "COLBERT_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "COLBERT_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "COLBERT_JAX_PROCESS_ID"

_initialized = False


def _int_env(name: str, low: int, high: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        raise ValueError(
            f"{ENV_COORDINATOR} is set but {name} is not: set both {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}"
        )
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value} is out of range [{low}, {'...' if high is None else high}]")
    return value


def initialize() -> bool:
    """Joins the multi-process runtime that the COLBERT_JAX_* variables describe, once per process.

    Returns:
        True when this process is one of several (after which `jax.process_index()`/`process_count()` and
        `jax.devices()` cover all of them), False when no coordinator is configured.

    Raises:
        ValueError: a variable is missing or malformed (named in the message).
    """
    global _initialized
    address = os.environ.get(ENV_COORDINATOR, "").strip()
    if not address:
        return False
    if _initialized:
        return True
    if address == "auto":
        jax.distributed.initialize()
    else:
        if ":" not in address:
            raise ValueError(f"{ENV_COORDINATOR}={address!r} must be host:port (or 'auto')")
        count = _int_env(ENV_NUM_PROCESSES, 1)
        rank = _int_env(ENV_PROCESS_ID, 0, count - 1)
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=rank)
    _initialized = True
    return True


def joined() -> bool:
    """Whether `initialize` made this process one of several."""
    return _initialized


def shutdown() -> None:
    """Leaves the multi-process runtime, waiting for every other process to leave too: process 0 hosts the
    coordinator, and a process still connected when it goes is ended by the runtime (an abort)."""
    global _initialized
    if _initialized:
        jax.distributed.shutdown()
        _initialized = False


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Waits until every process has reached the barrier `name` (use each name once); at once in one process.

    It goes through the coordinator, not the devices, so it can precede a program's first run: CPU
    collectives (gloo) connect the processes on that first run with a short timeout, which a process still
    compiling (or loading) while the others wait would exceed.
    """
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(name, int(timeout_s * 1000))


def _client():
    from jax._src import distributed as _distributed  # the coordination client has no public handle

    return _distributed.global_state.client


def publish(key: str, value: str) -> None:
    """Stores `value` under `key` (once) in the coordinator's key-value store, for `receive` on any process."""
    _client().key_value_set(key, value)


def receive(key: str, poll_s: float = 30.0) -> str:
    """The value `publish` stored under `key`, waiting as long as it takes. It waits on the coordinator in
    steps of `poll_s`, never in a device collective, which would time out: a server's other processes may
    wait here for hours between requests. If process 0 (the coordinator) dies, the runtime ends this process."""
    client = _client()
    while True:
        try:
            return client.blocking_key_value_get(key, int(poll_s * 1000))
        except Exception as e:  # noqa: BLE001 - jax.errors.JaxRuntimeError: only a time-out is retried
            if "DEADLINE_EXCEEDED" not in str(e):
                raise


def retract(key: str) -> None:
    """Deletes `key` from the coordinator's key-value store (once every process has received it)."""
    _client().key_value_delete(key)
