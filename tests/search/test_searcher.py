"""Searcher: batching, sharding, kernels, exact search, outputs and bad inputs."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import colbert_jax
from colbert_jax.config import ColBERTConfig
from colbert_jax.search.searcher import QueryError, QueryTruncatedWarning, search_params
from tests.conftest import COLLECTIONS
from tests.helpers import assert_same_ranking_up_to_ties

QUERIES = [line.split("\t")[1] for line in (COLLECTIONS / "queries_2k.tsv").read_text().splitlines()[:40]]


@pytest.fixture(scope="module")
def searcher(real_index, minilm_model):
    return colbert_jax.Searcher(real_index, checkpoint=minilm_model, truncate=True)


def assert_same(a, b, qids=None):
    """Same pids in the same order for every query (but for near-ties); scores equal up to float noise."""
    for q in qids if qids is not None else a.data:
        assert_same_ranking_up_to_ties(a[q], b[q], atol=1e-3)


def test_default_params_by_k_are_per_call():
    c = ColBERTConfig()
    assert search_params(10, c) == (1, 0.5, 256)
    assert search_params(11, c) == (2, 0.45, 1024) and search_params(100, c) == (2, 0.45, 1024)
    assert search_params(101, c) == (4, 0.4, 4096) and search_params(2000, c) == (4, 0.4, 8000)
    assert search_params(10, c.replace(ncells=3, ndocs=64)) == (3, 0.5, 64)


def test_batched_equals_one_by_one(searcher):
    batched = searcher.search_all(QUERIES, k=10)
    for i in range(0, len(QUERIES), 7):
        single = searcher.search(QUERIES[i], k=10)
        assert [p for p, _, _ in single] == [p for p, _, _ in batched[i]]
        np.testing.assert_allclose([s for *_, s in single], [s for *_, s in batched[i]], atol=1e-4)
    uneven = searcher.search_all(QUERIES[:13], k=10, batch_size=4)  # several batches and a padded one
    assert_same(uneven, batched, range(13))


def test_k_values_and_sticky_quirk_not_copied(searcher):
    r100 = searcher.search(QUERIES[0], k=100)
    r10 = searcher.search(QUERIES[0], k=10)
    assert len(r100) == 100 and len(r10) == 10
    assert [r for _, r, _ in r100] == list(range(1, 101))
    assert searcher.search(QUERIES[0], k=1000)[:1][0][0] == r10[0][0]  # k > 100 uses its own defaults


@pytest.mark.parametrize("implementation", ["jnp", "pallas"])
def test_implementations_give_the_same_ranking(real_index, minilm_model, searcher, implementation):
    """The default (streamed, on CPU) and the staged paths (packed jnp; Pallas kernels in interpret mode)."""
    assert searcher.implementation == "streamed"
    other = colbert_jax.Searcher(real_index, checkpoint=minilm_model, implementation=implementation, truncate=True)
    n = 6 if implementation == "pallas" else 40
    for k in (10, 100):
        assert_same(searcher.search_all(QUERIES[:n], k=k), other.search_all(QUERIES[:n], k=k))


def test_exact_search(searcher):
    exact = searcher.search_all(QUERIES[:20], k=10, exact=True)
    plaid = searcher.search_all(QUERIES[:20], k=10)
    overlap = np.mean([len({p for p, _, _ in exact[q]} & {p for p, _, _ in plaid[q]}) / 10 for q in range(20)])
    assert overlap > 0.6  # PLAID approximates exact search over the same (decompressed) embeddings
    for q in range(20):  # exact scores are upper bounds of what PLAID reports for the same passage
        best = exact[q][0][2]
        assert all(s <= best + 1e-4 for _, _, s in plaid[q])


def test_ranking_save_load(searcher, tmp_path):
    ranking = searcher.search_all({"q1": QUERIES[0], "q2": QUERIES[1]}, k=5)
    path = ranking.save(tmp_path / "run.tsv")
    lines = path.read_text().splitlines()
    assert len(lines) == 10 and lines[0].split("\t")[:3] == ["q1", str(ranking["q1"][0][0]), "1"]
    assert json.loads((tmp_path / "run.tsv.meta").read_text())["k"] == 5
    loaded = colbert_jax.Ranking.load(path)
    assert list(loaded) == [(q, p, r, pytest.approx(s)) for q, p, r, s in ranking]
    assert len(list(ranking)) == len(ranking) == 10


def test_ranking_files_keep_queries_apart(tmp_path):
    """Integer qids are read as integers: '1' and '001' became one query, their hits mixed. Both ways refused,
    as is a qid a TSV line cannot hold."""
    path = tmp_path / "run.tsv"
    path.write_text("1\t5\t1\t2.0\n001\t6\t1\t1.0\n")
    with pytest.raises(ValueError, match="qids '1' and '001' are the same integer 1"):
        colbert_jax.Ranking.load(path)
    with pytest.raises(ValueError, match="qids 1 and '1' are written alike"):
        colbert_jax.Ranking({1: [(5, 1, 2.0)], "1": [(6, 1, 1.0)]}).save(path)
    with pytest.raises(ValueError, match="holds a tab or line break"):
        colbert_jax.Ranking({"a\tb": [(5, 1, 2.0)]}).save(path)
    assert path.read_text() == "1\t5\t1\t2.0\n001\t6\t1\t1.0\n"  # untouched


def test_pids_and_batch_sizes_that_are_not_integers_are_refused(searcher):
    """A float pid was cut to an integer (17.9 searched pid 17, True pid 1): another passage. Refused, as
    Index.positions and Indexer.delete refuse them; batch_size 0 or -1 failed deep in the search."""
    pids = searcher.index.pids[:8].tolist()
    for bad in ([float(pids[0])], [True], [str(pids[0])], np.array(pids, np.float64), str(pids[0])):
        with pytest.raises(TypeError, match="must be"):
            searcher.search_all([QUERIES[0]], k=3, pids=bad)
    with pytest.raises(TypeError, match="must be integers"):
        searcher.search_all({0: QUERIES[0]}, k=3, pids={0: [0.5]})
    with pytest.raises(TypeError, match="candidates of query 0 must be integers"):
        searcher.rerank(QUERIES[0], [pids[0], 3.2])
    with pytest.raises(TypeError, match="must be integers"):
        searcher.passages([1.0])
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            searcher.search_all([QUERIES[0]], k=3, batch_size=bad)
    assert [p for p, _, _ in searcher.search_all([QUERIES[0]], k=3, pids=np.array(pids))[0]] == [
        p for p, _, _ in searcher.search(QUERIES[0], k=3, pids=pids)
    ]


def test_pids_are_the_collections_own(tmp_path, tiny_model):
    rows = [{"id": 1000 + 7 * i, "text": f"passage number {i} about topic {i % 5}"} for i in range(40)]
    coll = tmp_path / "c.jsonl"
    coll.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = tmp_path / "idx"
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, coll)
    results = colbert_jax.Searcher(path, checkpoint=tiny_model).search("passage number 3 about topic 3", k=40)
    assert {p for p, _, _ in results} <= {r["id"] for r in rows} and len(results) > 0
    index = colbert_jax.Index.open(path)
    np.testing.assert_allclose(index.embeddings(1007), index.embeddings([1007])[0])
    with pytest.raises(KeyError, match="pid 5 is not in the index"):
        index.embeddings(5)


def test_bad_inputs(real_index, tiny_model, minilm_model):
    searcher = colbert_jax.Searcher(real_index, checkpoint=minilm_model)
    with pytest.raises(QueryError, match="query 0 is empty"):
        searcher.search("   ")
    with pytest.raises(QueryError, match="query 1 has no tokens"):  # searched the markers alone before
        searcher.search_all(["fine", "\x00\x07"])
    for k in (0, -3):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            searcher.search("fine", k=k)
    with pytest.raises(ValueError, match="exceeds the number of passages"):
        searcher.search("fine", k=2001)
    long_query = " ".join(["word"] * 40)
    strict = colbert_jax.Searcher(real_index, checkpoint=minilm_model, truncate=False)
    with pytest.raises(QueryError, match="has 40 tokens; query_maxlen=32 allows 29"):
        strict.search(long_query)
    # the default cuts long queries as colbert-ai does, with one warning per call that counts them
    with pytest.warns(QueryTruncatedWarning, match="2 of 3 queries are longer") as caught:
        ranking = searcher.search_all([long_query, "fine", long_query + " more"], k=3)
    assert len(caught) == 1 and [len(r) for r in ranking.data.values()] == [3, 3, 3]
    cut = searcher.search(" ".join(["word"] * 29), k=3)  # the cut query's results (another batch: float noise)
    assert [r[:2] for r in ranking.data[0]] == [r[:2] for r in cut]
    np.testing.assert_allclose([r[2] for r in ranking.data[0]], [r[2] for r in cut], rtol=1e-5)
    with pytest.raises(QueryError, match="longer than query_maxlen=32"):
        searcher.search(np.zeros((33, 128), np.float32))
    with pytest.raises(QueryError, match="must be \\[query_maxlen, 128\\]"):
        searcher.search(np.zeros((32, 64), np.float32))
    with pytest.raises(QueryError, match="must be a str or an array"):
        searcher.search_all([1, 2])
    with pytest.raises(ValueError, match="dim 16 but the index was built with dim 128"):
        colbert_jax.Searcher(real_index, checkpoint=tiny_model)
    other = minilm_model.replace_config(doc_maxlen=64)
    other._fingerprint = "0" * 64
    with pytest.raises(ValueError, match="not the one that built the index"):
        colbert_jax.Searcher(real_index, checkpoint=other)


def test_pre_encoded_queries(searcher, minilm_model):
    Q = minilm_model.encode_queries(QUERIES[:3])
    from_text = searcher.search_all(QUERIES[:3], k=10)
    from_arrays = searcher.search_all({i: Q[i] for i in range(3)}, k=10)
    assert_same(from_text, from_arrays)


def test_eight_shards_equal_one(real_index, searcher, minilm_checkpoint, tmp_path):
    """The index split over 8 (fake CPU) devices returns the single-device rankings."""
    out = tmp_path / "eight.json"
    script = textwrap.dedent(f"""
        import os, json
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        import jax, colbert_jax
        assert len(jax.devices()) == 8
        s = colbert_jax.Searcher({str(real_index)!r}, checkpoint={str(minilm_checkpoint)!r}, truncate=True)
        assert s.mesh.size == 8
        from colbert_jax.search import plaid
        # each k twice: the first batch by the two programs, the second by search_fused (stages 1-6 in one)
        result = {{f"{{k}}-{{i}}": [[(p, s_) for p, _, s_ in r] for r in s.search_all({QUERIES!r}, k=k).data.values()]
                  for k in (10, 100) for i in range(2)}}
        assert plaid.search_fused._cache_size() > 0
        json.dump(result, open({str(out)!r}, "w"))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    sharded = json.loads(out.read_text())
    for k, run in [(10, 0), (10, 1), (100, 0), (100, 1)]:
        single = searcher.search_all(QUERIES, k=k)
        for i, results in enumerate(sharded[f"{k}-{run}"]):
            # eight shards sum a passage's token scores in another order: a near-tie may swap
            ranked = [(p, rank, s) for rank, (p, s) in enumerate(results, 1)]
            assert_same_ranking_up_to_ties(ranked, single[i], atol=1e-4)


