"""Several processes build one index (issue 11): `colbert-jax index` under scripts/launch_local.sh with 2 and 3
processes on localhost gives an index bit-identical to one process's with the same devices per process (every
array's sha256), and a multi-process build killed mid-way resumes to the same index. (The number of devices
per process sets the encoder's batch shapes, which can move an embedding by a float16 ulp: hosts are added, not
re-divided.) Every run is
bounded in time and leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import COLLECTIONS
from tests.helpers import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def _env(devices: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHON": sys.executable,
    }


# The CLI with reading each piece's texts slowed down, so that a kill surely lands mid-build.
SLOWED = (
    "import sys, time\n"
    "from colbert_jax.indexing import collection\n"
    "texts = collection.Collection.texts\n"
    "collection.Collection.texts = lambda self, indices: (time.sleep(0.5), texts(self, indices))[1]\n"
    "from colbert_jax.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _command(processes: int, args: list[str], slow: bool = False) -> list[str]:
    cli = [sys.executable, *(["-c", SLOWED] if slow else ["-m", "colbert_jax.cli"]), *args]
    return ["bash", str(REPO / "scripts" / "launch_local.sh"), str(processes), *cli] if processes > 1 else cli


def build(processes: int, devices: int, args: list[str], cwd: Path) -> str:
    """Runs `colbert-jax index ARGS` as `processes` processes with `devices` fake devices each."""
    proc = subprocess.Popen(
        _command(processes, args),
        cwd=cwd,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{processes}-process build timed out:\n{out[-3000:]}") from None
    assert proc.returncode == 0, f"{processes}-process build exited {proc.returncode}:\n{out[-3000:]}"
    return out


def arrays(index: Path) -> dict:
    return json.loads((index / "metadata.json").read_text())["arrays"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("mpindex")
    write_tiny_checkpoint(root / "ckpt", seed=2)
    lines = (COLLECTIONS / "stdlib_2k.tsv").read_text().splitlines()[:300]
    (root / "coll.tsv").write_text("\n".join(lines) + "\n")
    # 300 passages in 5 chunks of 64 (and 5 sample pieces): 3 processes get 2, 2 and 1 of each
    return root, ["--checkpoint", str(root / "ckpt"), "--collection", str(root / "coll.tsv"), "--chunksize", "64"]


@pytest.fixture(scope="module")
def single(inputs) -> Path:
    root, args = inputs
    build(1, 1, ["index", *args, "--index", "single"], root)
    return root / "single"


@pytest.mark.parametrize("processes", [2, 3])
def test_several_processes_build_the_same_index(inputs, single, processes):
    root, args = inputs
    out = build(processes, 1, ["index", *args, "--index", f"p{processes}"], root)
    index = root / f"p{processes}"
    assert arrays(index) == arrays(single), out[-2000:]  # every array bit-identical
    meta = json.loads((index / "metadata.json").read_text())
    assert meta["build"]["processes"] == processes
    assert not (root / f".p{processes}.partial").exists()


def test_killed_multiprocess_build_resumes(inputs, single):
    root, args = inputs
    work = root / ".killed.partial"
    proc = subprocess.Popen(
        _command(2, ["index", *args, "--index", "killed"], slow=True),
        cwd=root,
        env=_env(1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not list((work / "sample").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, "the build finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # every process of the job at once, as a lost job would be
        proc.wait(timeout=60)
    assert not (root / "killed").exists() and (work / "plan.json").is_file()
    saved = len(list((work / "sample").glob("*.json")))
    out = build(2, 1, ["index", *args, "--index", "killed"], root)
    assert saved >= 1 and f"resuming the build in .killed.partial: {saved} sample pieces" in out  # not redone
    assert arrays(root / "killed") == arrays(single)
    shutil.rmtree(root / "killed")
