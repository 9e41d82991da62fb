"""Crash tests: an index build, a checkpoint conversion and a training run killed with SIGKILL at 20+ seeded
points each (spread over every file the operation writes, plus a few timed kills), and a full disk.

After each kill the previous index or checkpoint opens and verifies (it is the old one, or the finished new
one), the same command run again completes, and its result is bit-identical to an uninterrupted run's.
The kills run in children of a fork server (`crashpoint.py`), so each costs about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import colbert_jax
from colbert_jax.index import Index

REPO = Path(__file__).resolve().parents[2]
KILLS = 20  # at filesystem events; and TIMED kills at seeded moments
TIMED = 4


class CrashServer:
    """Client of `python -m tests.reliability.crashpoint`."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.crashpoint"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.jobs = 0

    def run(self, job: str, args: dict, root: Path, **options) -> dict:
        """Runs a job; options: kill_at_event, kill_after_s, fsize_limit. Returns the server's answer + log."""
        self.jobs += 1
        log, report = self.scratch / f"{self.jobs}.log", self.scratch / f"{self.jobs}.json"
        request = {"job": job, "args": args, "root": str(root), "log": str(log), "report": str(report), **options}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        answer["log"] = log.read_text() if log.exists() else ""
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def crash(tmp_path_factory):
    server = CrashServer(tmp_path_factory.mktemp("crash_logs"))
    yield server
    server.close()


def kill_points(events: int, n: int, seed: int) -> list[int]:
    """n seeded event numbers in 1..events, one from each of n equal strata (all of them if fewer)."""
    if events <= n:
        return list(range(1, events + 1))
    rng = np.random.default_rng(seed)
    edges = np.linspace(1, events + 1, n + 1).astype(int)
    return sorted({int(rng.integers(lo, max(lo + 1, hi))) for lo, hi in zip(edges[:-1], edges[1:])})


def timed_points(seconds: float, n: int, seed: int) -> list[float]:
    return sorted(np.random.default_rng(seed).uniform(0.1, 0.95, n) * seconds)


