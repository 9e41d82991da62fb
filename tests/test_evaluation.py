"""Metrics against hand-computed values, both qrels formats, and the evaluate command."""

import math
import subprocess
import sys

import pytest

from colbert_jax.evaluation import evaluate, load_qrels
from colbert_jax.search.ranking import Ranking


def ranking():
    return Ranking(
        {
            "q1": [(10, 1, 9.0), (11, 2, 8.0), (12, 3, 7.0)],  # relevant 11 (rel 1) at rank 2, 12 (rel 2) at 3
            "q2": [(20, 1, 5.0), (21, 2, 4.0)],  # relevant 29: not retrieved
            "q3": [(30, 1, 3.0)],  # relevant 30 at rank 1
        }
    )


QRELS = {"q1": {"11": 1, "12": 2}, "q2": {"29": 1}, "q3": {"30": 1}, "q4": {"40": 0}}  # q4: nothing relevant


def test_hand_computed_metrics():
    m = evaluate(ranking(), QRELS, mrr_k=10, ndcg_k=10, recall_ks=(1, 2, 3))
    assert m["judged_queries"] == 3 and m["ranked_judged_queries"] == 3
    assert m["MRR@10"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    assert m["Recall@1"] == pytest.approx((0 + 0 + 1) / 3)
    assert m["Recall@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["Recall@3"] == pytest.approx((1 + 0 + 1) / 3)
    dcg_q1 = 1 / math.log2(3) + 2 / math.log2(4)
    idcg_q1 = 2 / math.log2(2) + 1 / math.log2(3)
    assert m["nDCG@10"] == pytest.approx((dcg_q1 / idcg_q1 + 0 + 1) / 3)
    # cut-offs apply: MRR@1 only counts q3
    assert evaluate(ranking(), QRELS, mrr_k=1)["MRR@1"] == pytest.approx(1 / 3)
    # a judged query absent from the ranking counts as 0
    assert evaluate(Ranking({"q3": [(30, 1, 1.0)]}), QRELS)["MRR@10"] == pytest.approx(1 / 3)


def test_qrels_formats(tmp_path):
    msmarco = tmp_path / "qrels.tsv"
    msmarco.write_text("q1\t0\t11\t1\nq1\t0\t12\t2\nq2 0 29 1\n")
    beir = tmp_path / "qrels.beir.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\t11\t1\nq1\t12\t2\nq2\t29\t1\n")
    assert load_qrels(msmarco) == load_qrels(beir) == {"q1": {"11": 1, "12": 2}, "q2": {"29": 1}}
    bad = tmp_path / "bad.tsv"
    bad.write_text("q1 11\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        load_qrels(bad)


def test_evaluate_command(tmp_path):
    run = ranking().save(tmp_path / "run.tsv")
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("q1 0 11 1\nq1 0 12 2\nq2 0 29 1\nq3 0 30 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "colbert_jax.cli", "evaluate", "--ranking", str(run), "--qrels", str(qrels), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '"MRR@10": 0.5' in out
    missing = subprocess.run(
        [sys.executable, "-m", "colbert_jax.cli", "evaluate", "--ranking", str(tmp_path / "x"), "--qrels", str(qrels)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "ranking file not found" in missing.stderr
