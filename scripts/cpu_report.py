"""Issue 14's CPU bars, judged from the JSON files `scripts/cpu_check.sh` collects on one machine.

    python scripts/cpu_report.py --results DIR [--out DIR/report.md]

DIR holds what the benchmarks wrote with --json: encoder.json (`bench_encoder.py`), scale.json
(`bench_scale.py`, engine "plaid"), parts.json (`bench_cpu_parts.py` on the 100x index) and heldout.json
(`bench_search.py` on the held-out collection), plus cpu.txt (the CPU's name and flags) and peak.txt
(`bench_cpu_peak.py`'s table), each optional. Prints (and writes) a markdown report: the CPU, what
`query_quantization="auto"` took, and one row per bar with its measured value (medians over repeats, ratios of
medians, as the benchmarks print them) and whether it is met.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# `native.query_products_by_speed()` names -> `bench_encoder.py` rows.
ENCODER_ROWS = {"int8": "int8", "bf16": "bf16 products", "int16": "int16 products", "none": "float32"}


@dataclass(frozen=True)
class Bar:
    """One of issue 14's bars: `value` against `limit`, met when at least (`at_least`) or at most the limit."""

    name: str
    value: float
    limit: float
    at_least: bool
    detail: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.at_least else self.value <= self.limit


def _median(values: list[float]) -> float:
    return float(np.median(values))


def scale_bars(rows: list[dict], engine: str = "plaid") -> list[Bar]:
    """Batched queries/s at least 3x colbert-ai's and single-query latency at most 0.5x, at every scale."""
    bars = []
    for row in rows:
        ours, ref = row.get(engine), row.get("colbert-ai")
        if not ours or not ref:
            continue
        qps = _median([r["batched_qps"] for r in ours]) / _median([r["batched_qps"] for r in ref])
        lat = _median([r["single_p50_ms"] for r in ours]) / _median([r["single_p50_ms"] for r in ref])
        lo, hi = min(r["batched_qps"] for r in ours), max(r["batched_qps"] for r in ours)
        spread = f"{len(ours)} run(s), ours {lo:.1f}-{hi:.1f} q/s"
        bars.append(Bar(f"batched, {row['factor']}x", qps, 3.0, True, spread))
        bars.append(Bar(f"single-query latency, {row['factor']}x", lat, 0.5, False))
    return bars


def encoder_bars(report: dict) -> list[Bar]:
    """Query encoding by `auto`'s choice at most 0.6x colbert-ai's time, single and batched."""
    runs, ref = report["runs"], report["runs"].get("colbert-ai")
    row = ENCODER_ROWS[report["auto"]["order"][0]]
    if not ref or row not in runs:
        return []
    bars = []
    for key, what in (("single_ms", "single query"), ("batched_ms", "batched")):
        ratio = _median([r[key] for r in runs[row]]) / _median([r[key] for r in ref])
        bars.append(Bar(f"encoding, {what} ({row})", ratio, 0.6, False))
    quality = report.get("quality", {}).get(row)
    if quality and row != "float32":
        bars.append(Bar(f"encoder cosine to float32 ({row}), worst query", quality["worst_cosine"], 0.999, True))
        bars.append(Bar(f"encoder PLAID overlap@10 with float32 ({row})", quality["overlap_at_10"], 0.99, True))
    return bars


def parts_bars(report: dict) -> list[Bar]:
    """Retrieval alone for one pre-encoded query under 10 ms on the largest index."""
    entries = [e for e in report["indexes"] if e["engine"] == "plaid"]
    if not entries:
        return []
    largest = max(entries, key=lambda e: e["embeddings"])
    ms = largest["single_p50_ms"]
    detail = f"{Path(largest['index']).name}, {largest['embeddings']:,} embeddings, {min(ms):.2f}-{max(ms):.2f} ms"
    return [Bar("retrieval alone, one query, largest index (ms)", _median(ms), 10.0, False, detail)]


def heldout_bars(report: dict) -> list[Bar]:
    """The held-out collection at k=10 and k=100: batched at least 3x, latency at most 0.5x."""
    ours, ref = report.get("ours"), report.get("colbert-ai")
    if not ours or not ref:
        return []
    bars = []
    for k in ("10", "100"):
        bars.append(Bar(f"held-out batched, k={k}", ours["batched_qps"][k] / ref["batched_qps"][k], 3.0, True))
        lat = ours["single_ms"][k]["p50"] / ref["single_ms"][k]["p50"]
        bars.append(Bar(f"held-out single-query latency, k={k}", lat, 0.5, False))
    return bars


def report(results: Path) -> str:
    """The markdown report of every bar whose file is in `results`."""
    load = lambda name: json.loads((results / name).read_text()) if (results / name).exists() else None  # noqa: E731
    lines = ["# Issue 14's CPU bars on this machine", ""]
    if (results / "cpu.txt").exists():
        lines += ["```", (results / "cpu.txt").read_text().strip(), "```", ""]
    encoder = load("encoder.json")
    if encoder:
        a = encoder["auto"]
        lines += [
            f'`query_quantization="auto"` took **{a["order"][0]}** (order {", ".join(a["order"])}; measured rates '
            f"over float32: int8 {a['int8_over_f32_rate']:.2f}, bf16 {a['bf16_over_f32_rate']:.2f}, int16 "
            f"{a.get('int16_over_f32_rate', 0.0):.2f}; AMX tiles {a['amx_tiles']}).",
            "",
        ]
    bars: list[Bar] = []
    for name, judge in (
        ("scale.json", scale_bars),
        ("encoder.json", encoder_bars),
        ("parts.json", parts_bars),
        ("heldout.json", heldout_bars),
    ):
        data = load(name)
        if data is not None:
            bars += judge(data)
    lines += ["| bar | measured | limit | met | |", "|---|---|---|---|---|"]
    for b in bars:
        sign = ">=" if b.at_least else "<="
        value = f"1 - {1 - b.value:.1e}" if "cosine" in b.name else f"{b.value:.4g}"  # cosines are 1 - 1e-5
        lines.append(f"| {b.name} | {value} | {sign} {b.limit:g} | {'yes' if b.met else '**no**'} | {b.detail} |")
    heldout = load("heldout.json")
    if heldout and "quality" in heldout:
        q = heldout["quality"]
        lines += ["", "Held-out overlap@10: " + ", ".join(f"{k} {v:.3f}" for k, v in q.items())]
    met = sum(b.met for b in bars)
    lines += ["", f"{met} of {len(bars)} bars met."]
    if (results / "peak.txt").exists():
        lines += ["", "## This CPU's peaks (`bench_cpu_peak.py`)", "", (results / "peak.txt").read_text().strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", required=True, help="directory of the benchmarks' JSON files")
    ap.add_argument("--out", help="write the report here too (default: RESULTS/report.md)")
    args = ap.parse_args()
    text = report(Path(args.results))
    Path(args.out or Path(args.results) / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
