"""Reranking: exact ColBERT scores for candidates another retriever found.

`rerank(model, query, documents)` needs no index (it encodes the documents); `Searcher.rerank(query, pids)`
scores passages of an index with its stored (decompressed) embeddings; `read_run` reads the candidate
lists of another system's run (colbert-ai's `qid<TAB>pid<TAB>rank[<TAB>score]` TSV or TREC's
`qid Q0 docid rank score tag`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from colbert_jax.model import ColBERTModel

__all__ = ["rerank", "read_run"]


def rerank(model: ColBERTModel, query: str, documents: Sequence[str], k: int | None = None) -> list[tuple[int, float]]:
    """Scores `documents` against `query` with MaxSim -> `[(position in documents, score), ...]`, best first
    (ties keep the documents' order), the best `k` (None: all)."""
    if isinstance(documents, str):
        raise TypeError("documents must be a list of texts, not a str")
    if not documents:
        return []
    if k is not None and k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    from colbert_jax.indexing.encode import encode_passages

    q = model.encode_queries([query])[0]  # [Lq, dim]
    scores = np.array([float((e @ q.T).max(axis=0).sum()) for e in encode_passages(model, list(documents))])
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order]


def read_run(path: str | os.PathLike) -> dict[str, list[int]]:
    """A run's candidates: {qid: [pid, ...] in rank order}. Lines: `qid<TAB>pid<TAB>rank[<TAB>score]` or
    TREC `qid Q0 docid rank score tag`; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"run file not found: {path}")
    rows: dict[str, list[tuple[int, int]]] = {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            fields = [x.strip() for x in fields]
            try:
                if len(fields) == 6 and fields[1] == "Q0":  # TREC
                    qid, pid, rank = fields[0], int(fields[2]), int(fields[3])
                elif len(fields) >= 3:
                    qid, pid, rank = fields[0], int(fields[1]), int(fields[2])
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: expected 'qid<TAB>pid<TAB>rank[<TAB>score]' or 'qid Q0 docid rank score tag' "
                    "with integer pids and ranks"
                ) from None
            rows.setdefault(qid, []).append((rank, pid))
    if not rows:
        raise ValueError(f"{path}: the run is empty")
    return {qid: [pid for _, pid in sorted(hits, key=lambda x: x[0])] for qid, hits in rows.items()}
