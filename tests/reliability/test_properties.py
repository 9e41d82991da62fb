"""Property-based tests (hypothesis): every reader of user files, and the tokenizers, on arbitrary input give
either the right result or the project's own error naming the file, never a crash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colbert_jax.config import ColBERTConfig, ConfigError
from colbert_jax.evaluation import load_qrels
from colbert_jax.indexing.collection import Collection, CollectionError
from colbert_jax.queries import load_queries
from colbert_jax.search.ranking import Ranking

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Lines of text built from the characters that matter to these formats, and any Unicode besides.
FIELD = st.text(
    alphabet=st.sampled_from("\t \r\n0123456789-_.,:{}[]\"'#eE+aZ\u00b2\u0661\u2028\ufeff\x00"), max_size=30
)
ANY_TEXT = st.one_of(FIELD, st.text(max_size=60))
ANY_BYTES = st.one_of(st.binary(max_size=200), ANY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")))
# Words without the formats' separators (tab, newline and the line breaks Python's text mode splits on).
WORD = st.text(st.characters(blacklist_categories=("Cs", "Zl", "Zp", "Cc")), min_size=1, max_size=12).filter(
    lambda w: w.strip() == w and w != ""
)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused_naming(error: Exception, path: Path) -> None:
    assert str(path) in str(error), error


# -- queries -----------------------------------------------------------------------------------------------
@FAST
@given(data=ANY_BYTES, suffix=st.sampled_from([".tsv", ".jsonl"]))
def test_queries_reader_never_crashes(tmp_path, data, suffix):
    path = write(tmp_path, "q" + suffix, data)
    try:
        queries = load_queries(path)
    except ValueError as e:
        refused_naming(e, path)
    else:
        assert queries and all(isinstance(t, str) for t in queries.values())


@FAST
@given(rows=st.dictionaries(st.one_of(st.integers(-(10**12), 10**12), WORD.filter(lambda w: not w.isdigit())), WORD))
def test_queries_round_trip(tmp_path, rows):
    if not rows:
        return
    tsv = write(tmp_path, "q.tsv", "".join(f"{q}\t{t}\n" for q, t in rows.items()).encode())
    jsonl = write(
        tmp_path, "q.jsonl", "".join(json.dumps({"qid": q, "text": t}) + "\n" for q, t in rows.items()).encode()
    )
    as_int = all(isinstance(q, int) for q in rows)
    expected = {(q if as_int else str(q)): t for q, t in rows.items()}
    if len(expected) < len(rows):  # e.g. 1 and "1": the same qid once read
        return
    assert load_queries(tsv) == expected
    assert load_queries(jsonl) == expected


# -- collections --------------------------------------------------------------------------------------------
@FAST
@given(data=ANY_BYTES, suffix=st.sampled_from([".tsv", ".jsonl"]))
def test_collection_reader_never_crashes(tmp_path, data, suffix):
    path = write(tmp_path, "c" + suffix, data)
    try:
        coll = Collection.load(path)
    except CollectionError as e:
        refused_naming(e, path)
    else:
        assert len(coll) and all(isinstance(t, str) and t for t in coll.texts(range(len(coll))))


@FAST
@given(texts=st.lists(WORD, min_size=1, max_size=8))
def test_collection_round_trip(tmp_path, texts):
    tsv = write(tmp_path, "c.tsv", "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)).encode())
    jsonl = write(
        tmp_path, "c.jsonl", "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)).encode()
    )
    for path in (tsv, jsonl):
        coll = Collection.load(path)
        assert coll.texts(range(len(coll))) == texts and list(coll.pids) == list(range(len(texts)))


# -- rankings and qrels -------------------------------------------------------------------------------------
@FAST
@given(data=ANY_BYTES)
def test_ranking_and_qrels_readers_never_crash(tmp_path, data):
    path = write(tmp_path, "r.tsv", data)
    for read in (Ranking.load, load_qrels):
        try:
            result = read(path)
        except ValueError as e:
            refused_naming(e, path)
        else:
            assert result is not None


@FAST
@given(
    data=st.dictionaries(
        st.one_of(st.integers(0, 10**9), WORD.filter(lambda w: "-" not in w and not w.isdigit())),
        st.lists(st.tuples(st.integers(0, 10**9), st.floats(allow_nan=False, width=32)), min_size=1, max_size=5),
        min_size=1,
        max_size=5,
    )
)
def test_ranking_round_trip(tmp_path, data):
    as_int = all(isinstance(q, int) for q in data)
    ranking = Ranking(
        {q if as_int else str(q): [(p, r + 1, float(s)) for r, (p, s) in enumerate(res)] for q, res in data.items()}
    )
    if len({str(q) for q in data}) < len(data):
        return
    loaded = Ranking.load(ranking.save(tmp_path / "run.tsv"))
    assert ranking.data == loaded.data


# -- config -------------------------------------------------------------------------------------------------
CONFIG_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(), st.text(max_size=10), st.lists(st.integers())
)
KEYS = st.one_of(st.sampled_from(sorted(ColBERTConfig.model_fields)), st.text(max_size=10), st.integers())


@FAST
@given(data=ANY_BYTES, suffix=st.sampled_from([".json", ".yaml"]))
def test_config_loader_never_crashes_on_bytes(tmp_path, data, suffix):
    path = write(tmp_path, "config" + suffix, data)
    try:
        ColBERTConfig.load(path)
    except ConfigError as e:
        refused_naming(e, path)


@FAST
@given(mapping=st.dictionaries(KEYS, CONFIG_VALUES, max_size=4), suffix=st.sampled_from([".json", ".yaml"]))
def test_config_loader_on_any_mapping(tmp_path, mapping, suffix):
    import yaml

    text = json.dumps({str(k): v for k, v in mapping.items()}) if suffix == ".json" else yaml.safe_dump(mapping)
    path = write(tmp_path, "config" + suffix, text.encode())
    try:
        config = ColBERTConfig.load(path)
    except ConfigError as e:
        refused_naming(e, path)
    else:  # every key was known and every value valid: the config holds them and saves and loads again
        assert set(map(str, mapping)) <= set(ColBERTConfig.model_fields)
        config.save(tmp_path / "again.json")
        assert ColBERTConfig.load(tmp_path / "again.json") == config


# -- tokenizers ---------------------------------------------------------------------------------------------
@FAST
@given(text=st.one_of(st.text(max_size=300), st.text(st.characters(codec="utf-8"), max_size=50)))
def test_tokenizers_take_any_unicode(tiny_model, text):
    q_ids, q_mask = tiny_model.query_tokenizer.tensorize([text])
    d_ids, d_mask = tiny_model.doc_tokenizer.tensorize([text])
    c = tiny_model.config
    assert q_ids.shape == q_mask.shape == (1, c.query_maxlen)
    assert d_ids.shape == d_mask.shape and 3 <= d_ids.shape[1] <= c.doc_maxlen
    assert q_ids[0, 1] == tiny_model.query_tokenizer.query_marker_id
    assert d_ids[0, 1] == tiny_model.doc_tokenizer.doc_marker_id
    assert set(np.unique(d_mask)) <= {0, 1} and d_mask[0, : d_ids.shape[1]].sum() == d_ids.shape[1]


def test_tokenizers_on_empty_huge_and_broken_unicode(tiny_model):
    huge = " ".join(["naïve café 東京 🙂 \u0301"] * 40_000)  # ~500,000 characters
    for text in ("", " ", "\x00", huge):
        assert tiny_model.query_tokenizer.tensorize([text])[0].shape == (1, tiny_model.config.query_maxlen)
        assert tiny_model.doc_tokenizer.tensorize([text])[0].shape[1] <= tiny_model.config.doc_maxlen
    for broken in ("\ud800", "ok \udfff"):  # lone surrogates, e.g. from JSON's "\ud800"
        with pytest.raises(ValueError, match=r"queries\[0\] is not valid Unicode"):
            tiny_model.query_tokenizer.tensorize([broken])
        with pytest.raises(ValueError, match=r"documents\[0\] is not valid Unicode"):
            tiny_model.doc_tokenizer.tensorize([broken])
