"""colbert-ai indexes imported without torch rank exactly like colbert-ai (fixtures from the reference)."""

import json
import shutil

import numpy as np
import pytest

import colbert_jax
from colbert_jax.index import CorruptIndexError
from colbert_jax.indexing.collection import Collection
from colbert_jax.interop import read_colbert_codec
from colbert_jax.torch_io import load_torch_file
from tests.helpers import FIXTURES

INDEX_FIXTURES = FIXTURES.parent / "index"


@pytest.fixture(scope="module")
def rankings():
    return json.loads((INDEX_FIXTURES / "small_rankings.json").read_text())


@pytest.fixture(scope="module")
def ref_queries():
    return np.load(INDEX_FIXTURES / "small_queries.npz")["Q"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, minilm_checkpoint):
    out = {}
    for nbits in (1, 2, 4):
        dst = tmp_path_factory.mktemp("imported") / f"nbits{nbits}"
        colbert_jax.import_colbert_index(INDEX_FIXTURES / f"small_nbits{nbits}", dst, checkpoint=str(minilm_checkpoint))
        out[nbits] = dst
    return out


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_codec_is_bit_identical_to_colbert_ai(nbits):
    """Same embeddings + the reference's codec -> the reference's codes and packed residuals, exactly."""
    src = INDEX_FIXTURES / f"small_nbits{nbits}"
    embs = np.load(INDEX_FIXTURES / "small_embeddings.npz")["embs"]
    codec = read_colbert_codec(src)
    codes, residuals = codec.compress(embs)
    np.testing.assert_array_equal(codes, load_torch_file(src / "0.codes.pt"))
    np.testing.assert_array_equal(residuals, load_torch_file(src / "0.residuals.pt"))
    # Decompression is the reference's formula: normalize(C[code] + weights[bucket]).
    from pallas_kernels.decompress import unpack_bits

    d = codec.decompress(codes, residuals)
    v = codec.centroids[codes] + codec.bucket_weights[np.asarray(unpack_bits(residuals, nbits))]
    np.testing.assert_allclose(d, v / np.linalg.norm(v, axis=1, keepdims=True), atol=1e-6)
    cos = (d * embs.astype(np.float32)).sum(1)
    assert cos.mean() > {1: 0.9, 2: 0.95, 4: 0.98}[nbits]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_bucket_quantiles_equal_torch_quantile(n):
    from colbert_jax.indexing.codec import residual_buckets

    z = np.load(INDEX_FIXTURES / "quantiles.npz")
    for x, prefix in ((z["x"], ""), (z["y"], "y_")):
        cutoffs, weights = residual_buckets(x, n)
        np.testing.assert_array_equal(cutoffs, z[f"{prefix}cutoffs_{n}"])
        np.testing.assert_array_equal(weights, z[f"{prefix}weights_{n}"])


@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("k", [10, 100])
def test_imported_index_ranks_like_colbert_ai(imported, rankings, ref_queries, nbits, k):
    # float32 queries: scores are compared with colbert-ai's at float tolerance
    searcher = colbert_jax.Searcher(
        imported[nbits], allow_other_checkpoint=True, clamp_maxsim=True, query_quantization="none"
    )
    ours = searcher.search_all(list(ref_queries), k=k)
    ref = rankings[f"nbits{nbits}"]
    for i in range(len(ref_queries)):
        pids = [p for p, _, _ in ours[i]]
        scores = [s for _, _, s in ours[i]]
        assert pids == ref[f"k{k}"][i] or len(set(pids[:10]) & set(ref[f"k{k}"][i][:10])) >= 10
        np.testing.assert_allclose(scores, ref[f"k{k}_scores"][i], atol=1e-4)
        assert [r for _, r, _ in ours[i]] == list(range(1, len(pids) + 1))


def test_default_scoring_keeps_negative_maxima(imported, rankings, ref_queries):
    """Without the CPU clamp the ranking is the same; scores can only be lower (GPU semantics)."""
    ours = colbert_jax.Searcher(imported[2], allow_other_checkpoint=True).search_all(list(ref_queries), k=100)
    for i in range(len(ref_queries)):
        ref = dict(zip(rankings["nbits2"]["k100"][i], rankings["nbits2"]["k100_scores"][i]))
        assert {p for p, _, _ in ours[i][:10]} == set(rankings["nbits2"]["k100"][i][:10])
        assert all(s <= ref[p] + 1e-4 for p, _, s in ours[i])


