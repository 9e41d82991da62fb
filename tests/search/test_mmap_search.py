"""The streamed search path over a memory-mapped index (`load_index_with_mmap=True`, the CPU default for it):
rankings equal the in-memory streamed path's, on one device and split over several, and each batch reads from
disk only its survivors' rows, leaving none of the file resident in the process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import colbert_jax
from colbert_jax.index import ChunkedMemmap

QUERIES = [
    "read a file line by line",
    "open a socket connection",
    "parse a date string",
    "abstract base class",
    "compress data with zlib",
    "run a subprocess and capture its output",
    "sort a list in place",
]


@pytest.fixture(scope="module")
def searchers(real_index, minilm_model):
    mapped = colbert_jax.Searcher(real_index, minilm_model, truncate=True, load_index_with_mmap=True)
    in_memory = colbert_jax.Searcher(real_index, minilm_model, truncate=True)
    assert mapped.implementation == in_memory.implementation == "streamed"
    return mapped, in_memory


def assert_same(got, want):
    for qid in want.data:
        assert [p for p, _, _ in got[qid]] == [p for p, _, _ in want[qid]], qid
        np.testing.assert_allclose([s for *_, s in got[qid]], [s for *_, s in want[qid]], atol=1e-5)


@pytest.mark.parametrize("k", [10, 100])
def test_mmap_streamed_equals_in_memory(searchers, k):
    mapped, in_memory = searchers
    assert mapped.arrays.residuals is None and mapped.arrays.inv_norms is None
    # uint16 codes on the CPU in both (fewer than 65,536 partitions: the padding code P fits beside the ids)
    assert mapped.arrays.codes.dtype == in_memory.arrays.codes.dtype == np.uint16
    assert_same(mapped.search_all(QUERIES, k=k), in_memory.search_all(QUERIES, k=k))
    assert mapped.arrays.ivf is None  # read from disk, list by list
    assert_same(mapped.search_all(QUERIES[:1], k=k), in_memory.search_all(QUERIES[:1], k=k))  # batch 1: S passed
    allowed = in_memory.index.pids[::2]  # more than ndocs: a candidate filter inside stages 2-5
    assert_same(mapped.search_all(QUERIES, k=k, pids=allowed), in_memory.search_all(QUERIES, k=k, pids=allowed))


class _RowRecorder:
    """Wraps a `ChunkedMemmap`, recording the rows of every integer-array read."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []

    def __getitem__(self, index):
        if not isinstance(index, slice):
            self.rows.append(np.asarray(index).reshape(-1))
        return self.inner[index]

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_reads_only_the_survivors_rows(real_index, minilm_model):
    """With ndocs=64 each query keeps 16 survivors: the rows read are exactly the embeddings of the 16 passages
    that in-memory search ranks first at k=16 with the same settings (its stage 6 ranks all survivors)."""
    mapped = colbert_jax.Searcher(real_index, minilm_model, truncate=True, load_index_with_mmap=True)
    in_memory = colbert_jax.Searcher(real_index, minilm_model, truncate=True)
    settings = dict(ndocs=64, ncells=2, centroid_score_threshold=0.45)
    survivors = in_memory.search_all(QUERIES, k=16, **settings)
    ix = mapped.index
    recorder = _RowRecorder(ix.residuals)
    ix.__dict__["residuals"] = recorder
    try:
        got = mapped.search_all(QUERIES, k=5, **settings)
    finally:
        ix.__dict__["residuals"] = recorder.inner
    read = np.sort(np.concatenate(recorder.rows))
    positions = np.concatenate([ix.positions([p for p, _, _ in survivors[q]]) for q in survivors.data])
    expected = np.sort(np.concatenate([np.arange(ix.offsets[p], ix.offsets[p + 1]) for p in positions]))
    np.testing.assert_array_equal(read, expected)
    assert len(read) < ix.num_embeddings // 10
    assert_same(got, in_memory.search_all(QUERIES, k=5, **settings))


def test_gathered_pages_do_not_stay_resident(searchers):
    """Reading rows through the chunk files' memory maps would leave their pages in the process's resident
    set; `ChunkedMemmap` drops them after each gather."""
    mapped, _ = searchers
    residuals = mapped.index.residuals
    assert isinstance(residuals, ChunkedMemmap)
    mapped.search_all(QUERIES, k=10)
    assert residuals.resident_bytes() == 0
    rows = np.arange(0, len(residuals), 7)
    raw = residuals._maps[0][rows[rows < residuals.rows]].sum()  # the same rows through the bare map
    assert residuals.resident_bytes() > 0  # so the measure can see what a gather leaves behind
    assert residuals[rows].sum() >= raw
    assert residuals.resident_bytes() == 0
    np.testing.assert_array_equal(residuals[5:300], residuals[np.arange(5, 300)])  # pread slices, same rows


