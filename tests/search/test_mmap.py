"""Memory-mapped indexes (`load_index_with_mmap=True`): residuals stay on disk, results equal in-memory
search; `verify=False` opens without reading array data."""

import numpy as np
import pytest

import colbert_jax
from colbert_jax import io
from colbert_jax.index import ChunkedMemmap, CorruptIndexError

QUERIES = ["read a file line by line", "open a socket connection", "parse a date string", "abstract base class"]


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model, small_collection):
    path = tmp_path_factory.mktemp("mmap") / "idx"
    chunk = io.CHUNK_BYTES
    io.CHUNK_BYTES = 16 << 10  # many storage chunks per array, so reads cross chunk files
    try:
        colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, small_collection)
    finally:
        io.CHUNK_BYTES = chunk
    return path


def test_mmap_search_equals_in_memory(index, tiny_model):
    mapped = colbert_jax.Searcher(index, tiny_model, load_index_with_mmap=True)
    assert isinstance(mapped.index.residuals, ChunkedMemmap) and len(mapped.index.residuals._maps) == 3
    assert mapped.arrays.residuals is None and mapped.arrays.inv_norms is None  # nothing per embedding but codes
    in_memory = colbert_jax.Searcher(index, tiny_model, implementation="jnp")
    plain = colbert_jax.Index.open(index)
    np.testing.assert_array_equal(np.asarray(mapped.index.residuals), plain.residuals)
    np.testing.assert_array_equal(mapped.index.codes[::7], plain.codes[::7])
    assert mapped.search_all(QUERIES, k=10).data == in_memory.search_all(QUERIES, k=10).data
    exact = mapped.search_all(QUERIES, k=5, exact=True)  # numpy, in blocks of passages
    reference = in_memory.search_all(QUERIES, k=5, exact=True)  # the whole index decompressed on the device
    for q in range(len(QUERIES)):
        assert [p for p, _, _ in exact[q]] == [p for p, _, _ in reference[q]]
        np.testing.assert_allclose([s for *_, s in exact[q]], [s for *_, s in reference[q]], atol=1e-5)
    allowed = plain.pids[::3]
    assert mapped.search(QUERIES[0], k=5, pids=allowed) == in_memory.search(QUERIES[0], k=5, pids=allowed)


def test_verify_false_reads_no_array_data(tmp_path, index):
    import shutil

    path = tmp_path / "idx"
    shutil.copytree(index, path)
    chunk = sorted((path / "residuals" / "c").iterdir())[1] / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0xFF  # same size, different content
    chunk.write_bytes(bytes(data))
    colbert_jax.Index.open(path, verify=False, mmap=True)  # reads metadata and headers only
    with pytest.raises(CorruptIndexError, match="'residuals' is corrupt"):
        colbert_jax.Index.open(path)


def test_a_mapped_array_whose_files_an_update_removed(tmp_path, index):
    """Slices are read by path (pread): once an update removed the files of the version a reader opened, the
    read said FileNotFoundError about a chunk; it is an IndexChangedError (reload). Gathers read through the
    mappings, which keep the version's own bytes."""
    import shutil

    from colbert_jax.index import IndexChangedError

    path = tmp_path / "idx"
    shutil.copytree(index, path)
    residuals = ChunkedMemmap(path / "residuals")
    rows = residuals[np.arange(0, len(residuals), 5)]
    shutil.rmtree(path / "residuals")
    np.testing.assert_array_equal(residuals[np.arange(0, len(residuals), 5)], rows)
    with pytest.raises(IndexChangedError, match="was removed by an update"):
        residuals[0:10]
