"""Writes that survive a power loss and writers that wait for one another: files flushed before their rename
and the rename flushed after (`io.atomic_file`, `io.replace_dir`), and a directory's writers' lock that follows
the directory when it is replaced (`io.locked_dir`)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from colbert_jax import io


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def events(monkeypatch) -> list[tuple]:
    """("fsync", path) and ("replace", src, dst) in the order they happen."""
    log: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd):
        log.append(("fsync", _fd_path(fd)))
        return fsync(fd)

    def logged_replace(src, dst):
        log.append(("replace", str(src), str(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    return log


@pytest.mark.parametrize("writer", ["write_json", "save_npy", "write_text"])
def test_a_file_reaches_the_disk_before_its_rename_and_the_rename_after(tmp_path, events, writer):
    import numpy as np

    target = tmp_path / "metadata.json"
    {
        "write_json": lambda: io.write_json(target, {"a": 1}),
        "save_npy": lambda: io.save_npy(target, np.arange(3)),
        "write_text": lambda: io.write_text(target, "x\n"),
    }[writer]()
    (_, tmp), (_, src, dst), (_, directory) = events
    assert Path(tmp).name.startswith(".metadata.json.tmp") and src == tmp and dst == str(target)
    assert directory == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "ranking.tsv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="midway"), io.atomic_file(target) as f:
        f.write("new, half written")
        raise RuntimeError("midway")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["ranking.tsv"]


def test_a_directory_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, events):
    old, new = tmp_path / "index", tmp_path / ".index.saving-1"
    (old / "codes").mkdir(parents=True)
    (old / "codes" / "0").write_text("old")
    (new / "codes").mkdir(parents=True)
    (new / "codes" / "0").write_text("new")
    (new / "metadata.json").write_text("{}")
    io.replace_dir(new, old)
    synced = [e[1] for e in events if e[0] == "fsync"]
    assert set(synced[:-1]) == {str(new / "codes" / "0"), str(new / "metadata.json"), str(new / "codes"), str(new)}
    assert synced[-1] == str(tmp_path)  # the swap itself, after every file it names
    assert (old / "codes" / "0").read_text() == "new" and not new.exists()


def test_a_waiting_writer_takes_the_lock_of_the_directory_that_replaced_the_one_it_waited_on(tmp_path):
    index = tmp_path / "index"
    index.mkdir()
    seen: list[str] = []

    def writer():
        with io.locked_dir(index):
            seen.append((index / "version").read_text())
            try:  # the lock now at `index` must be the one held
                with io.lock_file(index / ".lock", wait=False):
                    seen.append("lock at the path was free")
            except io.LockedError:
                seen.append("held")

    with io.locked_dir(index):
        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive() and not seen  # waiting for us
        fresh = tmp_path / ".index.saving-2"
        fresh.mkdir()
        (fresh / "version").write_text("rebuilt")
        io.replace_dir(fresh, index)
    thread.join(30)
    assert seen == ["rebuilt", "held"]


def test_a_lock_taken_without_waiting_names_what_holds_it(tmp_path):
    with io.lock_file(tmp_path / ".x.lock"):
        with pytest.raises(io.LockedError, match="a build of X is locked by another process"):
            with io.lock_file(tmp_path / ".x.lock", wait=False, what="a build of X"):
                pass
    with io.lock_file(tmp_path / ".x.lock", wait=False):
        pass


def test_processes_building_the_default_model_cache_at_once_all_load_it(tmp_path):
    """Each builds the cache directory and swaps it in (`replace_dir`): none sees it absent or half-deleted
    (they once deleted it and renamed theirs in, and a loader beside them found no weight file)."""
    import subprocess
    import sys

    child = (
        "from colbert_jax.default_model import default_checkpoint\n"
        "from colbert_jax.checkpoint import load_checkpoint\n"
        "load_checkpoint(default_checkpoint()); print('loaded')\n"
    )
    env = {**os.environ, "COLBERT_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", child], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outputs]
    assert all(out.strip() == "loaded" for out, _ in outputs)
    assert [p.name for p in (tmp_path / "cache" / "checkpoints").iterdir()] == ["minilm-l6-colbert-dim128-seed0"]