@pytest.mark.parametrize("num_centroids", [4096, 1000, 256])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_top_cells_equals_top_k(num_centroids, n):
    """The blocked top-cells selection picks the same centroids as a plain top_k over all of them, including
    sizes that take the fallback (not a multiple of the block, or too few blocks)."""
    import jax

    from colbert_jax.search.candidates import top_cells

    rng = np.random.default_rng(num_centroids + n)
    S = rng.standard_normal((num_centroids, 32)).astype(np.float32)
    S[rng.integers(0, num_centroids, 5)] += 3.0  # a few centroids that win for every token
    got = np.sort(np.asarray(jax.jit(top_cells, static_argnums=1)(S, n)), axis=1)
    want = np.sort(np.asarray(jax.lax.top_k(S.T, n)[1]), axis=1)
    np.testing.assert_array_equal(got, want)


def test_warm_up_compiles_every_program_later_batches_need(real_index, minilm_model):
    """After warm_up, batches of every size up to max_batch, of other queries, compile nothing new."""
    from colbert_jax.search import plaid

    searcher = colbert_jax.Searcher(real_index, checkpoint=minilm_model, truncate=True)
    searcher.warm_up(QUERIES[:8], k=100, max_batch=8)
    programs = (
        plaid.cells._cache_size(),
        plaid.search_streamed._cache_size(),
        plaid.search_fused._cache_size(),
        minilm_model._query_fn._cache_size(),
    )
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 5, 8, 1, 4, 7):
        batch = [QUERIES[i] for i in rng.choice(np.arange(8, len(QUERIES)), size, replace=False)]
        assert len(searcher.search_all(batch, k=100, batch_size=8)[0]) == 100
    assert (
        plaid.cells._cache_size(),
        plaid.search_streamed._cache_size(),
        plaid.search_fused._cache_size(),
        minilm_model._query_fn._cache_size(),
    ) == programs
    with pytest.raises(QueryError, match="at least one query"):
        searcher.warm_up([], k=10)
