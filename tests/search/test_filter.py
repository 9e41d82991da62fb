"""Filtered search (`pids=allowed`): small sets scored exactly (= brute force), large sets filtered inside
candidate generation (= PLAID over an index of only those passages). Real text, tiny model."""

import json
from pathlib import Path

import numpy as np
import pytest

import colbert_jax

QUERIES = ["read a file line by line", "open a socket connection", "parse a date string", "abstract base class"]


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model, small_collection):
    path = tmp_path_factory.mktemp("filter") / "idx"
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, small_collection)
    return path


@pytest.fixture(scope="module")
def searcher(index, tiny_model):
    return colbert_jax.Searcher(index, tiny_model)


@pytest.fixture(scope="module")
def brute(searcher):
    """Exact MaxSim of every query against every passage: {query: {pid: score}}."""
    n = searcher.index.num_passages
    ranking = searcher.search_all(QUERIES, k=n, exact=True)
    return {i: {p: s for p, _, s in ranking[i]} for i in range(len(QUERIES))}


def expected_top(scores: dict[int, float], allowed, k: int):
    ranked = sorted(((scores[p], p) for p in allowed), key=lambda x: -x[0])[:k]
    return [p for _, p in ranked], [s for s, _ in ranked]


def assert_ranking(got, pids, scores):
    assert [p for p, _, _ in got] == pids
    assert [r for _, r, _ in got] == list(range(1, len(pids) + 1))
    np.testing.assert_allclose([s for *_, s in got], scores, atol=1e-5)


@pytest.mark.parametrize("size", [3, 40, 250])
def test_small_sets_and_exact_equal_brute_force(searcher, brute, size):
    rng = np.random.default_rng(size)
    allowed = rng.choice(searcher.index.pids, size, replace=False).tolist()
    k = 10
    ranking = searcher.search_all(QUERIES, k=k, pids=allowed)  # <= ndocs (256 at k=10): all scored exactly
    exact = searcher.search_all(QUERIES, k=k, pids=set(allowed), exact=True)
    for q in range(len(QUERIES)):
        pids, scores = expected_top(brute[q], allowed, k)
        assert len(pids) == min(k, size)  # k results whenever the set holds k passages
        assert_ranking(ranking[q], pids, scores)
        assert_ranking(exact[q], pids, scores)
    one = searcher.search(QUERIES[0], k=5, pids=np.array(allowed))
    assert_ranking(one, [p for p, _, _ in ranking[0][:5]], [s for *_, s in ranking[0][:5]])


def test_large_set_filters_candidates_like_a_smaller_index(tmp_path, index, searcher, tiny_model):
    """With the set larger than ndocs, the filter is applied to PLAID's candidates as they are generated: the
    results equal PLAID's over an index built of only those passages (same codec, so the same codes)."""
    rng = np.random.default_rng(0)
    ix = searcher.index
    allowed = np.sort(rng.choice(ix.pids, 120, replace=False))
    texts = dict(zip(ix.pids.tolist(), ix.texts(range(ix.num_passages))))
    tsv = tmp_path / "subset.tsv"
    tsv.write_text("".join(f"{p}\t{texts[p]}\n" for p in allowed.tolist()))
    colbert_jax.Indexer(tiny_model, codec=index, show_progress=False).index(tmp_path / "sub", tsv)
    sub = colbert_jax.Searcher(tmp_path / "sub", tiny_model)
    for ndocs in (32, 64):
        got = searcher.search_all(QUERIES, k=8, pids=allowed, ndocs=ndocs)
        want = sub.search_all(QUERIES, k=8, ndocs=ndocs)
        unfiltered = searcher.search_all(QUERIES, k=8, ndocs=ndocs)
        for q in range(len(QUERIES)):
            assert [p for p, _, _ in got[q]] == [p for p, _, _ in want[q]]
            np.testing.assert_allclose([s for *_, s in got[q]], [s for *_, s in want[q]], atol=1e-5)
            assert set(p for p, _, _ in got[q]) <= set(allowed.tolist())
        # a filter that allows everything changes nothing
        everything = searcher.search_all(QUERIES, k=8, pids=ix.pids, ndocs=ndocs)
        assert everything.data == unfiltered.data


