"""Starting several processes: colbert_jax.distributed's COLBERT_JAX_* variables and scripts/launch_local.sh
(ranks, output prefixes, the first failure's status, no process left behind). Multi-process training itself:
tests/training/test_multiprocess.py."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from colbert_jax import distributed

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "scripts" / "launch_local.sh"


def test_no_coordinator_means_one_process(monkeypatch):
    monkeypatch.delenv("COLBERT_JAX_COORDINATOR", raising=False)
    assert distributed.initialize() is False


@pytest.mark.parametrize(
    "env,message",
    [
        ({"COLBERT_JAX_PROCESS_ID": "0"}, "COLBERT_JAX_NUM_PROCESSES is not"),
        ({"COLBERT_JAX_NUM_PROCESSES": "2"}, "COLBERT_JAX_PROCESS_ID is not"),
        ({"COLBERT_JAX_NUM_PROCESSES": "two", "COLBERT_JAX_PROCESS_ID": "0"}, "'two' is not an integer"),
        ({"COLBERT_JAX_NUM_PROCESSES": "2", "COLBERT_JAX_PROCESS_ID": "2"}, r"PROCESS_ID=2 is out of range \[0, 1\]"),
    ],
)
def test_bad_variables_are_named(monkeypatch, env, message):
    """Checked before jax.distributed is touched, so nothing is started."""
    for name in ("COLBERT_JAX_NUM_PROCESSES", "COLBERT_JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLBERT_JAX_COORDINATOR", "127.0.0.1:1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize()
    monkeypatch.setenv("COLBERT_JAX_COORDINATOR", "localhost")
    with pytest.raises(ValueError, match="must be host:port"):
        distributed.initialize()


def launch(n: int, script: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(LAUNCH), str(n), "bash", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one killpg below reaches whatever is left
        **kwargs,
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_launch_local_ranks_and_prefixes():
    proc = launch(3, 'echo "rank $COLBERT_JAX_PROCESS_ID of $COLBERT_JAX_NUM_PROCESSES at $COLBERT_JAX_COORDINATOR"')
    out, _ = finish(proc)
    assert proc.returncode == 0
    lines = sorted(out.splitlines())
    assert [line.split(" at ")[0] for line in lines] == [f"[{i}] rank {i} of 3" for i in range(3)]
    assert len({line.split(" at ")[1] for line in lines}) == 1 and lines[0].split(" at ")[1].startswith("127.0.0.1:")


def test_launch_local_stops_everyone_on_a_failure(tmp_path):
    """Rank 1 fails with status 7 while the others would sleep for minutes: the launcher exits with 7 at once
    (the 60 s bound) and none of them is left."""
    script = (
        f"cd {tmp_path}; i=$COLBERT_JAX_PROCESS_ID; echo $$ > tmp.$i; mv tmp.$i pid.$i; "
        "[ $i = 1 ] || exec sleep 600; "
        "while [ $(ls pid.* | wc -l) -lt 3 ]; do sleep 0.05; done; exit 7"  # fails once all have started
    )
    proc = launch(3, script)
    _, err = finish(proc)
    assert proc.returncode == 7 and "exited with status 7" in err
    pids = [int((tmp_path / f"pid.{i}").read_text()) for i in range(3)]
    assert all(map(gone, pids))


def test_launch_local_stops_everyone_when_stopped(tmp_path):
    proc = launch(2, f"echo $$ > {tmp_path}/pid.$COLBERT_JAX_PROCESS_ID; exec sleep 600")
    for _ in range(300):  # both started (bounded: 30 s)
        if all((tmp_path / f"pid.{i}").is_file() and (tmp_path / f"pid.{i}").read_text() for i in range(2)):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    finish(proc)
    assert proc.returncode == 143
    assert all(gone(int((tmp_path / f"pid.{i}").read_text())) for i in range(2))