def test_three_shards_equal_one(real_index, minilm_checkpoint, searchers, tmp_path):
    """The memory-mapped index split over 3 (fake CPU) devices returns the in-memory single-device rankings."""
    _, in_memory = searchers
    out = tmp_path / "three.json"
    script = textwrap.dedent(f"""
        import os, json
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
        import colbert_jax
        s = colbert_jax.Searcher({str(real_index)!r}, checkpoint={str(minilm_checkpoint)!r}, truncate=True,
                                 load_index_with_mmap=True)
        assert s.mesh.size == 3 and s.implementation == "streamed"
        ranking = s.search_all({QUERIES!r}, k=10)
        json.dump([[(p, x) for p, _, x in r] for r in ranking.data.values()], open({str(out)!r}, "w"))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    sharded = json.loads(out.read_text())
    single = in_memory.search_all(QUERIES, k=10)
    for i, results in enumerate(sharded):
        assert [p for p, _ in results] == [p for p, _, _ in single[i]]
        np.testing.assert_allclose([x for _, x in results], [x for *_, x in single[i]], atol=1e-5)


def test_place_index_small_codes_without_ivf(real_index):
    """uint16 codes without the IVF's entries: the same codes and every other array as the default placement;
    a dtype too small for the partition ids is refused."""
    import jax

    from colbert_jax.index import Index
    from colbert_jax.search import placement
    from colbert_jax.search.arrays import AXIS

    ix = Index.open(real_index, mmap=True)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), (AXIS,))
    full, full_bounds = placement.place_index(ix, mesh, residuals=False)
    small, small_bounds = placement.place_index(ix, mesh, residuals=False, codes_dtype=np.uint16, ivf=False)
    present = {name for name, value in small.fields() if value is not None}
    assert {name for name, value in full.fields() if value is not None} - present == {"ivf", "ivf_offsets"}
    assert small.codes.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(small.codes), np.asarray(full.codes))
    for key in present - {"codes"}:
        np.testing.assert_array_equal(np.asarray(getattr(small, key)), np.asarray(getattr(full, key)), err_msg=key)
    np.testing.assert_array_equal(small_bounds[0], full_bounds[0])
    with pytest.raises(ValueError, match="cannot hold the ids"):
        placement.place_index(ix, mesh, residuals=False, codes_dtype=np.uint8)


def test_single_queries_reuse_one_scores_buffer(searchers):
    """One query at a time, stage 1 writes its centroid scores into the buffer the previous query left
    (donated): the same buffer every time, and each ranking still equal to in-memory search's."""
    mapped, in_memory = searchers
    pointers = []
    for query in QUERIES[:3]:
        assert_same(mapped.search_all([query], k=10), in_memory.search_all([query], k=10))
        pointers.append(mapped._plaid_engine()._mmap_scores.unsafe_buffer_pointer())
    assert pointers[1] == pointers[2]


def test_one_batch_at_a_time():
    """Stages 2-6 of two batches never overlap in a process (`search_all` keeps two batches in flight)."""
    import threading
    import time

    from colbert_jax.search import streamed_mmap

    inside, most = [0], [0]
    lock = threading.Lock()

    def work(batch):
        with streamed_mmap.one_batch_at_a_time(batch):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(b,)) for b in (1, 8, 1, 64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1


@pytest.mark.parametrize("native_readers", [True, False])
def test_padding_rows_holding_a_real_code_rank_alike(real_index, minilm_model, monkeypatch, native_readers):
    """An index of exactly 65,536 partitions places its codes as uint16 with padding rows holding 0, a real
    partition's id (`placement.padding_code`): every reader must mask padding rows before it reads a code. Here
    the padding code forced to 0 on the test index, in memory and memory-mapped, with stages 4-6 on the native
    kernels and on the jnp paths: the same rankings and scores as with P."""
    import jax

    from colbert_jax import native
    from colbert_jax.search import placement

    if not native_readers:
        monkeypatch.setattr(native, "enabled", lambda: False)  # traced anew below: the jnp readers
        jax.clear_caches()

    def rankings(mmap: bool) -> dict:
        s = colbert_jax.Searcher(real_index, minilm_model, truncate=True, load_index_with_mmap=mmap)
        assert s.arrays.codes.dtype == np.uint16
        padding = np.asarray(s.arrays.codes)[:, -1]  # each shard's last row is padding
        return {k: s.search_all(QUERIES, k=k) for k in (10, 100)}, padding

    try:
        for mmap in (False, True):
            want, padding = rankings(mmap)
            assert (padding == s_partitions(real_index)).all()
            with monkeypatch.context() as m:
                m.setattr(placement, "padding_code", lambda num_partitions, dtype: 0)
                got, padding = rankings(mmap)
            assert (padding == 0).all()
            for k in (10, 100):
                assert_same(got[k], want[k])
    finally:
        jax.clear_caches()  # no program traced with the jnp readers outlives the test


def s_partitions(path) -> int:
    from colbert_jax.index import Index

    return Index.open(path, verify=False).num_partitions
