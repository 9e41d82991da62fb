"""Why a passage matches a query: ColBERT's MaxSim alignment, token by token.

A passage's score is the sum over query tokens of the query token's best similarity with any stored
passage embedding. `explain` returns, for each query token, that best passage token, its position in the
passage's tokens and the similarity, so the scores sum to the passage's score. The stored embeddings
(`Index.embeddings`) are the passage's kept tokens only: with `mask_punctuation`, punctuation tokens get
none, so embedding row j is the j-th kept position of `DocTokenizer.keep_mask`, not position j.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    from colbert_jax.index import Index
    from colbert_jax.model import ColBERTModel

__all__ = ["Match", "explain", "doc_token_spans"]


class _Searcher(Protocol):
    """What `explain` reads of a `colbert_jax.Searcher` (a protocol: this module does not import searcher.py,
    which calls it)."""

    model: ColBERTModel
    index: Index
    clamp_maxsim: bool

    def encode(self, queries: Sequence[str | np.ndarray]) -> np.ndarray: ...

    def passages(self, pids: Sequence[int]) -> list[str]: ...


class Match(NamedTuple):
    """One query token's best match in a passage."""

    query_token: str
    doc_token: str
    doc_position: int  # in the passage's tokens: [CLS] [D] tokens... [SEP]
    score: float


def explain(searcher: _Searcher, query: str, pid: int) -> list[Match]:
    """The MaxSim alignment of `query` with passage `pid`: one `Match` per query token (query_maxlen of
    them, the [MASK] padding included, as every query vector counts in the score).

    The passage's embeddings come from the index (decompressed, as search scores them) and its tokens from
    re-tokenising its text; a text whose kept tokens do not line up with the stored embeddings (another
    collection than the index's) raises ValueError. With `searcher.clamp_maxsim`, scores are clamped at 0,
    as that searcher scores.
    """
    model = searcher.model
    Q = searcher.encode([query])[0]  # [query_maxlen, dim]; raises QueryError for a bad query
    q_ids, _ = model.query_tokenizer.tensorize([query])
    D = np.asarray(searcher.index.embeddings(int(pid)), np.float32)  # [doclen, dim]
    text = searcher.passages([int(pid)])[0]
    d_ids, _ = model.doc_tokenizer.tensorize([text])
    kept = np.flatnonzero(model.doc_tokenizer.keep_mask(d_ids)[0])  # embedding row j <- token position kept[j]
    if len(kept) != len(D):
        raise ValueError(
            f"pid {pid}: its text has {len(kept)} embedded tokens but the index stores {len(D)} embeddings; "
            "the collection is not the one the index was built from"
        )
    sims = Q @ D.T  # [query_maxlen, doclen]
    best = sims.argmax(axis=1)
    scores = sims[np.arange(len(Q)), best]
    if searcher.clamp_maxsim:
        scores = np.maximum(scores, 0.0)
    q_tokens = model.hf_tokenizer.convert_ids_to_tokens(q_ids[0].tolist())
    d_tokens = model.hf_tokenizer.convert_ids_to_tokens(d_ids[0].tolist())
    return [Match(q_tokens[i], d_tokens[kept[j]], int(kept[j]), float(scores[i])) for i, j in enumerate(best.tolist())]


def doc_token_spans(model: ColBERTModel, text: str) -> list[tuple[int, int] | None]:
    """Character span `(start, end)` in `text` of each of its document token positions (as `explain`
    numbers them); None for [CLS], the [D] marker and [SEP]."""
    doc = model.doc_tokenizer
    encoding = doc.hf(text, truncation=True, max_length=model.config.doc_maxlen - 1, return_offsets_mapping=True)
    spans: list[tuple[int, int] | None] = [tuple(s) if s[1] > s[0] else None for s in encoding["offset_mapping"]]
    spans.insert(1, None)  # the [D] marker, inserted after [CLS] as DocTokenizer does
    ids, _ = doc.tensorize([text])
    if len(spans) != ids.shape[1]:
        raise ValueError(f"token spans ({len(spans)}) and document tokens ({ids.shape[1]}) disagree")
    return spans