def test_per_query_sets(searcher, brute):
    pids = searcher.index.pids
    sets = {0: pids[:7].tolist(), 1: pids[100:160].tolist(), 2: [int(pids[5])], 3: []}
    ranking = searcher.search_all(dict(enumerate(QUERIES)), k=5, pids=sets)
    for q, allowed in sets.items():
        expected, scores = expected_top(brute[q], allowed, 5)
        assert_ranking(ranking[q], expected, scores)
    with pytest.raises(KeyError, match="no allowed set for query 3"):
        searcher.search_all(QUERIES, k=5, pids={0: sets[0], 1: sets[1], 2: sets[2]})
    with pytest.raises(KeyError, match="pid 987654 is not in the index"):
        searcher.search(QUERIES[0], k=5, pids=[int(pids[0]), 987654])


def test_where_filters_by_passage_fields(tmp_path, tiny_model):
    """JSONL fields are stored in the index (SQLite) and `where` selects by them, through adds, replaces,
    deletes and compaction; values are bound parameters, so a quote or SQL in a value is just a value."""
    from colbert_jax.index import Index
    from colbert_jax.indexing.collection import Collection
    from colbert_jax.indexing.fields import WhereError

    texts = Collection.load(Path(__file__).parents[1] / "fixtures" / "collections" / "stdlib_2k.tsv").texts(range(90))
    langs = ["en", "fr", "it's", "en'; DROP TABLE passages; --"]

    def record(i, text, **extra):
        return {"id": 1000 + i, "text": text, "year": 2015 + i % 10, "lang": langs[i % 4], **extra}

    records = {1000 + i: record(i, texts[i]) for i in range(60)}
    for r in list(records.values())[::7]:
        r.pop("year")  # some passages lack a field: NULL
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    path = tmp_path / "idx"
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, tmp_path / "c.jsonl")

    cases = {
        "year >= 2020 AND lang = 'en'": lambda r: r.get("year", -1) >= 2020 and r["lang"] == "en",
        "lang = 'it''s' OR year < 2017": lambda r: r["lang"] == "it's" or r.get("year", 9999) < 2017,
        "NOT (lang IN ('en', 'fr')) AND year IS NOT NULL": lambda r: r["lang"] not in ("en", "fr") and "year" in r,
        "year IS NULL": lambda r: "year" not in r,
        "lang = 'en''; DROP TABLE passages; --'": lambda r: r["lang"] == langs[3],
        "lang LIKE 'e%' AND (year = 2015 OR year = 2024)": lambda r: (
            r["lang"].startswith("e") and r.get("year") in (2015, 2024)
        ),
        "shard = 2": lambda r: r.get("shard") == 2,
    }

    def check():
        ix = Index.open(path)
        live = dict(zip(ix.pids.tolist(), range(ix.num_passages)))
        assert set(live) == set(records)
        for expr, keep in cases.items():
            if "shard" in expr and "shard" not in ix.fields:
                continue
            got = set(ix.pids[ix.select(expr)].tolist())
            assert got == {p for p, r in records.items() if keep(r)}, expr

    check()
    searcher = colbert_jax.Searcher(path, tiny_model)
    expr = "year >= 2020 AND lang = 'en'"
    allowed = [p for p, r in records.items() if cases[expr](r)]
    assert searcher.search(QUERIES[0], k=3, where=expr) == searcher.search(QUERIES[0], k=3, pids=allowed)
    assert searcher.search(QUERIES[0], k=3, where=expr, pids=allowed[:1]) == searcher.search(
        QUERIES[0], k=3, pids=allowed[:1]
    )
    for bad, message in (
        ("year >>= 3", "expected a literal"),
        ("year >= 2020 AND", "expected a field name"),
        ("colour = 'red'", "unknown field 'colour'"),
        ("lang = 'en'; DROP TABLE passages", "unexpected"),
        ("year = 2020 extra", "unexpected 'extra'"),
        ("", "empty expression"),
    ):
        with pytest.raises(WhereError, match=message):
            searcher.search(QUERIES[0], k=3, where=bad)
    assert Index.open(path).select("year IS NOT NULL").size  # the table survived every attempt

    # updates carry fields: a new field, a replaced passage's new values, a deleted passage's removal
    new = {1000 + i: record(i, texts[i], shard=i % 3) for i in range(60, 75)}
    (tmp_path / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new.values()))
    colbert_jax.Indexer(tiny_model).add(path, tmp_path / "add.jsonl")
    records.update(new)
    changed = {1003: {**records[1003], "year": 1999, "lang": "fr"}}
    (tmp_path / "rep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed.values()))
    colbert_jax.Indexer(tiny_model).add(path, tmp_path / "rep.jsonl", replace=True)
    records.update(changed)
    colbert_jax.Indexer().delete(path, [1001, 1062])
    del records[1001], records[1062]
    cases["year < 2000"] = lambda r: r.get("year", 9999) < 2000
    check()
    colbert_jax.Indexer().compact(path)
    check()