def tree_digest(path: Path, skip=()) -> str:
    """sha256 over a directory's files (relative names and bytes), except the names in `skip`; the
    directory's own path, which a checkpoint records, counts as the same wherever it is."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip):
        data = f.read_bytes().replace(os.fsencode(path.resolve()), b"<dir>")
        h.update(str(f.relative_to(path)).encode() + b"\0" + data)
    return h.hexdigest()


def index_digest(path: Path) -> str:
    """Opens and verifies the index (every array's sha256), then digests it: arrays and metadata, but not
    the build record (its date and timings differ from run to run)."""
    index = Index.open(path, verify=True)
    meta = {k: v for k, v in index.metadata.items() if k != "build"}
    # (not the writers' lock file either: a kill after the rebuild took the old index's lock leaves it, empty)
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest() + tree_digest(
        path, skip=("metadata.json", ".lock")
    )


def lines_file(src: Path, dst: Path, lo: int, hi: int) -> Path:
    dst.write_text("\n".join(src.read_text().splitlines()[lo:hi]) + "\n")
    return dst


# -- index build ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index_case(tmp_path_factory, tiny_checkpoint, small_collection):
    """A previous index (40 passages) and the job that replaces it with an index of 48 other passages."""
    base = tmp_path_factory.mktemp("crash_index")
    old = lines_file(small_collection, base / "old.tsv", 100, 140)
    new = lines_file(small_collection, base / "new.tsv", 0, 48)
    prior = base / "prior" / "idx"
    colbert_jax.Indexer(tiny_checkpoint, nbits=2, chunksize=16, show_progress=False).index(prior, old)
    return base, prior, {"checkpoint": str(tiny_checkpoint), "collection": str(new), "chunksize": 16}


def test_index_build_killed_anywhere_resumes_to_the_same_index(crash, index_case, tiny_model):
    base, prior, args = index_case
    before = index_digest(prior)

    def fresh(name: str) -> Path:
        root = base / name
        shutil.copytree(prior, root / "idx")
        return root

    runs = [crash.run("index", {**args, "index": str(fresh(name) / "idx")}, base / name) for name in ("ref", "ref2")]
    assert all(run["rc"] == 0 for run in runs), runs
    after = index_digest(base / "ref" / "idx")
    assert after != before and index_digest(base / "ref2" / "idx") == after
    events, seconds = runs[0]["events"], runs[1]["seconds"]  # the second run's programs come from the cache

    plan = [{"kill_at_event": k} for k in kill_points(events, KILLS, seed=0)]
    plan += [{"kill_after_s": s} for s in timed_points(seconds, TIMED, seed=1)]
    assert len(plan) == KILLS + TIMED and events >= 4 * KILLS  # the points are spread over many states
    outcomes = []
    for i, kill in enumerate(plan):
        root = fresh(f"kill{i}")
        killed = crash.run("index", {**args, "index": str(root / "idx")}, root, **kill)
        if "kill_after_s" in kill and killed["rc"] == 0:
            assert index_digest(root / "idx") == after  # a timed kill after the end (the run was faster)
            continue
        assert killed["signal"] == signal.SIGKILL, (kill, killed["log"])
        state = index_digest(root / "idx")  # opens and verifies: the old index, or the finished new one
        assert state in (before, after), kill
        outcomes.append("old" if state == before else "new")
        # The same call again (here, in this process) resumes and finishes.
        indexer = colbert_jax.Indexer(tiny_model, nbits=2, chunksize=args["chunksize"], show_progress=False)
        indexer.index(root / "idx", args["collection"], overwrite=True)
        assert index_digest(root / "idx") == after, kill
        assert sorted(os.listdir(root)) == ["idx"], kill  # no work or old directory left behind
        shutil.rmtree(root)
    assert "old" in outcomes and "new" in outcomes


def test_full_disk_during_index_build_keeps_the_old_index(crash, index_case):
    base, prior, args = index_case
    root = base / "full"
    shutil.copytree(prior, root / "idx")
    argv = ["index", "--checkpoint", args["checkpoint"], "--collection", args["collection"]]
    argv += ["--index", str(root / "idx"), "--chunksize", "16", "--overwrite"]
    full = crash.run("cli", {"argv": argv}, root, fsize_limit=16 << 10)
    assert full["rc"] == 1, full["log"]
    assert "colbert-jax index: error: no space left" in full["log"] and "Traceback" not in full["log"]
    assert index_digest(root / "idx") == index_digest(prior)


# -- checkpoint conversion -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def convert_case(tmp_path_factory, tiny_checkpoint):
    """A previous colbert-jax checkpoint (another model) and `colbert-jax convert` replacing it."""
    from tests.helpers import write_tiny_checkpoint

    base = tmp_path_factory.mktemp("crash_convert")
    other = write_tiny_checkpoint(base / "other_src", seed=1)
    prior = base / "prior" / "ckpt"
    colbert_jax.load_checkpoint(other).save(prior, format="jax")
    return base, prior, str(tiny_checkpoint)


def test_convert_killed_anywhere_reruns_to_the_same_checkpoint(crash, convert_case):
    from colbert_jax.cli import main

    base, prior, src = convert_case

    def fresh(name: str) -> tuple[Path, list[str]]:
        root = base / name
        shutil.copytree(prior, root / "ckpt")
        return root, ["convert", src, str(root / "ckpt"), "--to", "jax", "--overwrite"]

    before = tree_digest(fresh("copy")[0] / "ckpt")  # the copy records the original's path, as all copies do

    runs = [crash.run("cli", {"argv": fresh(name)[1]}, base / name) for name in ("ref", "ref2")]
    assert all(run["rc"] == 0 for run in runs), runs
    after = tree_digest(base / "ref" / "ckpt")
    assert after != before and tree_digest(base / "ref2" / "ckpt") == after
    events, seconds = runs[0]["events"], runs[1]["seconds"]
    points = kill_points(events, KILLS, seed=2)
    plan = [{"kill_at_event": k} for k in points]
    plan += [{"kill_after_s": s} for s in timed_points(seconds, KILLS + TIMED - len(plan), seed=3)]
    assert len(points) >= min(events, KILLS) and len(plan) >= KILLS + TIMED
    loaded = {}
    for i, kill in enumerate(plan):
        root, argv = fresh(f"kill{i}")
        killed = crash.run("cli", {"argv": argv}, root, **kill)
        if "kill_after_s" in kill and killed["rc"] == 0:
            assert tree_digest(root / "ckpt") == after  # a timed kill after the end (the run was faster)
            continue
        assert killed["signal"] == signal.SIGKILL, (kill, killed["log"])
        state = tree_digest(root / "ckpt")
        assert state in (before, after), kill
        if state not in loaded:  # it loads (each distinct state once: loading is the slow part)
            loaded[state] = colbert_jax.load_checkpoint(root / "ckpt").config.dim
        assert main(argv) == 0
        assert tree_digest(root / "ckpt") == after, kill
        assert sorted(os.listdir(root)) == ["ckpt"], kill  # no half-written copy left behind
        shutil.rmtree(root)
    assert len(loaded) == 2


def test_full_disk_during_convert_keeps_the_old_checkpoint(crash, convert_case):
    base, prior, src = convert_case
    root = base / "full"
    shutil.copytree(prior, root / "ckpt")
    argv = ["convert", src, str(root / "ckpt"), "--to", "jax", "--overwrite"]
    full = crash.run("cli", {"argv": argv}, root, fsize_limit=64 << 10)
    assert full["rc"] == 1, full["log"]
    assert "colbert-jax convert: error: no space left" in full["log"] and "Traceback" not in full["log"]
    shutil.copytree(prior, base / "full_copy" / "ckpt")
    assert tree_digest(root / "ckpt") == tree_digest(base / "full_copy" / "ckpt")
    assert sorted(os.listdir(root)) == ["ckpt"]


# -- training checkpoints ------------------------------------------------------------------------------
TRAIN_SETS = ["doc_maxlen=32", "query_maxlen=16", "bsize=8", "warmup=2", "lr=1e-3", "maxsteps=3"]
TRAIN_SETS += ["train.save_every=1", "train.keep_checkpoints=2", "train.log_every=1"]


def run_digest(out: Path) -> tuple:
    """What a finished run leaves: the exported model (bit for bit, but for the export's date), the logged
    losses and gradient norms per step, and the kept checkpoints."""
    export = tree_digest(out / "export", skip=("artifact.metadata",))
    meta = json.loads((out / "export" / "artifact.metadata").read_text())
    meta["meta"].pop("current_datetime")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in logged]
    meta = json.dumps(meta, sort_keys=True).replace(str(out.resolve()), "<run>")
    return export, meta, losses, sorted(p.name for p in (out / "checkpoints").iterdir())


def latest_checkpoint_step(out: Path) -> int | None:
    """Restores the run's latest Orbax checkpoint (the state a rerun resumes from); its step."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager((out / "checkpoints").resolve())
    latest = manager.latest_step()
    if latest is None:
        return None
    state = ocp.StandardCheckpointer().restore((out / "checkpoints" / str(latest) / "state").resolve())
    assert int(state["step"] if isinstance(state, dict) else state[0]) == latest
    return latest


def test_training_killed_anywhere_resumes_to_the_same_model(crash, tmp_path_factory, tiny_checkpoint):
    from colbert_jax.cli import main

    base = tmp_path_factory.mktemp("crash_train")
    config = str(REPO / "configs" / "tiny.yaml")

    def argv(root: Path) -> list[str]:
        sets = [f"checkpoint={tiny_checkpoint}", *TRAIN_SETS]
        return ["train", "--config", config, "--out", str(root / "run"), *(a for s in sets for a in ("--set", s))]

    runs = [crash.run("cli", {"argv": argv(base / name)}, base / name) for name in ("ref", "ref2")]
    assert all(run["rc"] == 0 for run in runs), runs[0]["log"][-3000:]
    expected = run_digest(base / "ref" / "run")
    assert run_digest(base / "ref2" / "run") == expected and expected[3] == ["2", "3"]
    # Only the files tell the saves apart (a timed kill mostly lands in a compilation or a step). A run's count
    # of file events varies by a few: Orbax removes an old checkpoint's OCDBT data files, and how many files
    # its asynchronous writes made depends on timing. So the points lie within the shorter reference run, and
    # a run that still ends before its point (it made fewer events) must simply equal the reference.
    events = min(run["events"] for run in runs)
    plan = [{"kill_at_event": k} for k in kill_points(events, KILLS, seed=4)]
    assert len(plan) == KILLS and events >= 4 * KILLS
    resumed_from, finished = set(), 0
    for i, kill in enumerate(plan):
        root = base / f"kill{i}"
        killed = crash.run("cli", {"argv": argv(root)}, root, **kill)
        if killed["signal"] is None and killed["rc"] == 0 and killed["events"] < kill["kill_at_event"]:
            finished += 1
            assert run_digest(root / "run") == expected, kill
            shutil.rmtree(root)
            continue
        assert killed["signal"] == signal.SIGKILL, (kill, killed["log"][-3000:])
        if (root / "run" / "checkpoints").is_dir():
            resumed_from.add(latest_checkpoint_step(root / "run"))
        assert main(argv(root)) == 0, kill
        assert run_digest(root / "run") == expected, kill
        shutil.rmtree(root)
    assert resumed_from >= {1, 2, 3}  # kills fell between the saves and after the last one
    assert finished <= 2, f"{finished} of {KILLS} runs ended before their kill point"


# -- index updates -------------------------------------------------------------------------------------
def update_digest(path: Path) -> str:
    """`index_digest` without what differs by design between two runs of an update: segment directories
    are named `NNNNNN-<random>` (each attempt writes new files), and dates."""
    import re

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in ("build", "created", "updated", "time")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    # Opening with verify=True checks every array metadata.json lists against its sha256, so metadata.json
    # stands for the whole index (files it does not list, a killed attempt's, are not part of it).
    index = Index.open(path, verify=True)
    unnamed = re.sub(r"(\d{6})-[0-9a-f]{8}", r"\1-*", json.dumps(strip(index.metadata), sort_keys=True))
    return hashlib.sha256(unnamed.encode()).hexdigest()


@pytest.mark.parametrize("op", ["add", "delete", "compact"])
def test_index_update_killed_anywhere_leaves_old_or_new(crash, index_case, tiny_model, op):
    """add (40 new passages), delete (10 pids) and compact, each killed at 20 seeded filesystem events: the
    index opens and verifies as the old one or the updated one; if old, the same call completes it."""
    base, prior, args = index_case
    start = base / f"{op}_start" / "idx"
    if not start.exists():
        shutil.copytree(prior, start)
        if op == "compact":  # something to fold in
            colbert_jax.Indexer(tiny_model, show_progress=False).delete(start, [100, 101, 102])
    extra = lines_file(Path(args["collection"]), base / "extra.tsv", 0, 0)
    extra.write_text(
        "".join(
            f"{1000 + i}\t{line.split(chr(9), 1)[1]}\n"
            for i, line in enumerate(Path(args["collection"]).read_text().splitlines()[:40])
        )
    )
    job = {"checkpoint": args["checkpoint"], "op": op, "collection": str(extra), "pids": list(range(110, 120))}

    def fresh(name: str) -> Path:
        root = base / f"{op}_{name}"
        shutil.copytree(start, root / "idx")
        return root

    def rerun(path: Path) -> None:
        indexer = colbert_jax.Indexer(tiny_model, show_progress=False)
        {"add": lambda: indexer.add(path, extra), "delete": lambda: indexer.delete(path, job["pids"])}.get(
            op, lambda: indexer.compact(path)
        )()

    before = update_digest(start)
    runs = [crash.run("update", {**job, "index": str(fresh(n) / "idx")}, base / f"{op}_{n}") for n in ("ref", "ref2")]
    assert all(r["rc"] == 0 for r in runs), runs[0]["log"][-2000:]
    after = update_digest(base / f"{op}_ref" / "idx")
    assert after != before and update_digest(base / f"{op}_ref2" / "idx") == after
    points = kill_points(runs[0]["events"], KILLS, seed=6)
    assert len(points) >= min(KILLS, runs[0]["events"])
    outcomes = []
    for i, k in enumerate(points):
        root = fresh(f"kill{i}")
        killed = crash.run("update", {**job, "index": str(root / "idx")}, root, kill_at_event=k)
        assert killed["signal"] == signal.SIGKILL, (k, killed["log"][-2000:])
        state = update_digest(root / "idx")
        assert state in (before, after), k
        outcomes.append(state == after)
        if state == before:
            rerun(root / "idx")
            assert update_digest(root / "idx") == after, k
        shutil.rmtree(root)
    assert not all(outcomes)
