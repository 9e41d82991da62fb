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
the rank column is ignored; whitespace or tabs). Ties are resolved here once: ir-measures' providers disagree
on them (its RR@k, from MS MARCO's script, breaks them the other way than pytrec_eval). A passage listed twice
for a query counts at its first rank only (with a warning). Qrels: TREC and MS MARCO (`qid 0 docno rel`,
whitespace or tabs) or BEIR (`query-id \\t corpus-id \\t score`, header).

Ids are compared in one canonical form, on both sides: an all-digit id without its leading zeros ('001' ->
'1'), since colbert-jax reads all-integer qids and pids as integers (a run written by `search` for queries
'001' says '1'); two ids of one input that collide so ('1' and '01') are refused. Judged queries missing from
the ranking are warned of (`EvaluationWarning`).
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from colbert_jax.queries import INTEGER, canonical_id, text_lines
from colbert_jax.search.ranking import Ranking

__all__ = ["load_qrels", "load_run", "evaluate", "own_metrics"]


class EvaluationWarning(UserWarning):
    """A ranking or qrels that evaluate, but probably not as meant (missing queries, duplicate passages)."""


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
        judged = qrels.setdefault(qid, {})
        if judged.get(pid, relevance) != relevance:  # which one was meant? Keeping either would be a guess
            raise ValueError(
                f"{path}:{lineno}: query {qid!r}, passage {pid!r} is judged twice, with relevance "
                f"{judged[pid]} and {relevance}"
            )
        judged[pid] = relevance
    if not qrels:
        raise ValueError(f"{path}: no judgements")
    return qrels


def load_run(path: str | os.PathLike) -> dict[str, list[tuple[str, int, float]]]:
    """Reads a ranking: colbert-ai's TSV or a TREC run -> {qid: [(docno, rank, score), ...]} in rank order.

    Ids stay as the file writes them ('001' stays '001'); `evaluate` compares them in one canonical form."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ranking file not found: {path}")
    first = next((line for _, line in text_lines(path) if line.strip()), "")
    fields = _fields(first)
    # TREC: 6 columns, whitespace-separated, or tab-separated with the Q0 column (as rerank.read_run reads it)
    if len(fields) != 6 or ("\t" in first and fields[1] != "Q0"):
        return _load_tsv_run(path)
    run: dict[str, list[tuple[str, float]]] = {}
    for lineno, line in text_lines(path):
        fields = _fields(line)
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


def _fields(line: str) -> list[str]:
    """A run line's columns: split at tabs when it has any (ids may then hold spaces), else at whitespace."""
    return [f.strip() for f in line.rstrip("\r\n").split("\t")] if "\t" in line else line.split()


def _load_tsv_run(path: Path) -> dict[str, list[tuple[str, int, float]]]:
    """colbert-ai's `qid \\t pid \\t rank [\\t score]`, read as `Ranking.load` reads it, except that ids keep
    their text: Ranking.load turns all-integer qids into ints, which would merge '1' and '01' unseen."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.rstrip("\r\n").split("\t")]
        if len(fields) < 3:
            raise ValueError(f"{path}:{lineno}: expected 'qid<TAB>pid<TAB>rank[<TAB>score]'")
        qid, pid = fields[0], fields[1]
        try:
            number = int(pid)
            rank = int(fields[2])
            score = float(fields[3]) if len(fields) > 3 else 0.0
        except ValueError:
            raise ValueError(f"{path}:{lineno}: pid and rank must be integers, score a number") from None
        if not INTEGER.fullmatch(pid):
            pid = str(number)  # '+5' or '٥': the integer int() read, as Ranking.load would have kept it
        out.setdefault(qid, []).append((pid, rank, score))
    return out


def _canonical(x: object) -> str:
    """The form ids are compared in (`queries.canonical_id`: a run written by `search` says '1' where the
    qrels say '001')."""
    return canonical_id(x)


class _Ids:
    """The canonical ids of one kind (qids or pids) in one input; refuses two distinct ids that collide."""

    def __init__(self, what: str, where: str):
        self.what, self.where = what, where
        self.raw: dict[str, str] = {}  # canonical -> the id as the input writes it, for messages

    def __call__(self, x: object) -> str:
        c, s = _canonical(x), str(x)
        first = self.raw.setdefault(c, s)
        if first != s:
            raise ValueError(
                f"the {self.where} has the {self.what}s {first!r} and {s!r}, which are the same id once leading "
                f"zeros are dropped (as colbert-jax reads integer ids); rename one of them"
            )
        return c


def _ranked_lists(ranking: Ranking | dict, qids: _Ids | None = None) -> dict[str, list[str]]:
    """{qid: [pid, ...] in rank order}, ids canonical; a pid listed twice for one query counts at its first
    (best) rank only, for both implementations (pytrec_eval would keep its last, our own would count it twice)."""
    data = ranking.data if isinstance(ranking, Ranking) else ranking
    qids = qids or _Ids("qid", "ranking")
    pids = _Ids("pid", "ranking")
    out: dict[str, list[str]] = {}
    dropped = queries = 0
    for qid, results in data.items():
        q = qids(qid)
        if q in out:  # two keys of one dict, e.g. 1 and '1'
            raise ValueError(f"the ranking lists qid {qids.raw[q]!r} twice (as {qids.raw[q]!r} and {qid!r})")
        ordered = [pids(pid) for pid, _, _ in sorted(results, key=lambda r: r[1])]  # by rank
        out[q] = list(dict.fromkeys(ordered))  # the first occurrence of each pid, in order
        if len(out[q]) < len(ordered):
            dropped += len(ordered) - len(out[q])
            queries += 1
    if dropped:
        warnings.warn(
            f"dropped {dropped} duplicate(s) from the ranking: {queries} of its queries list a passage more than "
            "once; each counts at its first (best) rank only",
            EvaluationWarning,
            stacklevel=4,
        )
    return out


def _cutoffs(mrr_k: int, ndcg_k: int, recall_ks: Iterable[int]) -> list[int]:
    """Refuses cut-offs below 1 (they would print 0 as if it were a measurement); returns the recall ks."""
    recall_ks = list(recall_ks)
    for name, k in [("mrr_k", mrr_k), ("ndcg_k", ndcg_k)] + [("recall_ks", k) for k in recall_ks]:
        try:
            ok = operator.index(k) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a positive integer (a cut-off depth), got {k!r}")
    return recall_ks


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

    recall_ks = _cutoffs(mrr_k, ndcg_k, recall_ks)
    ranked, judged = _checked(ranking, qrels)
    measures = {
        f"MRR@{mrr_k}": RR @ mrr_k,
        f"nDCG@{ndcg_k}": nDCG @ ndcg_k,
        **{f"Recall@{k}": R @ k for k in recall_ks},
    }
    # Only the relevant passages: a judgement of 0 or less adds nothing to RR, R or nDCG (gain max(rel, 0)).
    qrel_rows = [ir_measures.Qrel(q, d, rel) for q, rels in judged.items() for d, rel in rels.items()]
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
    """The ranked pids per query and the judged queries' relevant pids ({qid: {pid: rel > 0}}), all ids in
    canonical form; refuses swapped files, warns of judged queries the ranking lacks."""
    data = ranking.data if isinstance(ranking, Ranking) else ranking
    # Checked before duplicates are dropped: qrels read as a ranking list pid 0 for every judgement.
    pids = {_canonical(pid) for results in data.values() for pid, _, _ in results}
    if pids == {"0"} and sum(map(len, data.values())) > 1:
        raise ValueError(
            "every pid in the ranking is 0: this looks like MS MARCO qrels ('qid 0 pid rel'), not a ranking "
            "('qid pid rank score'); are the ranking and the qrels swapped?"
        )
    run_qids = _Ids("qid", "ranking")
    ranked = _ranked_lists(ranking, run_qids)
    qrel_qids, qrel_pids = _Ids("qid", "qrels"), _Ids("pid", "qrels")
    judged: dict[str, dict[str, int]] = {}
    for qid, rels in qrels.items():
        q = qrel_qids(qid)
        if q in judged:  # two keys of one dict, e.g. 1 and '1'
            raise ValueError(f"the qrels list qid {qrel_qids.raw[q]!r} twice (as {qrel_qids.raw[q]!r} and {qid!r})")
        judged[q] = {}
        for pid, rel in rels.items():
            p = qrel_pids(pid)
            if p in judged[q] and judged[q][p] != int(rel):
                raise ValueError(f"the qrels judge query {qid!r}, passage {pid!r} twice ({judged[q][p]}, {int(rel)})")
            judged[q][p] = int(rel)
    judged = {q: {p: r for p, r in rels.items() if r > 0} for q, rels in judged.items()}
    judged = {q: rels for q, rels in judged.items() if rels}
    if not judged:
        raise ValueError("the qrels have no relevant passages")
    missing = [q for q in judged if q not in ranked]
    if len(missing) == len(judged):
        example = f"e.g. {run_qids.raw[next(iter(ranked))]!r}" if ranked else "none: it is empty"
        warnings.warn(
            f"ERROR: none of the {len(judged)} judged queries is in the ranking, so every metric is 0: do the "
            f"files use the same qids? (qrels: e.g. {qrel_qids.raw[missing[0]]!r}; ranking: {example})",
            EvaluationWarning,
            stacklevel=3,
        )
    elif missing:
        warnings.warn(
            f"{len(missing)} of the {len(judged)} judged queries are not in the ranking (e.g. qid "
            f"{qrel_qids.raw[missing[0]]!r}): they count 0",
            EvaluationWarning,
            stacklevel=3,
        )
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
    recall_ks = _cutoffs(mrr_k, ndcg_k, recall_ks)
    ranked, judged = _checked(ranking, qrels)
    totals = {f"MRR@{mrr_k}": 0.0, f"nDCG@{ndcg_k}": 0.0, **{f"Recall@{k}": 0.0 for k in recall_ks}}
    for qid, relevant in judged.items():
        results = ranked.get(qid, [])
        first = next((i for i, pid in enumerate(results[:mrr_k]) if pid in relevant), None)
        totals[f"MRR@{mrr_k}"] += 0.0 if first is None else 1.0 / (first + 1)
        for k in recall_ks:
            totals[f"Recall@{k}"] += sum(pid in relevant for pid in results[:k]) / len(relevant)
        dcg = sum(relevant.get(pid, 0) / math.log2(i + 2) for i, pid in enumerate(results[:ndcg_k]))
        ideal = sorted(relevant.values(), reverse=True)[:ndcg_k]
        idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal))
        totals[f"nDCG@{ndcg_k}"] += dcg / idcg
    metrics = {name: value / len(judged) for name, value in totals.items()}
    metrics["judged_queries"] = len(judged)
    metrics["ranked_judged_queries"] = sum(q in ranked for q in judged)
    return metrics
