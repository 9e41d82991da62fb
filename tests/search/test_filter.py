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


STDLIB = Path(__file__).parents[1] / "fixtures" / "collections" / "stdlib_2k.tsv"


def _texts(n: int) -> list[str]:
    from colbert_jax.indexing.collection import Collection

    return Collection.load(STDLIB).texts(range(n))


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.filterwarnings("ignore:added .* passages")  # drift: the adds outweigh the tiny base
def test_where_reads_parts_without_fields_as_null(tmp_path, tiny_model):
    """A part without a fields file (a TSV base, an add without metadata) or without a field reads it as NULL:
    `lang IS NULL` selects its passages, `NOT (lang = 'en')` does not (SQL: NULL either way); compaction folds
    them into rows of NULLs and keeps every column, so the compacted index selects exactly the same."""
    from colbert_jax.index import Index
    from colbert_jax.indexing.fields import null_matches, parse_where

    assert null_matches(parse_where("lang IS NULL")) and null_matches(parse_where("NOT (lang IS NOT NULL)"))
    assert not null_matches(parse_where("NOT (lang = 'en')")) and not null_matches(parse_where("lang IN (1, 2)"))
    assert null_matches(parse_where("lang = 'en' OR year IS NULL"))

    texts = _texts(40)
    path = tmp_path / "idx"
    (tmp_path / "base.tsv").write_text("".join(f"{i}\t{texts[i]}\n" for i in range(20)))
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, tmp_path / "base.tsv")
    lang = {100 + i: "en" if i < 3 else None for i in range(5)}
    _jsonl(
        tmp_path / "a1.jsonl", [{"id": p, "text": texts[20 + i], "lang": v} for i, (p, v) in enumerate(lang.items())]
    )
    _jsonl(tmp_path / "a2.jsonl", [{"id": 200 + i, "text": texts[30 + i]} for i in range(3)])  # no metadata
    _jsonl(tmp_path / "a3.jsonl", [{"id": 300 + i, "text": texts[33 + i], "shard": i} for i in range(3)])  # no lang
    _jsonl(tmp_path / "a4.jsonl", [{"id": 400, "text": texts[36], "gone": 1}])
    indexer = colbert_jax.Indexer(tiny_model, show_progress=False)
    for name in ("a1", "a2", "a3", "a4"):
        indexer.add(path, tmp_path / f"{name}.jsonl")
    indexer.delete(path, [1, 400])  # the only passage with `gone`: the field stays, NULL everywhere
    null = set(range(20)) - {1} | {103, 104, 200, 201, 202, 300, 301, 302}
    expected = {
        "lang IS NULL": null,
        "NOT (lang = 'en')": set(),
        "lang = 'en' OR lang IS NULL": null | {100, 101, 102},
        "NOT (lang IS NOT NULL) AND shard IS NULL": null - {300, 301, 302},
        "gone IS NULL": null | {100, 101, 102},
        "shard >= 1": {301, 302},
    }

    def selected() -> dict[str, set[int]]:
        ix = Index.open(path)
        return {w: set(ix.pids[ix.select(w)].tolist()) for w in expected}

    assert selected() == expected
    searcher = colbert_jax.Searcher(path, tiny_model)
    assert {p for p, _, _ in searcher.search(QUERIES[0], k=10, where="lang IS NULL")} <= null
    indexer.compact(path)
    assert not Index.open(path).has_updates
    assert selected() == expected


def test_where_on_a_version_the_index_moved_on_from(tmp_path, tiny_model):
    """`select` of an Index left on an old version raises IndexChangedError: after a compaction and one more
    update removed its fields files (not sqlite3's "unable to open database file"), and after a rebuild in
    place (not the new build's rows applied to the old passages)."""
    from colbert_jax.index import Index, IndexChangedError

    texts = _texts(40)
    path = tmp_path / "idx"
    _jsonl(tmp_path / "a.jsonl", [{"id": i, "text": texts[i], "lang": "de" if i < 5 else "en"} for i in range(20)])
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, tmp_path / "a.jsonl")
    indexer = colbert_jax.Indexer(tiny_model, show_progress=False)
    indexer.add(path, _jsonl(tmp_path / "a1.jsonl", [{"id": 30, "text": texts[30], "lang": "de"}]))
    old = Index.open(path)
    assert old.pids[old.select("lang = 'de'")].tolist() == [0, 1, 2, 3, 4, 30]
    indexer.compact(path)
    indexer.add(path, _jsonl(tmp_path / "a2.jsonl", [{"id": 31, "text": texts[31], "lang": "de"}]))
    with pytest.raises(IndexChangedError, match="Searcher.reload"):
        old.select("lang = 'de'")

    before = Index.open(path)
    assert before.pids[before.select("lang = 'de'")].tolist() == [0, 1, 2, 3, 4, 30, 31]
    rebuilt = [{"id": i, "text": texts[i], "lang": "de" if i >= 15 else "en"} for i in range(20)]
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(
        path, _jsonl(tmp_path / "b.jsonl", rebuilt), overwrite=True
    )
    with pytest.raises(IndexChangedError):
        before.select("lang = 'de'")
    now = Index.open(path)  # a fresh build: its fields file is the directory's `fields.sqlite`, as the next one's
    assert now.pids[now.select("lang = 'de'")].tolist() == [15, 16, 17, 18, 19]
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(path, tmp_path / "a.jsonl", overwrite=True)
    with pytest.raises(IndexChangedError):
        now.select("lang = 'de'")  # not the rebuilt index's rows [0..4] applied to this version's passages


