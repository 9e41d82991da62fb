"""Retrieval metrics: MRR@k, Recall@k and nDCG@k of a ranking against relevance judgements (qrels).

The metrics are computed by ir-measures (https://ir-measur.es, over pytrec_eval, i.e. trec_eval):
`RR@k`, `R@k` and `nDCG@k` per query. We only choose the queries and average: every metric is averaged over
the *judged* queries (those with at least one relevant passage in the qrels), and a judged query missing
from the ranking scores 0 (MS MARCO's official script, trec_eval -c), where trec_eval alone would skip it.
`own_metrics` is our own implementation of the same definitions (as in colbert-ai's
`utility/evaluate/msmarco_passages.py`), kept to cross-check the library in the tests:
- MRR@k: 1 / rank of the first relevant passage within the top k (else 0);
- Recall@k: relevant passages in the top k / relevant passages;
- nDCG@k: sum of rel / log2(rank + 1) over the top k, divided by the same sum for the ideal ordering
  (graded relevance: gain = the qrels' relevance value).

Rankings: colbert-ai's TSV (`qid \\t pid \\t rank [\\t score]`, read in rank order) or a TREC run file
(`qid Q0 docno rank score tag`, ordered as trec_eval orders it: by score, ties by docno, both descending;
the rank column is ignored). Ties are resolved here once: ir-measures' providers disagree on them (its
RR@k, from MS MARCO's script, breaks them the other way than pytrec_eval).. Qrels: TREC
and MS MARCO (`qid 0 docno rel`, whitespace or tabs) or BEIR (`query-id \\t corpus-id \\t score`, header).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from colbert_jax.queries import text_lines
from colbert_jax.search.ranking import Ranking

__all__ = ["load_qrels", "load_run", "evaluate", "own_metrics"]


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


def load_run(path: str | os.PathLike) -> dict[str, list[tuple[str, int, float]]]:
    """Reads a ranking: colbert-ai's TSV or a TREC run -> {qid: [(docno, rank, score), ...]} in rank order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ranking file not found: {path}")
    first = next((line for _, line in text_lines(path) if line.strip()), "")
    if "\t" in first or len(first.split()) != 6:
        ranking = Ranking.load(path)
        return {str(q): [(str(p), r, s) for p, r, s in res] for q, res in ranking.data.items()}
    run: dict[str, list[tuple[str, float]]] = {}
    for lineno, line in text_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6:
            raise ValueError(f"{path}:{lineno}: expected a TREC run line 'qid Q0 docno rank score tag'")
        try:
            score = float(fields[4])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: score {fields[4]!r} is not a number") from None
        run.setdefault(fields[0], []).append((fields[2], score))
    out = {}
    for qid, docs in run.items():
        docs.sort(key=lambda d: d[0], reverse=True)  # trec_eval's order: score, then docno, both descending
        docs.sort(key=lambda d: d[1], reverse=True)
        out[qid] = [(doc, rank, score) for rank, (doc, score) in enumerate(docs, 1)]
    return out


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
    """Metrics of `ranking` ({qid: [(pid, rank, score), ...]}, a Ranking or `load_run`'s result) against
    `qrels`, computed per query by ir-measures, averaged over the judged queries (missing ones count 0)."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    ranked, judged = _checked(ranking, qrels)
    recall_ks = list(recall_ks)
    measures = {
        f"MRR@{mrr_k}": RR @ mrr_k,
        f"nDCG@{ndcg_k}": nDCG @ ndcg_k,
        **{f"Recall@{k}": R @ k for k in recall_ks},
    }
    qrel_rows = [ir_measures.Qrel(q, d, max(int(rel), 0)) for q in judged for d, rel in qrels[q].items()]
    # Scores that follow the ranks: the library orders by score, the ranking's order is its ranks.
    run_rows = [
        ir_measures.ScoredDoc(q, d, float(len(docs) - i))
        for q, docs in ranked.items()
        if q in judged
        for i, d in enumerate(docs)
    ]
    totals = dict.fromkeys(measures, 0.0)
    by_measure = {m: name for name, m in measures.items()}
    for value in ir_measures.iter_calc(list(measures.values()), qrel_rows, run_rows):
        totals[by_measure[value.measure]] += value.value
    metrics = {name: total / len(judged) for name, total in totals.items()}
    metrics["judged_queries"] = len(judged)
    metrics["ranked_judged_queries"] = sum(q in ranked for q in judged)
    return metrics


def _checked(ranking, qrels) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """The ranked pids per query and the judged queries' relevant pids; refuses swapped files."""
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
    return ranked, judged


def own_metrics(
    ranking: Ranking | dict,
    qrels: dict[str, dict[str, int]],
    *,
    mrr_k: int = 10,
    ndcg_k: int = 10,
    recall_ks: Iterable[int] = (10, 50, 100, 1000),
) -> dict[str, float]:
    """`evaluate`'s metrics by our own code (no library): the cross-check of ir-measures in the tests."""
    ranked, judged = _checked(ranking, qrels)
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
