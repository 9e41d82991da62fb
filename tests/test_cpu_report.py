"""`scripts/cpu_report.py`: issue 14's bars judged from the benchmarks' JSON, as `cpu_check.sh` collects them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import cpu_report  # noqa: E402


def _runs(*pairs):
    return [{"batched_qps": q, "single_p50_ms": ms} for q, ms in pairs]


def _write(d: Path) -> None:
    scale = [
        # 1x: ours 300 q/s (median of 280, 300, 330) against 100 -> 3.0 met; latency 5 / 12 met.
        {
            "factor": 1,
            "plaid": _runs((280, 5), (300, 4), (330, 6)),
            "colbert-ai": _runs((90, 12), (100, 12), (110, 11)),
        },
        # 100x: 2.5x, not met; latency 0.6, not met.
        {"factor": 100, "plaid": _runs((150, 18)), "colbert-ai": _runs((60, 30))},
    ]
    encoder = {
        "cpu": "test",
        "auto": {"int8_over_f32_rate": 2.1, "bf16_over_f32_rate": 2.0, "amx_tiles": False, "order": ["bf16", "none"]},
        "runs": {
            "float32": [{"single_ms": 4.0, "batched_ms": 2.0}],
            "bf16 products": [{"single_ms": 3.0, "batched_ms": 1.0}, {"single_ms": 3.2, "batched_ms": 1.2}],
            "colbert-ai": [{"single_ms": 10.0, "batched_ms": 2.0}],
        },
        "quality": {"bf16 products": {"worst_cosine": 0.99998, "overlap_at_10": 0.985}},
    }
    parts = {
        "encode_one_query_ms": 3.0,
        "k": 10,
        "indexes": [
            {"index": "/x/ours1", "embeddings": 10, "engine": "plaid", "batched_qps": [900.0], "single_p50_ms": [1.0]},
            {
                "index": "/x/ours100",
                "embeddings": 1000,
                "engine": "plaid",
                "batched_qps": [90.0],
                "single_p50_ms": [12.0, 8.0, 9.0],
            },
        ],
    }
    heldout = {
        "ours": {"batched_qps": {"10": 400.0, "100": 200.0}, "single_ms": {"10": {"p50": 5.0}, "100": {"p50": 8.0}}},
        "colbert-ai": {
            "batched_qps": {"10": 100.0, "100": 80.0},
            "single_ms": {"10": {"p50": 15.0}, "100": {"p50": 20.0}},
        },
        "quality": {"ours_vs_exact": 0.75, "colbert-ai_vs_exact": 0.79, "ours_vs_colbert-ai": 0.81},
    }
    for name, data in (
        ("scale.json", scale),
        ("encoder.json", encoder),
        ("parts.json", parts),
        ("heldout.json", heldout),
    ):
        (d / name).write_text(json.dumps(data))


def test_bars_are_ratios_of_medians_judged_against_issue_14s_limits(tmp_path):
    _write(tmp_path)
    load = lambda name: json.loads((tmp_path / name).read_text())  # noqa: E731
    scale = {b.name: b for b in cpu_report.scale_bars(load("scale.json"))}
    assert scale["batched, 1x"].value == 3.0 and scale["batched, 1x"].met
    assert abs(scale["single-query latency, 1x"].value - 5 / 12) < 1e-12 and scale["single-query latency, 1x"].met
    assert scale["batched, 100x"].value == 2.5 and not scale["batched, 100x"].met
    assert not scale["single-query latency, 100x"].met

    # auto took bf16, so its row is judged (not float32's); medians over the two runs.
    enc = {b.name: b for b in cpu_report.encoder_bars(load("encoder.json"))}
    assert abs(enc["encoding, single query (bf16 products)"].value - 0.31) < 1e-12
    assert abs(enc["encoding, batched (bf16 products)"].value - 0.55) < 1e-12
    assert enc["encoding, batched (bf16 products)"].met
    assert not enc["encoder PLAID overlap@10 with float32 (bf16 products)"].met  # 0.985 < 0.99

    (parts,) = cpu_report.parts_bars(load("parts.json"))
    assert parts.value == 9.0 and parts.met and "ours100" in parts.detail  # the largest index, median of three

    held = {b.name: b for b in cpu_report.heldout_bars(load("heldout.json"))}
    assert held["held-out batched, k=10"].value == 4.0 and held["held-out batched, k=10"].met
    assert held["held-out batched, k=100"].value == 2.5 and not held["held-out batched, k=100"].met

    text = cpu_report.report(tmp_path)
    assert "took **bf16**" in text
    assert "9 of 13 bars met." in text, text
    assert "ours_vs_colbert-ai 0.810" in text
    assert "| encoder cosine to float32 (bf16 products), worst query | 1 - 2.0e-05 |" in text
