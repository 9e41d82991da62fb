"""Index updates (add, replace, delete, compact): equal to a rebuild, atomic under crashes and kills, readers
keep their version. Real text (standard-library docstrings) with the tiny random model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import colbert_jax
from colbert_jax import cli, io
from colbert_jax.index import ARRAYS, CorruptIndexError
from colbert_jax.indexing import build, update
from colbert_jax.indexing.collection import Collection
from colbert_jax.indexing.update import IndexDriftWarning
from tests.helpers import write_tiny_checkpoint

COLLECTION = Path(__file__).parents[1] / "fixtures" / "collections" / "stdlib_2k.tsv"
BASE = 120  # passages in the base index; the next ones are the pool that adds draw from
QUERIES = ["read a file line by line", "open a socket connection", "parse a date string", "abstract base class"]


@pytest.fixture(scope="module")
def pool() -> list[str]:
    return Collection.load(COLLECTION).texts(range(600))


@pytest.fixture(scope="module")
def base_index(tmp_path_factory, tiny_model, pool) -> Path:
    path = tmp_path_factory.mktemp("update") / "base"
    tsv = path.parent / "base.tsv"
    write_tsv(tsv, dict(enumerate(pool[:BASE])))
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, tsv)
    return path


@pytest.fixture
def index(tmp_path, base_index) -> Path:
    path = tmp_path / "idx"
    shutil.copytree(base_index, path)
    return path


def write_tsv(path: Path, passages: dict[int, str]) -> Path:
    path.write_text("".join(f"{p}\t{t}\n" for p, t in passages.items()))
    return path


def contents(path: Path) -> dict[int, str]:
    """pid -> text of an index, in position order (verified open)."""
    ix = colbert_jax.Index.open(path)
    return dict(zip(ix.pids.tolist(), ix.texts(range(ix.num_passages))))


def assert_equals_rebuild(path: Path, expected: dict[int, str], model, tmp: Path) -> None:
    """The updated index holds `expected` (in order); its arrays and search results equal a rebuild's."""
    got = contents(path)
    assert list(got.items()) == list(expected.items())
    rebuilt = tmp / f"rebuild-{os.urandom(4).hex()}"
    colbert_jax.Indexer(model, codec=path, show_progress=False).index(rebuilt, write_tsv(tmp / "r.tsv", expected))
    a, b = colbert_jax.Index.open(path), colbert_jax.Index.open(rebuilt)
    for name in ("codes", "residuals", "doclens", "pids", "ivf", "ivf_lengths"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for exact, k in ((False, 10), (True, 5)):
        ra = colbert_jax.Searcher(a, model).search_all(QUERIES, k=k, exact=exact)
        rb = colbert_jax.Searcher(b, model).search_all(QUERIES, k=k, exact=exact)
        for q in range(len(QUERIES)):
            assert [p for p, _, _ in ra[q]] == [p for p, _, _ in rb[q]]
            np.testing.assert_allclose([s for *_, s in ra[q]], [s for *_, s in rb[q]], atol=1e-5)
    shutil.rmtree(rebuilt)


def random_updates(path: Path, expected: dict[int, str], pool, rng, indexer, steps: int) -> None:
    """Applies `steps` random adds (lists, TSVs with new ids), replaces and deletes, mirroring them in `expected`."""
    fresh = iter(rng.permutation(np.arange(BASE, len(pool))))
    for _ in range(steps):
        op = rng.choice(["list", "tsv", "replace", "delete"])
        n = int(rng.integers(1, 9))
        if op == "list":
            texts = [pool[next(fresh)] for _ in range(n)]
            new = indexer.add(path, texts)
            assert new.tolist() == list(range(max(expected) + 1, max(expected) + 1 + n))
            expected.update(zip(new.tolist(), texts))
        elif op in ("tsv", "replace"):
            live = list(expected)
            pids = (
                rng.choice(live, min(n, len(live) - 1), replace=False).tolist()
                if op == "replace"
                else (10_000 + rng.choice(5000, n, replace=False)).tolist()
            )
            pids = [p for p in pids if op == "replace" or p not in expected]
            batch = {int(p): pool[next(fresh)] for p in pids}
            tsv = write_tsv(path.parent / "add.tsv", batch)
            assert indexer.add(path, tsv, replace=op == "replace").tolist() == list(batch)
            expected.update(batch)
        else:
            gone = rng.choice(list(expected), n, replace=False).tolist()
            assert indexer.delete(path, gone) == n
            for p in gone:
                del expected[p]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_updates_equal_rebuild(tmp_path, index, tiny_model, pool, seed, monkeypatch):
    if seed == 1:  # texts of many passages are read a source at a time: check that path too
        monkeypatch.setattr(colbert_jax.index, "BULK_TEXTS", 16)
    rng = np.random.default_rng(seed)
    expected = dict(enumerate(pool[:BASE]))
    # Indexer() reads the checkpoint the index records; the given model must encode identically
    indexer = colbert_jax.Indexer(show_progress=False) if seed % 2 else colbert_jax.Indexer(tiny_model)
    random_updates(index, expected, pool, rng, indexer, steps=6)
    assert colbert_jax.Index.open(index).has_updates
    assert_equals_rebuild(index, expected, tiny_model, tmp_path)
    if seed == 0:
        colbert_jax.Indexer().compact(index)
        compacted = colbert_jax.Index.open(index)
        assert not compacted.has_updates and compacted.version == 7
        assert_equals_rebuild(index, expected, tiny_model, tmp_path)
        random_updates(index, expected, pool, rng, indexer, steps=2)  # updates after a compaction
        colbert_jax.Indexer().compact(index)
        assert_equals_rebuild(index, expected, tiny_model, tmp_path)
        # files of versions two behind are gone; the base arrays now live in the latest generation
        meta = json.loads((index / "metadata.json").read_text())
        kept = {Path(e["path"]).parts[0] for e in meta["arrays"].values() if "path" in e}
        assert {p.name for p in index.glob("gen-*")} <= kept | set(meta["retired"])
        assert not any((index / "segments").iterdir()) or set(meta["retired"])


def test_add_and_delete_errors(index, tiny_model, pool):
    """Refusals name the pid and the option; nothing changes."""
    indexer = colbert_jax.Indexer(tiny_model)
    tsv = write_tsv(index.parent / "dup.tsv", {5: pool[300], 100_000: pool[301]})
    with pytest.raises(ValueError, match="pid 5 is already in the index") as e:
        indexer.add(index, tsv)
    assert "replace=True" in str(e.value)
    with pytest.raises(KeyError, match="pid 4242 is not in the index"):
        indexer.delete(index, [3, 4242])
    with pytest.raises(ValueError, match="would leave"):
        indexer.delete(index, range(BASE))
    for bad, message in (("12", "not a string"), ([3.9], "integers, got float64"), (np.array([7.5]), "float64")):
        with pytest.raises(TypeError, match=message):  # converted, each would delete another passage
            indexer.delete(index, bad)
    with pytest.raises(ValueError, match="can only add, delete and compact"):
        colbert_jax.Indexer().index(index.parent / "other", [pool[0]])
    assert contents(index) == dict(enumerate(pool[:BASE]))  # refused updates change nothing
    other = write_tiny_checkpoint(index.parent / "other-model", seed=1)
    with pytest.raises(ValueError, match="another checkpoint"):
        colbert_jax.Indexer(other).add(index, [pool[400]])


def test_drift_is_reported(index, tiny_model, pool):
    indexer = colbert_jax.Indexer(tiny_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 5 of 125 passages, fitting as well as the index's own: no warning
        indexer.add(index, pool[200:205])
    drift = json.loads((index / "metadata.json").read_text())["drift"]
    assert drift["added_passages"] == 5 and drift["added_share"] == pytest.approx(5 / 125)
    assert 0.9 < drift["last_add_cosine"] <= 1 and abs(drift["baseline_cosine"] - drift["last_add_cosine"]) < 0.02
    assert indexer.stats["drift"] == drift
    with pytest.warns(IndexDriftWarning, match="more than 10% of the index was added"):
        indexer.add(index, pool[205:220], max_added_share=0.1)
    with pytest.warns(IndexDriftWarning, match="clearly worse"):
        indexer.add(index, pool[220:222], drift_tolerance=-1.0)  # any cosine is "worse" by this tolerance


class Crash(Exception):
    pass


def crash_at(step: int):
    seen = []

    def hook(name):
        seen.append(name)
        if len(seen) == step:
            raise Crash(name)

    return hook, seen


@pytest.mark.parametrize("op", ["add", "delete", "compact"])
def test_crash_at_every_step_leaves_old_or_new(tmp_path, base_index, tiny_model, pool, op):
    """An exception at each step boundary leaves the files a kill there would: the index opens, verified,
    as the old or the new version, and the next update cleans up and succeeds."""
    indexer = colbert_jax.Indexer(tiny_model)

    def state(path):
        return contents(path), colbert_jax.Index.open(path).version

    start = tmp_path / "start"
    shutil.copytree(base_index, start)
    indexer.add(start, write_tsv(tmp_path / "a.tsv", {7: pool[500], 9000: pool[501]}), replace=True)
    old = state(start)

    def run(path):
        if op == "add":
            indexer.add(path, write_tsv(tmp_path / "b.tsv", {3: pool[502], 9001: pool[503]}), replace=True)
        elif op == "delete":
            indexer.delete(path, [9000, 11])
        else:
            indexer.compact(path)

    hook, seen = crash_at(0)
    update._fault_hook = hook
    try:
        reference = tmp_path / "reference"
        shutil.copytree(start, reference)
        run(reference)
        new, steps = state(reference), len(seen)
        assert new != old and steps >= 3
        for step in range(1, steps + 1):
            path = tmp_path / f"crash{step}"
            shutil.copytree(start, path)
            update._fault_hook, seen = crash_at(step)
            with pytest.raises(Crash):
                run(path)
            update._fault_hook = None
            after = state(path)  # opens with every checksum verified
            assert after == (new if seen[-1] == "committed" else old), seen[-1]
            if after == old:
                run(path)
                assert state(path)[0] == new[0]
            names = {p.name for d in ("segments", "updates") if (path / d).is_dir() for p in (path / d).iterdir()}
            referenced = json.dumps(json.loads((path / "metadata.json").read_text()))
            assert all(name in referenced for name in names)  # what the crash left was cleaned up
    finally:
        update._fault_hook = None


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import colbert_jax
    from colbert_jax.indexing.collection import Collection

    path, checkpoint, collection = sys.argv[1], sys.argv[2], sys.argv[3]
    pool = Collection.load(collection).texts(range(600))
    indexer = colbert_jax.Indexer(checkpoint, show_progress=False)
    i = 0
    while True:
        ix = colbert_jax.Index.open(path, verify=False)
        nxt = int(ix.pids.max()) + 1
        indexer.add(path, [pool[(nxt + j) % 600] for j in range(3)])  # pid p gets pool[p % 600]
        indexer.delete(path, [int(ix.pids[i % ix.num_passages])])
        if i % 3 == 2:
            indexer.compact(path)
        if i == 0:
            print("ready", flush=True)
        i += 1
    """
)


def test_kill_at_random_instants(tmp_path, base_index, tiny_checkpoint, pool):
    """SIGKILL a process looping over adds, deletes and compactions at seeded random instants: the index
    always opens verified, every passage has the text it was given, and it can still be updated."""
    rng = np.random.default_rng(7)
    script = tmp_path / "loop.py"
    script.write_text(KILL_SCRIPT)
    root = Path(__file__).parents[2]
    for trial in range(3):
        path = tmp_path / f"idx{trial}"
        shutil.copytree(base_index, path)
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), str(tiny_checkpoint), str(COLLECTION)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        try:
            line = proc.stdout.readline()
            assert line.strip() == "ready", proc.stderr.read()
            proc.stdout.close()
            try:
                proc.wait(timeout=float(rng.uniform(0.05, 2.0)))
            except subprocess.TimeoutExpired:
                pass
            assert proc.poll() is None, proc.stderr.read()  # still looping when killed
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()
        got = contents(path)
        assert len(got) >= BASE
        for pid, text in got.items():
            assert text == pool[pid % 600], pid
        colbert_jax.Indexer(show_progress=False).add(path, [pool[599]], max_added_share=1.0)  # still updatable
        assert colbert_jax.Index.open(path).num_passages == len(got) + 1


def test_searcher_keeps_its_version_until_reload(index, tiny_model, pool):
    searcher = colbert_jax.Searcher(index, tiny_model)
    before = searcher.search(QUERIES[0], k=5)
    top_pid = before[0][0]
    new = colbert_jax.Indexer(tiny_model).add(index, [pool[top_pid]])  # a copy of the best passage
    colbert_jax.Indexer().delete(index, [before[1][0]])
    assert searcher.search(QUERIES[0], k=5) == before and searcher.version == 0
    assert searcher.reload() and searcher.version == 2 and not searcher.reload()
    after = searcher.search(QUERIES[0], k=5)
    assert {top_pid, int(new[0])} == {p for p, _, _ in after[:2]}  # equal texts, equal scores
    assert before[1][0] not in [p for p, _, _ in after]
    assert searcher.passages([int(new[0])]) == [pool[top_pid]]


def test_cli_add_delete_compact(index, pool, capsys):
    tsv = write_tsv(index.parent / "new.tsv", {500: pool[500], 501: pool[501]})
    assert cli.main(["add", "--index", str(index), "--collection", str(tsv)]) == 0
    err = capsys.readouterr().err
    assert "added 2 passages" in err and "reconstruction cosine" in err and err.count("\n") == 1
    assert cli.main(["add", "--index", str(index), "--collection", str(tsv), "--quiet"]) == 2
    assert "--replace" in capsys.readouterr().err
    assert cli.main(["add", "--index", str(index), "--collection", str(tsv), "--replace", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert cli.main(["delete", "--index", str(index), "--pids", "3,17"]) == 0
    (index.parent / "gone.txt").write_text("500\n4\n")
    assert cli.main(["delete", "--index", str(index), "--pids-file", str(index.parent / "gone.txt")]) == 0
    assert cli.main(["delete", "--index", str(index), "--pids", "123456"]) == 2
    assert "pid 123456 is not in the index" in capsys.readouterr().err
    assert cli.main(["compact", "--index", str(index), "--quiet"]) == 0
    ix = colbert_jax.Index.open(index)
    assert not ix.has_updates and sorted(ix.pids.tolist()) == sorted(set(range(BASE)) - {3, 4, 17} | {501})
    assert {name: ix._array(name).shape for name in ARRAYS}["pids"] == (BASE - 2,)


def test_compact_recluster_equals_fresh_build(tmp_path, index, tiny_model, pool):
    """recluster=True retrains the centroids on the current passages: the index becomes the one a fresh
    build over them gives (same sample, same k-means), with the log folded in."""
    indexer = colbert_jax.Indexer(tiny_model)
    indexer.add(index, pool[300:340])
    indexer.delete(index, [0, 5, 7])
    expected = contents(index)
    colbert_jax.Indexer(show_progress=False).compact(index, recluster=True)
    got = colbert_jax.Index.open(index)
    assert not got.has_updates and contents(index) == expected
    assert json.loads((index / "metadata.json").read_text())["drift"] is None  # fits its own centroids again
    fresh_path = tmp_path / "fresh"
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(fresh_path, list(expected.values()))
    fresh = colbert_jax.Index.open(fresh_path)
    for name in ("codes", "residuals", "doclens"):
        np.testing.assert_array_equal(getattr(got, name), getattr(fresh, name), err_msg=name)
    np.testing.assert_array_equal(got.codec.centroids, fresh.codec.centroids)
    searcher = colbert_jax.Searcher(index, tiny_model)
    assert searcher.search(QUERIES[0], k=3)[0][0] in expected
    # A plain compaction after it leaves nothing in the reclustered generation (its centroids kept the whole
    # directory, old codes and texts included, on disk for good), and the commit after removes it.
    reclustered = {p.name for p in index.glob("gen-*")}
    indexer.add(index, pool[340:342])
    colbert_jax.Indexer(show_progress=False).compact(index)
    indexer.delete(index, [1])
    live = {Path(e.get("path", k)).parts[0] for k, e in colbert_jax.Index.open(index).metadata["arrays"].items()}
    assert len(live) == 1 and live.isdisjoint(reclustered)
    assert {p.name for p in index.glob("gen-*")} == live


def test_a_rebuild_swaps_in_only_after_an_add_in_flight_commits(tmp_path, index, tiny_model, pool, monkeypatch):
    """`index(..., overwrite=True)` while an add is between its writes and its commit: the rebuild waits for
    the add's lock, then replaces the index whole (it once swapped in at once, and the add then committed
    its metadata.json into the new index: neither opened)."""
    rebuilt = {1000 + i: pool[200 + i] for i in range(30)}
    tsv = write_tsv(tmp_path / "new.tsv", rebuilt)
    finished, errors = threading.Event(), []
    finish_index = build.finish_index

    def finish(*args, **kwargs):
        finish_index(*args, **kwargs)
        finished.set()

    monkeypatch.setattr(build, "finish_index", finish)

    def rebuild():
        try:
            colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(index, tsv, overwrite=True)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=rebuild)

    def at(step):
        if step == "commit" and not thread.is_alive() and not finished.is_set():
            thread.start()
            assert finished.wait(600), "the rebuild never finished its new index"
            time.sleep(0.5)
            assert thread.is_alive(), "the rebuild swapped its index in while an add held the index's lock"

    monkeypatch.setattr(update, "_fault_hook", at)
    colbert_jax.Indexer(tiny_model, show_progress=False).add(index, pool[150:153])
    monkeypatch.setattr(update, "_fault_hook", None)
    thread.join(600)
    assert not errors and finished.is_set()
    assert contents(index) == rebuilt  # verified open: the rebuild's index, whole


def test_a_second_build_of_the_same_path_is_refused(tmp_path, tiny_model, pool):
    target = tmp_path / "idx"
    with io.lock_file(tmp_path / ".idx.partial.lock"):  # what a build in progress holds
        with pytest.raises(io.LockedError, match=f"a build of {target} is locked by another process"):
            colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(target, pool[:20])
    assert not target.exists() and not (tmp_path / ".idx.partial").exists()


def test_compact_refuses_a_damaged_index(index, tiny_model, pool):
    """compact rewrites every array: damage must stop it, not be copied into a new generation under fresh
    checksums (it was, and the damaged originals were deleted a version later)."""
    colbert_jax.Indexer(tiny_model, show_progress=False).add(index, pool[150:152])
    chunk = next(p for p in sorted((index / "residuals").rglob("*")) if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    metadata = (index / "metadata.json").read_text()
    with pytest.raises(CorruptIndexError, match="'residuals' is corrupt"):
        colbert_jax.Indexer(tiny_model, show_progress=False).compact(index)
    assert (index / "metadata.json").read_text() == metadata
    with pytest.raises(CorruptIndexError, match="'residuals' is corrupt"):
        colbert_jax.Index.open(index)  # still reported


def test_files_a_kill_kept_from_deletion_go_with_the_next_update(index, tiny_model, pool):
    """compact retires the build's own arrays; the commit after deletes them. Killed between that commit and
    the deletion, they were kept forever; the next update removes them."""
    indexer = colbert_jax.Indexer(tiny_model, show_progress=False)
    indexer.add(index, pool[150:152])
    indexer.compact(index)
    assert (index / "codes").is_dir()  # retired, kept one version for readers of the previous one
    hook, seen = crash_at(10**6)

    def at(step):
        hook(step)
        if step == "committed":
            raise Crash(step)

    update._fault_hook = at
    try:
        with pytest.raises(Crash):
            indexer.add(index, pool[152:154])
    finally:
        update._fault_hook = None
    assert (index / "codes").is_dir()  # the kill kept them
    expected = contents(index)
    indexer.delete(index, [int(next(iter(expected)))])
    assert not any(
        (index / name).exists() for name in ARRAYS if name not in ("centroids", "bucket_cutoffs", "bucket_weights")
    )
    del expected[next(iter(expected))]
    assert contents(index) == expected


def test_reload_refuses_an_index_rebuilt_by_another_checkpoint(tmp_path, index, tiny_model, pool):
    """A rebuild in place by another model of the same dim: the Searcher (and the server, which reloads by
    itself) would go on encoding queries with the old model against the new model's passages."""
    searcher = colbert_jax.Searcher(index, tiny_model)
    before = searcher.search(QUERIES[0], k=3)
    other = write_tiny_checkpoint(tmp_path / "other-model", seed=1)
    colbert_jax.Indexer(other, nbits=2, show_progress=False).index(
        index, write_tsv(tmp_path / "c.tsv", dict(enumerate(pool[:BASE]))), overwrite=True
    )
    with pytest.raises(ValueError, match="rebuilt by another checkpoint"):
        searcher.reload()
    assert searcher.version == 0 and searcher.search(QUERIES[0], k=3) == before
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(
        index, write_tsv(tmp_path / "d.tsv", dict(enumerate(pool[:BASE]))), overwrite=True
    )
    assert searcher.reload()  # the same model again: moves


def test_a_reader_left_behind_is_told_not_given_other_texts(tmp_path, index, tiny_model, pool):
    """Passage texts are read lazily, by path. Two versions after a compaction their files are gone (they read
    as zeros: strings of NULs came back), and after a rebuild the path holds another index's files (other
    passages' texts came back): both are an IndexChangedError now, and reload moves on."""
    searcher = colbert_jax.Searcher(index, tiny_model)
    assert searcher.passages([3, 4]) == pool[3:5]
    indexer = colbert_jax.Indexer(tiny_model, show_progress=False)
    indexer.delete(index, [5])
    indexer.compact(index)
    indexer.delete(index, [6])  # removes what the compaction retired
    with pytest.raises(colbert_jax.index.IndexChangedError, match="moved on from version 0"):
        searcher.passages([3, 4])
    assert searcher.reload() and searcher.passages([3, 4]) == pool[3:5]
    shuffled = dict(enumerate(reversed(pool[:BASE])))
    indexer.index(index, write_tsv(tmp_path / "r.tsv", shuffled), overwrite=True)
    with pytest.raises(colbert_jax.index.IndexChangedError, match="was rebuilt since version 3"):
        searcher.passages([3, 4])
    assert searcher.reload() and searcher.passages([3, 4]) == [shuffled[3], shuffled[4]]


def test_a_searcher_never_used_before_two_updates_is_told_to_reload(index, tiny_model):
    """A Searcher reads its arrays on its first search. Opened, then left while a compaction and the update
    after it removed the files of the version it opened: TensorStore's NOT_FOUND came out of search."""
    searcher = colbert_jax.Searcher(index, tiny_model)
    indexer = colbert_jax.Indexer(tiny_model, show_progress=False)
    indexer.delete(index, [5])
    indexer.compact(index)
    indexer.delete(index, [6])  # removes what the compaction retired
    with pytest.raises(colbert_jax.index.IndexChangedError, match="moved on from version 0"):
        searcher.search(QUERIES[0], k=3)
    assert searcher.reload()
    hits = searcher.search(QUERIES[0], k=10)
    assert len(hits) == 10 and {5, 6}.isdisjoint(pid for pid, _, _ in hits)


def test_a_deleted_pid_is_not_given_to_another_passage(index, tiny_model, pool):
    """A list of texts gets pids after the largest the index holds: after deleting that one, the next add
    gave its pid to another passage (rankings, qrels and stores kept by pid then point at the wrong text)."""
    indexer = colbert_jax.Indexer(tiny_model, show_progress=False)
    indexer.delete(index, [BASE - 1])
    (first,) = indexer.add(index, pool[300:301])
    assert first == BASE
    indexer.delete(index, [BASE])
    indexer.compact(index)
    (second,) = indexer.add(index, pool[301:302])
    assert second == BASE + 1 and contents(index)[second] == pool[301]
