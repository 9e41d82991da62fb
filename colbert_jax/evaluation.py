"""Retrieval metrics: MRR@k, Recall@k and nDCG@k of a ranking against relevance judgements (qrels).

Definitions (as in colbert-ai's `utility/evaluate/msmarco_passages.py` and trec_eval):
- every metric is averaged over the *judged* queries (those with at least one relevant passage in the
  qrels); a judged query missing from the ranking scores 0;
- MRR@k: 1 / rank of the first relevant passage within the top k (else 0);
- Recall@k: relevant passages in the top k / relevant passages;
- nDCG@k: sum of rel / log2(rank + 1) over the top k, divided by the same sum for the ideal ordering
  (graded relevance: gain = the qrels' relevance value).
Rankings are read in rank order. Qrels files: MS MARCO (`qid 0 pid rel`, whitespace or tabs) or BEIR
(`query-id \\t corpus-id \\t score` with that header line).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from colbert_jax.queries import text_lines
from colbert_jax.search.ranking import Ranking

__all__ = ["load_qrels", "evaluate"]


def load_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Reads MS MARCO or BEIR qrels -> {qid: {pid: relevance}} (ids as strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"qrels file not found: {path}")
    qrels: dict[str, dict[str, int]] = {}
    for lineno, line in text_lines(path):
        fields = line.split()
        if not fields:
            continue
        if lineno == 1 and fields[0] in ("query-id", "qid"):
            continue  # BEIR header
        if len(fields) == 4:
            qid, _, pid, rel = fields
        elif len(fields) == 3:
            qid, pid, rel = fields
        else:
            raise ValueError(f"{path}:{lineno}: expected 'qid 0 pid rel' (MS MARCO) or 'qid pid rel' (BEIR)")
        try:
            value = float(rel)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: relevance {rel!r} is not a number") from None
        if not value.is_integer():
            raise ValueError(
                f"{path}:{lineno}: relevance {rel!r} is not an integer label; this looks like a ranking "
                "('qid pid rank score'), not qrels"
            )
        relevance = int(value)
        qrels.setdefault(qid, {})[pid] = relevance
    if not qrels:
        raise ValueError(f"{path}: no judgements")
    return qrels


def _ranked_lists(ranking: Ranking | dict) -> dict[str, list[str]]:
    data = ranking.data if isinstance(ranking, Ranking) else ranking
    out = {}
    for qid, results in data.items():
        ordered = sorted(results, key=lambda r: r[1])  # by rank
        out[str(qid)] = [str(pid) for pid, _, _ in ordered]
    return out


def evaluate(
    ranking: Ranking | dict,
    qrels: dict[str, dict[str, int]],
    *,
    mrr_k: int = 10,
    ndcg_k: int = 10,
    recall_ks: Iterable[int] = (10, 50, 100, 1000),
) -> dict[str, float]:
    """Metrics of `ranking` ({qid: [(pid, rank, score), ...]} or a Ranking) against `qrels`."""
    ranked = _ranked_lists(ranking)
    pids = {pid for results in ranked.values() for pid in results}
    if pids == {"0"} and sum(map(len, ranked.values())) > 1:
        raise ValueError(
            "every pid in the ranking is 0: this looks like MS MARCO qrels ('qid 0 pid rel'), not a ranking "
            "('qid pid rank score'); are the ranking and the qrels swapped?"
        )
    judged = {q: {p: r for p, r in rels.items() if r > 0} for q, rels in qrels.items()}
    judged = {q: rels for q, rels in judged.items() if rels}
    if not judged:
        raise ValueError("the qrels have no relevant passages")
    recall_ks = list(recall_ks)
    totals = {f"MRR@{mrr_k}": 0.0, f"nDCG@{ndcg_k}": 0.0, **{f"Recall@{k}": 0.0 for k in recall_ks}}
    for qid, relevant in judged.items():
        results = ranked.get(qid, [])
        first = next((i for i, pid in enumerate(results[:mrr_k]) if pid in relevant), None)
        totals[f"MRR@{mrr_k}"] += 0.0 if first is None else 1.0 / (first + 1)
        for k in recall_ks:
            totals[f"Recall@{k}"] += sum(pid in relevant for pid in results[:k]) / len(relevant)
        dcg = sum(max(qrels[qid].get(pid, 0), 0) / math.log2(i + 2) for i, pid in enumerate(results[:ndcg_k]))
        ideal = sorted(relevant.values(), reverse=True)[:ndcg_k]
        idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal))
        totals[f"nDCG@{ndcg_k}"] += dcg / idcg
    metrics = {name: value / len(judged) for name, value in totals.items()}
    metrics["judged_queries"] = len(judged)
    metrics["ranked_judged_queries"] = sum(q in ranked for q in judged)
    return metrics
