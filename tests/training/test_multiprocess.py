"""Several processes train exactly as one does (issue 11): N processes on localhost, each with fake CPU
devices, against one process with as many devices, the same config and global batch: the same loss at every
step and the same final parameters (within 1e-5), on data that does not split evenly into batches (every
process must agree on the steps), with a non-contiguous share per process (two micro-batches), dropout on,
and across a kill and resume. Every run is bounded in time and leaves no process behind."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
TIMEOUT_S = 300
DEVICES = 6  # in all: 1 process x 6, 2 processes x 3, 3 processes x 2 (mesh data=6 every time)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("multiprocess")


@pytest.fixture(scope="module")
def settings(root):
    """Overrides of configs/tiny.yaml: the tiny random model, 40 examples in batches of 12 (3 steps an
    epoch, 4 examples dropped), 2 epochs, 2 micro-batches of 6 (one example per device each)."""
    ckpt = write_tiny_checkpoint(
        root / "ckpt", seed=3, hidden=32, layers=2, heads=2, intermediate=64, dim=16, doc_maxlen=32, query_maxlen=16
    )
    triples = root / "triples.jsonl"
    lines = (REPO / "tests/fixtures/training/triples.jsonl").read_text().splitlines()[:40]
    triples.write_text("".join(line + "\n" for line in lines))
    return [
        f"checkpoint={ckpt}",
        f"triples={triples}",
        "doc_maxlen=32",
        "query_maxlen=16",
        "bsize=12",
        "accumsteps=2",
        "lr=1e-3",
        "warmup=2",
        "maxsteps=100",
        "train.epochs=2",
        "train.save_every=null",
    ]


def launch(processes: int, args: list[str]) -> str:
    """Runs `python ARGS` as `processes` processes (scripts/launch_local.sh) sharing DEVICES fake CPU devices;
    returns their output. On a timeout or failure, every process of the run is killed."""
    command = [sys.executable, *args]
    if processes > 1:
        command = ["bash", str(REPO / "scripts" / "launch_local.sh"), str(processes), *command]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLBERT_JAX_")}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES // processes}",
        PYTHON=sys.executable,
    )
    # Its own session, so that one killpg reaches the launcher and every process it started.
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{processes} process(es) still running after {TIMEOUT_S} s:\n{output[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, output[-4000:]
    return output


def train_cli(out: Path, settings: list[str]) -> list[str]:
    """scripts/train.py's arguments, as a user runs it."""
    return ["scripts/train.py", "--config", str(TINY), "--out", str(out), *(a for s in settings for a in ("--set", s))]


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # 2 epochs of 3 steps, on every process count
    return [r["loss"] for r in records]


def assert_same_run(one: Path, many: Path) -> None:
    np.testing.assert_allclose(losses(many), losses(one), rtol=0, atol=1e-5)
    a, b = load_file(str(one / "export/model.safetensors")), load_file(str(many / "export/model.safetensors"))
    c = load_file(str(one.parent / "ckpt/model.safetensors"))
    assert np.abs(a["linear.weight"] - c["linear.weight"]).max() > 1e-3  # training moved them
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def one_process(root, settings):
    out = root / "one"
    launch(1, train_cli(out, settings))
    return out


def test_two_processes_equal_one(one_process, settings):
    """Each process holds 3 of each micro-batch's 6 rows: positions 0-2 and 6-8 of the global batch (or 3-5,
    9-11), where the single process's mesh puts them."""
    out = one_process.parent / "two"
    launch(2, train_cli(out, settings))
    assert_same_run(one_process, out)


def test_three_processes_killed_and_resumed_equal_one(one_process, settings):
    """Stopped after step 2 (checkpoint saved, as a kill after a save leaves it), then the same command
    resumes: each process restores its own data position and crosses the epoch boundary."""
    out = one_process.parent / "three"
    launch(3, ["-m", "tests.training.train_process", str(out), "2", *settings])
    assert not (out / "export").exists()
    positions = sorted((out / "checkpoints" / "2" / "data").glob("process_*.json"))
    assert [p.name for p in positions] == [f"process_{i}-of-3.json" for i in range(3)]
    assert all(json.loads(p.read_text())["next_index"] == 2 for p in positions)
    launch(3, train_cli(out, settings))
    assert_same_run(one_process, out)