@pytest.mark.parametrize(
    "extra, message",
    [
        (lambda i: {"year": 2019 if i % 2 else "2019"}, r"'year' holds both numbers and text \(.*:2 has 2019; "),
        (lambda i: {"n": [1] if i else 1.5}, "'n' holds both numbers and text"),
        (lambda i: {"row": i}, "field name 'row' is reserved"),
        (lambda i: {"PID": i}, "field name 'PID' is reserved"),
        (lambda i: {"lang": "en"} if i % 2 else {"Lang": "EN"}, r"'Lang' \(at .*:1\) and 'lang' differ only in case"),
        (lambda i: {"a-b": 1}, "'a-b' is not an identifier"),
    ],
    ids=["year-int-and-str", "number-and-list", "row", "PID", "Lang-lang", "not-identifier"],
)
def test_unstorable_fields_refused_before_encoding(tmp_path, tiny_model, extra, message):
    """Field names SQLite cannot hold apart (`row`, `Lang` and `lang`) and fields mixing numbers and text
    (`year >= 2020` would match "2019") are refused as the collection is read: before any encoding, by the
    build and by an add alike, with the file and line."""
    from colbert_jax.index import Index
    from colbert_jax.indexing.collection import CollectionError

    texts = _texts(12)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"id": i, "text": texts[i], **extra(i)} for i in range(4)])
    with pytest.raises(CollectionError, match=message):
        colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(tmp_path / "idx", bad)
    assert not (tmp_path / "idx").exists() and not (tmp_path / ".idx.partial").exists()

    good = [{"id": 100 + i, "text": texts[4 + i], "year": 2019, "flag": True, "tags": ["a"]} for i in range(8)]
    good[0].update(year=None, flag=0, tags="a")  # NULL, and numbers/booleans or text/lists together, are fine
    colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False).index(
        tmp_path / "idx", _jsonl(tmp_path / "g.jsonl", good)
    )
    version = Index.open(tmp_path / "idx").version
    with pytest.raises(CollectionError, match=message):
        colbert_jax.Indexer(tiny_model, show_progress=False).add(tmp_path / "idx", bad)
    assert Index.open(tmp_path / "idx").version == version


def test_an_add_whose_fields_clash_with_the_index_is_refused(tmp_path, tiny_model):
    """Each collection may be consistent and the two still clash: `Lang` beside the index's `lang` (compaction
    could not fold them into one table), or `year` as text where the index holds numbers (`year >= 2020`
    would match the added "2019")."""
    from colbert_jax.index import Index
    from colbert_jax.indexing.collection import CollectionError

    texts = _texts(12)
    base = [{"id": i, "text": texts[i], "year": 2018 + i, "lang": "en"} for i in range(6)]
    indexer = colbert_jax.Indexer(tiny_model, nbits=2, show_progress=False)
    indexer.index(tmp_path / "idx", _jsonl(tmp_path / "base.jsonl", base))
    for i, (extra, message) in enumerate(
        [({"Lang": "de"}, "differ only in case"), ({"year": "2019"}, "'year' holds both numbers and text")]
    ):
        bad = _jsonl(tmp_path / f"bad{i}.jsonl", [{"id": 100 + i, "text": texts[6 + i], **extra}])
        with pytest.raises(CollectionError, match=f"does not fit the index .*{message}"):
            indexer.add(tmp_path / "idx", bad)
        assert Index.open(tmp_path / "idx").version == 0
    indexer.add(tmp_path / "idx", _jsonl(tmp_path / "ok.jsonl", [{"id": 50, "text": texts[9], "year": 2030}]))
    assert Index.open(tmp_path / "idx").select("year >= 2030").tolist() == [6]


def test_write_fields_refuses_what_it_cannot_store(tmp_path):
    """`write_fields` checks as the collection does (an index written from records, not from a file)."""
    from colbert_jax.indexing.fields import FieldError, parse_where, select_rows, write_fields

    mixed = [(0, 100, {"year": "2019"}), (1, 101, {"year": 2021})]
    with pytest.raises(FieldError, match=r"'year' holds both numbers and text \(pid 101 has 2021; pid 100 has "):
        write_fields(tmp_path / "f.sqlite", mixed)
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary
    for fields in ({"row": 1}, {"Row": 1}, {"pId": 2}):
        with pytest.raises(FieldError, match="is reserved"):
            write_fields(tmp_path / "f.sqlite", [(0, 100, fields)])
    with pytest.raises(FieldError, match="differ only in case"):
        write_fields(tmp_path / "f.sqlite", [(0, 100, {"lang": "en"}), (1, 101, {"LANG": "en"})])
    # compaction folds what an index holds (check_types=False) and keeps columns no live passage has
    columns = write_fields(tmp_path / "f.sqlite", mixed, columns=["gone"], check_types=False)
    assert columns == ["gone", "year"]
    assert select_rows(tmp_path / "f.sqlite", parse_where("gone IS NULL"), columns).tolist() == [0, 1]
