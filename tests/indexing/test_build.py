"""Index builds: real text within the codec's error, resume, atomic overwrite, corruption, devices."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import colbert_jax
from colbert_jax.index import ARRAYS, CorruptIndexError
from colbert_jax.indexing.collection import Collection, CollectionError
from colbert_jax.indexing.encode import encode_passages


def arrays_of(path):
    index = colbert_jax.Index.open(path)
    return {name: index._array(name) for name in ARRAYS}


def assert_same_index(a, b):
    ia, ib = arrays_of(a), arrays_of(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(ia[name], ib[name], err_msg=name)
    ma, mb = (json.loads((p / "metadata.json").read_text()) for p in (a, b))
    for key in ("num_passages", "num_embeddings", "num_partitions", "config", "checkpoint", "collection"):
        assert ma[key] == mb[key], key
    assert {k: v["sha256"] for k, v in ma["arrays"].items()} == {k: v["sha256"] for k, v in mb["arrays"].items()}


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, tiny_model, small_collection):
    path = tmp_path_factory.mktemp("tiny_index") / "idx"
    indexer = colbert_jax.Indexer(tiny_model, nbits=2, chunksize=64, show_progress=False)
    indexer.index(path, small_collection)
    return path, indexer.stats


def test_real_index_within_codec_error(real_index, minilm_model):
    index = colbert_jax.Index.open(real_index)
    assert (index.num_passages, index.nbits, index.dim) == (2000, 2, 128)
    coll = Collection.load(index.metadata["collection"]["source"])
    texts = coll.texts(range(len(coll)))
    flat = np.concatenate(encode_passages(minilm_model, texts))  # the index's canonical batches
    model_flat, doclens = minilm_model.encode_docs_flat(texts)  # length-sorted batches: float noise apart
    np.testing.assert_allclose(flat, model_flat, atol=2e-5)
    np.testing.assert_array_equal(index.doclens, doclens)
    assert index.num_embeddings == len(flat) and index.num_partitions == 4096  # 2^floor(log2(16 sqrt(~84k)))

    codec = index.codec
    e = flat.astype(np.float16).astype(np.float32)
    codes = index.codes
    # Each code is the nearest centroid (up to float32 rounding of the scores).
    scores = e @ codec.centroids.T
    assert (scores[np.arange(len(e)), codes] >= scores.max(1) - 1e-5).all()
    # Each residual coordinate lies in the interval of its stored bucket.
    from pallas_kernels.decompress import unpack_bits

    buckets = np.asarray(unpack_bits(index.residuals, 2)).astype(int)
    r = e - codec.centroids[codes]
    edges = np.concatenate([[-np.inf], codec.bucket_cutoffs, [np.inf]])
    assert ((r > edges[buckets]) & (r <= edges[buckets + 1])).all()
    # Decompressed vectors stay close to the originals.
    decompressed = codec.decompress(codes, index.residuals)
    cos = (decompressed * flat).sum(1)
    print(f"nbits=2 reconstruction: mean cos {cos.mean():.4f}, min {cos.min():.4f}")
    assert cos.mean() > 0.93 and cos.min() > 0.6
    first = index.embeddings(int(index.pids[7]))
    np.testing.assert_allclose(first, decompressed[index.offsets[7] : index.offsets[8]], atol=1e-6)


def test_codec_error_shrinks_with_nbits(real_index, minilm_model):
    from colbert_jax.indexing.codec import ResidualCodec

    index = colbert_jax.Index.open(real_index)
    flat = index.codec.decompress(index.codes[:20000], index.residuals[:20000])  # realistic vectors
    heldout, test = flat[:5000], flat[5000:]
    cos = {}
    for nbits in (1, 2, 4):
        codec = ResidualCodec.train(index.codec.centroids, heldout, nbits)
        codes, residuals = codec.compress(test)
        assert residuals.shape == (len(test), 128 * nbits // 8) and residuals.dtype == np.uint8
        cos[nbits] = float((codec.decompress(codes, residuals) * test).sum(1).mean())
    print("mean cos by nbits:", cos)
    assert cos[1] < cos[2] < cos[4] and cos[1] > 0.85 and cos[4] > 0.98


def test_small_corpus_is_encoded_once(tiny_index):
    _, stats = tiny_index
    assert stats["passages_encoded"] == 300  # the k-means sample is every passage and is reused
    assert stats["chunks_encoded"] == 5


def test_interrupt_and_resume_equals_uninterrupted(tmp_path, tiny_model, tiny_index, small_collection):
    class Interrupted(Exception):
        pass

    class FailingCollection(Collection):
        def texts(self, indices):
            if len(indices) and min(indices) >= 128 and max(indices) < 192:  # chunk 2's own passages
                raise Interrupted("simulated crash in chunk 2")
            return super().texts(indices)

    coll = Collection.load(small_collection)
    failing = FailingCollection(
        coll.pids, path=coll.path, offsets=coll._offsets, fmt="tsv", fingerprint=coll.fingerprint
    )
    path = tmp_path / "idx"
    indexer = colbert_jax.Indexer(tiny_model, nbits=2, chunksize=64, show_progress=False)
    # The k-means sample covers every passage here, so chunks reuse it: make chunk 2 re-read its text.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("colbert_jax.indexing.kmeans.sample_size", lambda n: 100)
        with pytest.raises(Interrupted):
            indexer.index(path, failing)
        assert not path.exists() and (tmp_path / ".idx.partial" / "chunks" / "1.json").is_file()
        indexer.index(path, small_collection)
        assert indexer.stats["chunks_reused"] == 2 and indexer.stats["chunks_encoded"] == 3
        assert not (tmp_path / ".idx.partial").exists()
        fresh = tmp_path / "fresh"
        colbert_jax.Indexer(tiny_model, nbits=2, chunksize=64, show_progress=False).index(fresh, small_collection)
    assert_same_index(path, fresh)


def test_interrupted_sampling_resumes_from_its_saved_pieces(tmp_path, tiny_model, small_collection):
    """The k-means sample is every passage here: an interrupt during its encoding loses at most one piece."""

    class Interrupted(Exception):
        pass

    class FailingCollection(Collection):
        def texts(self, indices):
            if len(indices) and min(indices) >= 128:
                raise Interrupted("simulated Ctrl-C while encoding the sample")
            return super().texts(indices)

    coll = Collection.load(small_collection)
    failing = FailingCollection(
        coll.pids, path=coll.path, offsets=coll._offsets, fmt="tsv", fingerprint=coll.fingerprint
    )
    path = tmp_path / "idx"
    with pytest.raises(Interrupted):
        colbert_jax.Indexer(tiny_model, nbits=2, chunksize=64, show_progress=False).index(path, failing)
    pieces = tmp_path / ".idx.partial" / "sample"
    assert sorted(p.name for p in pieces.glob("*.json")) == ["0.json", "1.json"]
    resumed = colbert_jax.Indexer(tiny_model, nbits=2, chunksize=64, show_progress=False)
    resumed.index(path, small_collection)
    assert resumed.stats["passages_encoded"] == 300 - 128  # the two saved pieces were not encoded again
    fresh = tmp_path / "fresh"
    colbert_jax.Indexer(tiny_model, nbits=2, chunksize=64, show_progress=False).index(fresh, small_collection)
    assert_same_index(path, fresh)


def test_index_carries_its_passages(tmp_path, tiny_model, tiny_index, small_collection):
    index = colbert_jax.Index.open(tiny_index[0])
    coll = Collection.load(small_collection)
    assert index.has_texts
    assert index.texts(range(300)) == coll.texts(range(300))
    assert index.texts([299, 0, 5]) == coll.texts([299, 0, 5])
    listed = ["a café in Zürich", "naïve 日本語 text", "plain ascii"]
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(tmp_path / "list", listed)
    assert colbert_jax.Index.open(tmp_path / "list").texts([2, 0, 1]) == [listed[2], listed[0], listed[1]]
    searcher = colbert_jax.Searcher(tmp_path / "list", checkpoint=tiny_model)
    assert searcher.passages([1]) == [listed[1]]  # served from the index, whatever it was built from


def test_index_path_with_dotdot(tmp_path, monkeypatch, tiny_model):
    """A relative path through ".." (which TensorStore's file driver refuses as given) builds and opens."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    texts = ["one passage about cats", "another about dogs", "a third on birds"]
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index("../dotdot", texts)
    assert colbert_jax.Index.open("../dotdot").texts([2]) == [texts[2]]
    assert colbert_jax.Searcher("../dotdot", checkpoint=tiny_model).search("cats", k=1)


def test_overwrite_never_replaces_what_is_not_an_index(tmp_path, tiny_model, tiny_index, small_collection):
    indexer = colbert_jax.Indexer(tiny_model, nbits=2, chunksize=64, show_progress=False)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("four years of work")
    afile = tmp_path / "afile"
    afile.write_text("notes")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"not a colbert-jax index \(it holds thesis.txt\)"):
            indexer.index(precious, small_collection, overwrite=overwrite)
        with pytest.raises(FileExistsError, match="is a file"):
            indexer.index(afile, small_collection, overwrite=overwrite)
    link = tmp_path / "link"
    link.symlink_to(tiny_index[0])
    with pytest.raises(FileExistsError, match="symbolic link"):
        indexer.index(link, small_collection, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "four years of work" and afile.read_text() == "notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "link", "precious"]  # nothing hidden left
    (tmp_path / "empty").mkdir()
    indexer.index(tmp_path / "empty", ["an empty directory is fine", "as a target"])
    assert colbert_jax.Index.open(tmp_path / "empty").num_passages == 2
    # the build's own work directory is never taken from the user either
    (tmp_path / ".new.partial").mkdir()
    (tmp_path / ".new.partial" / "diary.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="diary.txt"):
        indexer.index(tmp_path / "new", small_collection)
    assert (tmp_path / ".new.partial" / "diary.txt").read_text() == "mine"


def test_existing_index_is_kept_unless_overwrite(tmp_path, tiny_model, tiny_index, small_collection):
    path = tmp_path / "idx"
    shutil.copytree(tiny_index[0], path)
    indexer = colbert_jax.Indexer(tiny_model, nbits=2, chunksize=64, show_progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        indexer.index(path, small_collection)
    with pytest.raises(CollectionError):  # a failing rebuild leaves the old index intact
        indexer.index(path, ["fine", ""], overwrite=True)
    assert_same_index(path, tiny_index[0])
    indexer.index(path, ["one passage here", "and another one"], overwrite=True)
    assert colbert_jax.Index.open(path).num_passages == 2


def test_corruption_is_detected(tmp_path, tiny_index):
    def fresh_copy(name):
        dst = tmp_path / name
        shutil.copytree(tiny_index[0], dst)
        return dst

    def chunk_file(idx, array):
        return next(p for p in sorted((idx / array).rglob("*")) if p.is_file() and p.name != "zarr.json")

    truncated = fresh_copy("truncated")
    f = chunk_file(truncated, "residuals")
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CorruptIndexError, match="'residuals' is corrupt"):
        colbert_jax.Index.open(truncated)

    edited = fresh_copy("edited")
    f = chunk_file(edited, "codes")
    data = bytearray(f.read_bytes())
    data[5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptIndexError, match="'codes' is corrupt"):
        colbert_jax.Index.open(edited)

    missing = fresh_copy("missing")
    shutil.rmtree(missing / "ivf")
    with pytest.raises(CorruptIndexError, match="array 'ivf' is missing"):
        colbert_jax.Index.open(missing)

    no_meta = fresh_copy("no_meta")
    (no_meta / "metadata.json").unlink()
    with pytest.raises(CorruptIndexError, match="missing metadata.json"):
        colbert_jax.Index.open(no_meta)
    with pytest.raises(FileNotFoundError):
        colbert_jax.Index.open(tmp_path / "nowhere")


def test_codec_reuse_gives_identical_codes(tmp_path, tiny_model, tiny_index, small_collection):
    """Given another index's codec (or just its centroids), the same data gets the same codes."""
    path = tmp_path / "reused"
    indexer = colbert_jax.Indexer(tiny_model, codec=tiny_index[0], chunksize=64, show_progress=False)
    indexer.index(path, small_collection)
    assert "sample_seconds" not in indexer.stats  # no sampling, no k-means
    a, b = arrays_of(path), arrays_of(tiny_index[0])
    for name in ("codes", "residuals", "centroids", "bucket_weights", "ivf"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    path2 = tmp_path / "centroids_only"
    colbert_jax.Indexer(tiny_model, nbits=2, centroids=tiny_index[0], chunksize=64, show_progress=False).index(
        path2, small_collection
    )
    np.testing.assert_array_equal(arrays_of(path2)["codes"], b["codes"])


def test_bad_inputs(tmp_path, tiny_model, tiny_index):
    indexer = colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False)
    bad = tmp_path / "bad.tsv"
    bad.write_text("0\tfine\n1\tok\n1\tagain\n")
    with pytest.raises(CollectionError, match="bad.tsv:3: duplicate pid 1"):
        indexer.index(tmp_path / "a", bad)
    bad.write_text("0\tfine\nnot-a-pid\tx\n")
    with pytest.raises(CollectionError, match="bad.tsv:2: pid must be an integer"):
        indexer.index(tmp_path / "a", bad)
    with pytest.raises(CollectionError, match="empty"):
        indexer.index(tmp_path / "a", [])
    with pytest.raises(CollectionError, match="not found"):
        indexer.index(tmp_path / "a", tmp_path / "nope.tsv")
    with pytest.raises(ValueError, match="centroids have dim 8, the checkpoint's dim is 16"):
        colbert_jax.Indexer(tiny_model, centroids=np.ones((4, 8), np.float32))
    with pytest.raises(ValueError, match="conflicts"):
        colbert_jax.Indexer(tiny_model, nbits=1, codec=tiny_index[0])
    assert not (tmp_path / "a").exists()


def test_eight_devices_build_the_same_index(tmp_path, tiny_checkpoint, tiny_index, small_collection):
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, colbert_jax
        assert len(jax.devices()) == 8
        ix = colbert_jax.Indexer({str(tiny_checkpoint)!r}, nbits=2, chunksize=64, show_progress=False)
        assert ix.model.n_devices == 8
        ix.index({str(tmp_path / "eight")!r}, {str(small_collection)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    a, b = arrays_of(tmp_path / "eight"), arrays_of(tiny_index[0])
    np.testing.assert_array_equal(a["doclens"], b["doclens"])
    same_codes = (a["codes"] == b["codes"]).mean()
    same_bytes = (a["residuals"] == b["residuals"]).mean()
    print(f"8 devices vs 1: codes equal {same_codes:.5f}, residual bytes equal {same_bytes:.5f}")
    assert same_codes == 1.0 and same_bytes == 1.0
