"""Reranking: given candidates scored exactly, with and without an index (real text, tiny model)."""

import numpy as np
import pytest

import colbert_jax
from colbert_jax import cli

QUERIES = {"q1": "read a file line by line", "q2": "open a socket connection"}


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, tiny_model, small_collection):
    path = tmp_path_factory.mktemp("rerank") / "idx"
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, small_collection)
    return colbert_jax.Searcher(path, tiny_model)


def test_rerank_equals_exact_scores(searcher):
    everything = searcher.search_all(QUERIES, k=searcher.index.num_passages, exact=True)
    rng = np.random.default_rng(0)
    candidates = rng.choice(searcher.index.pids, 30, replace=False).tolist()
    for qid, query in QUERIES.items():
        exact = {p: s for p, _, s in everything[qid]}
        got = searcher.rerank(query, candidates + candidates[:3])  # repeats count once
        expected = sorted(candidates, key=lambda p: -exact[p])
        assert [p for p, _, _ in got] == expected and [r for _, r, _ in got] == list(range(1, 31))
        np.testing.assert_allclose([s for *_, s in got], [exact[p] for p in expected], atol=1e-5)
        assert searcher.rerank(query, candidates, k=5) == got[:5]
    with pytest.raises(KeyError, match="pid 99999 is not in the index"):
        searcher.rerank("x", [1, 99999])


def test_rerank_without_index_matches_index_order(searcher, tiny_model):
    ix = searcher.index
    pids = ix.pids[[5, 17, 40, 41, 200]].tolist()
    docs = ix.texts(ix.positions(pids))
    got = colbert_jax.rerank(tiny_model, QUERIES["q1"], docs)
    Q = tiny_model.encode_queries([QUERIES["q1"]])
    D, mask = tiny_model.encode_docs(docs)
    keep = tiny_model.doc_tokenizer.keep_mask(tiny_model.doc_tokenizer.tensorize(docs)[0])[:, : D.shape[1]]
    expected = np.asarray(colbert_jax.colbert_score(Q, D, mask & keep))  # the documented scorer, punctuation dropped
    assert [i for i, _ in got] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([s for _, s in got], np.sort(expected)[::-1], atol=1e-4)
    assert colbert_jax.rerank(tiny_model, QUERIES["q1"], docs, k=2) == got[:2]
    # the compressed index's scores rank the same documents closely
    by_index = searcher.rerank(QUERIES["q1"], pids)
    assert abs(by_index[0][2] - got[0][1]) < 0.5


def test_cli_rerank(tmp_path, searcher, capsys):
    queries = tmp_path / "q.tsv"
    queries.write_text("".join(f"{q}\t{t}\n" for q, t in QUERIES.items()))
    pids = searcher.index.pids[:12].tolist()
    run = tmp_path / "bm25.trec"
    run.write_text("".join(f"{q} Q0 {p} {r} {20 - r}.5 bm25\n" for q in QUERIES for r, p in enumerate(pids, 1)))
    out = tmp_path / "run.tsv"
    argv = ["rerank", "--index", str(searcher.index.path), "--run", str(run), "--queries", str(queries)]
    assert cli.main([*argv, "--k", "5", "--out", str(out)]) == 0
    ranking = colbert_jax.Ranking.load(out)
    for qid, query in QUERIES.items():
        expected = searcher.rerank(query, pids, k=5)
        assert [(p, r) for p, r, _ in ranking[qid]] == [(p, r) for p, r, _ in expected]
    run.write_text("q1\t3\n")
    assert cli.main([*argv, "--out", str(out)]) == 2
    assert "bm25.trec:1: expected" in capsys.readouterr().err


def test_cli_rerank_matches_zero_padded_qids(tmp_path, searcher):
    """The queries file's '001' is read as the integer 1 and the run's stays '001': the query was reported
    missing. They match as evaluate matches them, and the output keeps the run's qids."""
    queries = tmp_path / "q.tsv"
    queries.write_text("001\tread a file line by line\n")
    pids = searcher.index.pids[:6].tolist()
    run = tmp_path / "run.tsv"
    run.write_text("".join(f"001\t{p}\t{r}\n" for r, p in enumerate(pids, 1)))
    out = tmp_path / "out.tsv"
    argv = ["rerank", "--index", str(searcher.index.path), "--run", str(run), "--queries", str(queries)]
    assert cli.main([*argv, "--k", "3", "--out", str(out)]) == 0
    expected = searcher.rerank("read a file line by line", pids, k=3)
    assert out.read_text().splitlines() == [f"001\t{p}\t{r}\t{s}" for p, r, s in expected]