def test_imported_index_checks_and_text_queries(imported, minilm_checkpoint, rankings, tmp_path):
    index = colbert_jax.Index.open(imported[2])
    assert (index.num_passages, index.num_embeddings, index.num_partitions) == (100, 4417, 1024)
    # Encoding the query text ourselves gives the reference's ranking too.
    searcher = colbert_jax.Searcher(imported[2], checkpoint=minilm_checkpoint, allow_other_checkpoint=True)
    top = [p for p, _, _ in searcher.search(rankings["queries"][1], k=10)]
    assert len(set(top) & set(rankings["nbits2"]["k10"][1])) >= 9
    # A damaged reference index is refused with the part named.
    broken = shutil.copytree(INDEX_FIXTURES / "small_nbits2", tmp_path / "broken")
    (broken / "0.codes.pt").write_bytes((broken / "0.codes.pt").read_bytes()[:100])
    with pytest.raises(CorruptIndexError, match="0.codes.pt"):
        colbert_jax.import_colbert_index(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Chunk metadata that disagrees with the doclens (a chunk cut short, passages shifted) is refused too.
    shifted = shutil.copytree(INDEX_FIXTURES / "small_nbits2", tmp_path / "shifted")
    meta = json.loads((shifted / "0.metadata.json").read_text())
    (shifted / "0.metadata.json").write_text(json.dumps({**meta, "num_passages": 90}))
    with pytest.raises(CorruptIndexError, match="0.metadata.json: num_passages is 90, doclens.0.json"):
        colbert_jax.import_colbert_index(shifted, tmp_path / "out")
    (shifted / "0.metadata.json").write_text(json.dumps(meta))
    (shifted / "ivf.pid.pt").unlink()
    with pytest.warns(UserWarning, match="has no ivf.pid.pt"):
        colbert_jax.import_colbert_index(shifted, tmp_path / "out")
    with pytest.raises(FileExistsError):
        colbert_jax.import_colbert_index(INDEX_FIXTURES / "small_nbits2", imported[2])


def test_our_index_with_the_reference_centroids_has_its_codes(tmp_path, minilm_model):
    """Encoding with our encoder and compressing with colbert-ai's centroids reproduces its codes."""
    path = tmp_path / "ours"
    colbert_jax.Indexer(minilm_model, nbits=2, centroids=INDEX_FIXTURES / "small_nbits2", show_progress=False).index(
        path, FIXTURES.parents[1] / "collections" / "stdlib_100.tsv"
    )
    ours = colbert_jax.Index.open(path)
    ref_codes = load_torch_file(INDEX_FIXTURES / "small_nbits2" / "0.codes.pt")
    np.testing.assert_array_equal(
        ours.doclens, json.loads((INDEX_FIXTURES / "small_nbits2" / "doclens.0.json").read_text())
    )
    np.testing.assert_array_equal(ours.codes, ref_codes)


def test_an_imported_index_with_updates_gives_texts_by_pid(imported, minilm_checkpoint, tmp_path):
    """An imported index carries no texts, so adds do not store theirs either (compaction dropped them) and
    say so; texts come from the collection, by pid (by position, a delete then an add gave other passages')."""
    path = shutil.copytree(imported[2], tmp_path / "idx")
    small = (FIXTURES.parents[1] / "collections" / "stdlib_100.tsv").read_text().splitlines(keepends=True)
    indexer = colbert_jax.Indexer(colbert_jax.load_checkpoint(minilm_checkpoint), show_progress=False)
    indexer.delete(path, [3])
    with pytest.warns(UserWarning, match="the 1 added passages' texts are not stored in it either"):
        (new,) = indexer.add(path, ["An added passage about the tempfile module."])
    assert not colbert_jax.Index.open(path).has_texts and not list(path.glob("segments/*/texts"))
    grown = tmp_path / "grown.tsv"
    grown.write_text("".join(small) + f"{new}\tAn added passage about the tempfile module.\n")
    searcher = colbert_jax.Searcher(path, checkpoint=minilm_checkpoint, allow_other_checkpoint=True)
    original = FIXTURES.parents[1] / "collections" / "stdlib_100.tsv"
    expected = [*Collection.load(original).texts([4, 5]), "An added passage about the tempfile module."]
    assert searcher.passages([4, 5, new], collection=grown) == expected
    with pytest.raises(ValueError, match=f"lacks pid {new}"):
        searcher.passages([4], collection=original)
