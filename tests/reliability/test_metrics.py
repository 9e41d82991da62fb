"""Metrics people can trust: `evaluate` (ir-measures, i.e. trec_eval) equals our own implementation on a
real run and on arbitrary rankings, TREC run files are read as trec_eval reads them, and the evaluate
command takes TREC runs and qrels beside colbert-ai's formats."""

from __future__ import annotations

import json
from pathlib import Path

import ir_measures
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from colbert_jax.cli import main
from colbert_jax.evaluation import evaluate, load_qrels, load_run, own_metrics
from colbert_jax.search.ranking import Ranking

COLLECTIONS = Path(__file__).resolve().parents[1] / "fixtures" / "collections"
KS = {"mrr_k": 10, "ndcg_k": 10, "recall_ks": (1, 5, 10, 50, 100)}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == pytest.approx(b[name], abs=1e-9), name


@pytest.fixture(scope="module")
def test_run(tiny_model, small_collection) -> tuple[Ranking, dict]:
    """A real run: the tiny model's exact MaxSim top 100 over 300 passages for the queries judged on them."""
    from colbert_jax import colbert_score
    from colbert_jax.indexing.collection import Collection

    coll = Collection.load(small_collection)
    in_coll = {str(p) for p in coll.pids}
    qrels = {q: rels for q, rels in load_qrels(COLLECTIONS / "qrels_2k.tsv").items() if set(rels) <= in_coll}
    queries = {
        q: t for q, t in (line.split("\t", 1) for line in (COLLECTIONS / "queries_2k.tsv").read_text().splitlines())
    }
    qids = sorted(qrels, key=int)
    assert len(qids) >= 100
    D, mask = tiny_model.encode_docs(coll.texts(range(len(coll))))
    Q = tiny_model.encode_queries([queries[q] for q in qids])
    data = {}
    for i, q in enumerate(qids):
        scores = np.asarray(colbert_score(Q[i : i + 1], D, mask))
        top = np.argsort(-scores, kind="stable")[:100]
        data[int(q)] = [(int(coll.pids[j]), r + 1, float(scores[j])) for r, j in enumerate(top)]
    return Ranking(data), qrels


def test_library_equals_our_own_on_a_real_run(test_run):
    ranking, qrels = test_run
    library = evaluate(ranking, qrels, **KS)
    assert_same(library, own_metrics(ranking, qrels, **KS))
    assert 0 < library["MRR@10"] < 1 and library["Recall@100"] > library["Recall@10"]  # a run with signal


def test_trec_and_colbert_files_give_the_same_figures(test_run, tmp_path, capsys):
    ranking, qrels = test_run
    tsv = ranking.save(tmp_path / "run.tsv")
    trec = tmp_path / "run.trec"
    trec.write_text("".join(f"{q} Q0 {p} {r} {s:.6f} colbert-jax\n" for q, p, r, s in ranking))
    qrels_trec = tmp_path / "qrels.trec"
    qrels_trec.write_text("".join(f"{q} 0 {d} {rel}\n" for q, docs in qrels.items() for d, rel in docs.items()))
    printed = []
    for run in (tsv, trec):
        assert (
            main(["evaluate", "--ranking", str(run), "--qrels", str(qrels_trec), "--recall", "1", "5", "10", "--json"])
            == 0
        )
        printed.append(json.loads(capsys.readouterr().out))
    expected = evaluate(ranking, qrels, mrr_k=10, ndcg_k=10, recall_ks=(1, 5, 10))
    assert_same(printed[0], expected)
    assert_same(printed[1], expected)


def test_trec_runs_are_ordered_as_trec_eval_orders_them(tmp_path):
    """Tied scores and a rank column that disagrees with the scores: trec_eval (pytrec_eval) ignores the
    ranks and breaks ties by docno, descending; so do we."""
    run = tmp_path / "ties.trec"
    run.write_text(
        "q1 Q0 a 1 1.0 x\nq1 Q0 c 2 1.0 x\nq1 Q0 b 3 1.0 x\nq1 Q0 d 4 2.0 x\nq2 Q0 z 1 0.5 x\nq2 Q0 y 2 0.7 x\n"
    )
    qrels = {"q1": {"a": 1, "b": 2}, "q2": {"z": 1}}
    ours = evaluate(load_run(run), qrels, mrr_k=10, ndcg_k=3, recall_ks=(2, 3))
    assert [d for d, _, _ in load_run(run)["q1"]] == ["d", "c", "b", "a"]
    library = ir_measures.calc_aggregate(
        [ir_measures.RR, ir_measures.nDCG @ 3, ir_measures.R @ 2, ir_measures.R @ 3],  # trec_eval's own
        [ir_measures.Qrel(q, d, r) for q, docs in qrels.items() for d, r in docs.items()],
        list(ir_measures.read_trec_run(str(run))),
    )
    assert ours["MRR@10"] == pytest.approx(library[ir_measures.RR])  # no run is longer than 10
    assert ours["nDCG@3"] == pytest.approx(library[ir_measures.nDCG @ 3])
    assert ours["Recall@2"] == pytest.approx(library[ir_measures.R @ 2])
    assert ours["Recall@3"] == pytest.approx(library[ir_measures.R @ 3])


def test_swapped_files_are_refused(tmp_path, capsys):
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("1\t0\t5\t1\n1\t0\t6\t1\n2\t0\t7\t1\n")
    trec = tmp_path / "run.trec"
    trec.write_text("1 Q0 5 1 2.0 t\n1 Q0 9 2 1.0 t\n")
    assert main(["evaluate", "--ranking", str(qrels), "--qrels", str(qrels)]) == 2
    assert "are the ranking and the qrels swapped?" in capsys.readouterr().err
    assert main(["evaluate", "--ranking", str(trec), "--qrels", str(trec)]) == 2
    assert "expected 'qid 0 pid rel'" in capsys.readouterr().err
    assert main(["evaluate", "--ranking", str(trec), "--qrels", str(qrels), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["MRR@10"] == pytest.approx(0.5)  # query 2 judged, not ranked


RANKINGS = st.dictionaries(
    st.sampled_from([f"q{i}" for i in range(6)]),
    st.lists(st.integers(0, 30), max_size=25, unique=True),
    max_size=6,
)
QRELS = st.dictionaries(
    st.sampled_from([f"q{i}" for i in range(8)]),
    st.dictionaries(st.integers(0, 30).map(str), st.integers(-1, 3), min_size=1, max_size=8),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(ranked=RANKINGS, qrels=QRELS, k=st.integers(1, 12))
def test_library_equals_our_own_on_any_ranking(ranked, qrels, k):
    ranking = {q: [(p, r + 1, 0.0) for r, p in enumerate(pids)] for q, pids in ranked.items()}
    try:
        ours = own_metrics(ranking, qrels, mrr_k=k, ndcg_k=k, recall_ks=(k, 2 * k))
    except ValueError:  # no relevant passage anywhere (or a run of pid 0 only): refused by both
        with pytest.raises(ValueError):
            evaluate(ranking, qrels, mrr_k=k, ndcg_k=k, recall_ks=(k, 2 * k))
        return
    assert_same(evaluate(ranking, qrels, mrr_k=k, ndcg_k=k, recall_ks=(k, 2 * k)), ours)
