"""`Searcher.explain`: the MaxSim alignment of a query with a passage, against the index's own embeddings."""

import numpy as np
import pytest

import colbert_jax
from colbert_jax.search.explain import Match, doc_token_spans
from tests.conftest import COLLECTIONS

QUERIES = [line.split("\t")[1] for line in (COLLECTIONS / "queries_2k.tsv").read_text().splitlines()[:8]]


@pytest.fixture(scope="module")
def searcher(real_index, minilm_model):
    return colbert_jax.Searcher(real_index, checkpoint=minilm_model)


def punctuated_pid(searcher) -> int:
    """A top result whose text has punctuation early on, so stored rows and token positions differ."""
    for query in QUERIES:
        for pid, _, _ in searcher.search(query, k=10):
            ids, _ = searcher.model.doc_tokenizer.tensorize(searcher.passages([pid]))
            keep = searcher.model.doc_tokenizer.keep_mask(ids)[0]
            if not keep[: len(keep) // 2].all():
                return pid
    raise AssertionError("no passage with punctuation among the top results")


def test_scores_sum_to_the_exact_maxsim_of_the_stored_embeddings(searcher):
    query = QUERIES[0]
    for pid, _, plaid_score in searcher.search(query, k=5):
        matches = searcher.explain(query, pid)
        assert len(matches) == searcher.config.query_maxlen and all(isinstance(m, Match) for m in matches)
        Q = searcher.encode([query])[0]
        D = searcher.index.embeddings(pid)
        exact = float((Q @ D.T).max(axis=1).sum())
        assert sum(m.score for m in matches) == pytest.approx(exact, rel=1e-5)
        assert sum(m.score for m in matches) == pytest.approx(plaid_score, abs=1e-3)  # what search reported


def test_query_tokens_are_the_encoded_ones_in_order(searcher):
    matches = searcher.explain("read a file line by line", searcher.search("read a file", k=1)[0][0])
    tokens = [m.query_token for m in matches]
    assert tokens[:9] == ["[CLS]", "[unused0]", "read", "a", "file", "line", "by", "line", "[SEP]"]
    assert set(tokens[9:]) == {"[MASK]"}  # query augmentation: the padding is scored too


def test_positions_map_stored_rows_back_to_tokens_past_skipped_punctuation(searcher):
    pid = punctuated_pid(searcher)
    text = searcher.passages([pid])[0]
    doc = searcher.model.doc_tokenizer
    ids, _ = doc.tensorize([text])
    tokens = searcher.model.hf_tokenizer.convert_ids_to_tokens(ids[0].tolist())
    kept = np.flatnonzero(doc.keep_mask(ids)[0])
    # The uncompressed embedding at each token position: the stored (compressed) row j is nearest to the
    # one at kept[j], not at j, once punctuation has been skipped.
    full, keep = searcher.model.encode_docs([text])
    stored = searcher.index.embeddings(pid)
    nearest = (stored @ full[0].T + np.where(keep[0], 0.0, -1e9)).argmax(axis=1)
    assert (nearest == kept).mean() > 0.9 and (kept != np.arange(len(kept))).any()

    matches = searcher.explain(QUERIES[0], pid)
    Q = searcher.encode([QUERIES[0]])[0]
    row_of = {int(p): j for j, p in enumerate(kept)}
    for i, m in enumerate(matches):
        assert m.doc_position in row_of, f"{m} is a position without an embedding (punctuation or padding)"
        assert m.doc_token == tokens[m.doc_position]
        assert m.score == pytest.approx(float(Q[i] @ stored[row_of[m.doc_position]]), abs=1e-5)
        assert m.score == pytest.approx(float((Q[i] @ stored.T).max()), abs=1e-5)


def test_doc_token_spans_point_at_the_token_text(searcher):
    pid = punctuated_pid(searcher)
    text = searcher.passages([pid])[0]
    spans = doc_token_spans(searcher.model, text)
    ids, _ = searcher.model.doc_tokenizer.tensorize([text])
    tokens = searcher.model.hf_tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert len(spans) == len(tokens) and spans[0] is None and spans[1] is None and spans[-1] is None
    words = [(text[sp[0] : sp[1]], token) for sp, token in zip(spans, tokens) if sp and token != "[UNK]"]
    words = [(piece, token) for piece, token in words if piece.isascii()]  # MiniLM lowercases, strips accents
    assert words and all(piece.lower() == token.removeprefix("##") for piece, token in words)


def test_clamped_searcher_explains_clamped_scores(real_index, minilm_model, searcher):
    clamped = colbert_jax.Searcher(real_index, checkpoint=minilm_model, clamp_maxsim=True)
    pid = searcher.search(QUERIES[1], k=1)[0][0]
    plain = searcher.explain(QUERIES[1], pid)
    assert [m.score for m in clamped.explain(QUERIES[1], pid)] == [max(m.score, 0.0) for m in plain]


def test_unknown_pid_and_bad_query(searcher):
    with pytest.raises(KeyError, match="not in the index"):
        searcher.explain("a query", 10**9)
    with pytest.raises(ValueError, match="empty"):
        searcher.explain("   ", 0)


def test_a_text_that_does_not_match_the_stored_embeddings_is_refused(searcher, monkeypatch):
    monkeypatch.setattr(searcher, "passages", lambda pids: ["a different text entirely"])
    with pytest.raises(ValueError, match="not the one the index was built from"):
        searcher.explain("a query", 0)
