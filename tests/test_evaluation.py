"""Metrics against hand-computed values, both qrels formats, and the evaluate command."""

import json
import math
import subprocess
import sys
import warnings

import pytest

from colbert_jax.evaluation import EvaluationWarning, evaluate, load_qrels, load_run, own_metrics
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
    with pytest.warns(EvaluationWarning, match="2 of the 3 judged queries are not in the ranking"):
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


def both(ranking, qrels, **ks):
    """evaluate's and own_metrics' figures, which must agree."""
    library, ours = evaluate(ranking, qrels, **ks), own_metrics(ranking, qrels, **ks)
    assert library == pytest.approx(ours)
    return library


def test_zero_padded_ids_match_across_run_and_qrels(tmp_path):
    """'001' in both files (the TSV reader once made it 1), and a run written by search ('1', pid 5) against
    qrels that say '001' and '005': the same queries and passages, MRR 1."""
    run = tmp_path / "run.tsv"
    run.write_text("001\t5\t1\t2.0\n002\t7\t1\t2.0\n")
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("001 0 5 1\n002 0 7 1\n")
    m = both(load_run(run), load_qrels(qrels), recall_ks=(1,))
    assert m["MRR@10"] == m["Recall@1"] == 1.0 and m["ranked_judged_queries"] == 2
    m = both(Ranking({1: [(5, 1, 2.0)], 2: [(7, 1, 2.0)]}), {"001": {"005": 1}, "002": {"7": 1}}, recall_ks=(1,))
    assert m["MRR@10"] == 1.0 and m["ranked_judged_queries"] == 2
    out = subprocess.run(
        [sys.executable, "-m", "colbert_jax.cli", "evaluate", "--ranking", str(run), "--qrels", str(qrels), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["MRR@10"] == 1.0 and "warning" not in out.stderr


def test_ids_that_collide_once_canonical_are_refused(tmp_path):
    with pytest.raises(ValueError, match="qids '1' and '01'"):
        evaluate({"1": [(5, 1, 1.0)]}, {"1": {"5": 1}, "01": {"5": 1}})
    with pytest.raises(ValueError, match="pids '5' and '05'"):
        own_metrics({"1": [(5, 1, 1.0)]}, {"1": {"5": 1}, "2": {"05": 1}})
    run = tmp_path / "run.tsv"
    run.write_text("1\t5\t1\t2.0\n01\t6\t1\t2.0\n")  # Ranking.load would merge both into query 1
    with pytest.raises(ValueError, match="qids '1' and '01'"):
        evaluate(load_run(run), {"1": {"5": 1}})


def test_judged_queries_missing_from_the_run_are_warned_of():
    with pytest.warns(EvaluationWarning, match=r"1 of the 2 judged queries are not in the ranking \(e.g. qid 'q2'\)"):
        m = both({"q1": [(5, 1, 1.0)]}, {"q1": {"5": 1}, "q2": {"6": 1}})
    assert m["MRR@10"] == 0.5 and m["ranked_judged_queries"] == 1
    with pytest.warns(EvaluationWarning, match=r"ERROR: none of the 1 judged.*qrels: e.g. 'q1'; ranking: e.g. '7'"):
        m = evaluate({7: [(5, 1, 1.0)]}, {"q1": {"5": 1}})
    assert m["MRR@10"] == 0.0 and m["ranked_judged_queries"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every judged query ranked: silence
        evaluate({"q1": [(5, 1, 1.0)]}, {"q1": {"5": 1}, "q2": {"6": 0}})


def test_duplicate_pids_count_at_their_first_rank():
    """pid 5 (relevant) at ranks 1 and 3: MRR 1, nDCG@3 1, Recall@2 1 (pytrec_eval kept rank 3: MRR 0.5;
    our own counted it twice: nDCG 1.5)."""
    with pytest.warns(EvaluationWarning, match="dropped 1 duplicate"):
        m = both({"q1": [(5, 1, 3.0), (6, 2, 2.0), (5, 3, 1.0)]}, {"q1": {"5": 1}}, ndcg_k=3, recall_ks=(2,))
    assert (m["MRR@10"], m["nDCG@3"], m["Recall@2"]) == pytest.approx((1.0, 1.0, 1.0))
    # two relevant, pid 5 listed twice (ranks given out of order): Recall@2 = 1/2, nDCG@3 = 1 / (1 + 1/log2(3))
    with pytest.warns(EvaluationWarning, match="dropped 1 duplicate"):
        m = both({"q1": [(5, 2, 2.0), (5, 1, 3.0)]}, {"q1": {"5": 1, "7": 1}}, ndcg_k=3, recall_ks=(2,))
    assert m["Recall@2"] == pytest.approx(0.5)
    assert m["nDCG@3"] == pytest.approx(1 / (1 + 1 / math.log2(3)))


@pytest.mark.parametrize("ks", [{"mrr_k": 0}, {"ndcg_k": -1}, {"recall_ks": (10, 0)}, {"mrr_k": 2.5}])
def test_cutoffs_below_one_are_refused(ks):
    name = next(iter(ks))
    for metrics in (evaluate, own_metrics):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            metrics({"q1": [(5, 1, 1.0)]}, {"q1": {"5": 1}}, **ks)


def test_qrels_with_int_keys():
    m = both({1: [(6, 1, 2.0), (5, 2, 1.0)]}, {1: {5: 1}}, recall_ks=(1, 2))
    assert (m["MRR@10"], m["Recall@1"], m["Recall@2"]) == pytest.approx((0.5, 0.0, 1.0))


def test_conflicting_qrels_lines_are_refused(tmp_path):
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("1 0 5 2\n1 0 5 2\n")  # an identical repeat is harmless
    assert load_qrels(qrels) == {"1": {"5": 2}}
    qrels.write_text("1 0 5 2\n1 0 6 1\n1 0 5 0\n")
    with pytest.raises(
        ValueError, match=r"qrels.txt:3: query '1', passage '5' is judged twice, with relevance 2 and 0"
    ):
        load_qrels(qrels)


def test_tab_separated_trec_run(tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("q1\tQ0\td1\t2\t1.0\tx\nq1\tQ0\td2\t1\t2.0\tx\n")
    assert load_run(run) == {"q1": [("d2", 1, 2.0), ("d1", 2, 1.0)]}
    assert both(load_run(run), {"q1": {"d1": 1}})["MRR@10"] == 0.5
