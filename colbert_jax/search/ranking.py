"""`Ranking`: search results as (qid, pid, rank, score), saved and loaded in colbert-ai's TSV format.

A ranking file has one line per result, `qid \\t pid \\t rank \\t score` (ranks from 1), queries in their
original order, results best first, as colbert-ai's `Ranking.save` writes it; provenance goes to
`<path>.meta` as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from colbert_jax import io

__all__ = ["Ranking"]


class Ranking:
    """Results per query: `{qid: [(pid, rank, score), ...]}`, iterated as (qid, pid, rank, score)."""

    def __init__(self, data: dict[Any, list[tuple[int, int, float]]], provenance: dict[str, Any] | None = None):
        self.data = dict(data)
        self.provenance = dict(provenance or {})

    def __iter__(self) -> Iterator[tuple[Any, int, int, float]]:
        for qid, results in self.data.items():
            for pid, rank, score in results:
                yield qid, pid, rank, score

    def __len__(self) -> int:
        return sum(len(r) for r in self.data.values())

    def __getitem__(self, qid) -> list[tuple[int, int, float]]:
        return self.data[qid]

    def __repr__(self) -> str:
        return f"Ranking({len(self.data)} queries, {len(self)} results)"

    def todict(self) -> dict[Any, list[tuple[int, int, float]]]:
        return dict(self.data)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the TSV (and `<path>.meta`), each atomically (the provenance first: a kill between the two
        leaves the new provenance beside the old results, never new results beside a stale record)."""
        path = Path(path)
        written: dict[str, Any] = {}
        for qid in self.data:
            text = str(qid)
            if any(c in text for c in "\t\n\r"):
                raise ValueError(f"qid {qid!r} holds a tab or line break: a ranking TSV cannot hold it")
            if written.setdefault(text, qid) != qid:  # 1 and "1": one query once written
                raise ValueError(f"qids {written[text]!r} and {qid!r} are written alike ({text!r}): rename one")
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_text(path.with_name(path.name + ".meta"), json.dumps(self.provenance, indent=2, default=str) + "\n")
        with io.atomic_file(path) as f:
            for qid, pid, rank, score in self:
                f.write(f"{qid}\t{pid}\t{rank}\t{score}\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ranking:
        """Reads a ranking TSV (`qid \\t pid \\t rank [\\t score]`); qids stay strings unless all are integers."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ranking file not found: {path}")
        from colbert_jax.queries import INTEGER, text_lines

        rows: list[tuple[str, int, int, float]] = []
        for lineno, line in text_lines(path):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) < 3:
                raise ValueError(f"{path}:{lineno}: expected 'qid<TAB>pid<TAB>rank[<TAB>score]'")
            try:
                score = float(fields[3]) if len(fields) > 3 else 0.0
                rows.append((fields[0], int(fields[1]), int(fields[2]), score))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: pid and rank must be integers, score a number") from None
        as_int = all(INTEGER.fullmatch(q) for q, *_ in rows)
        data: dict[Any, list[tuple[int, int, float]]] = {}
        spelled: dict[Any, str] = {}
        for qid, pid, rank, score in rows:
            key = int(qid) if as_int else qid
            if spelled.setdefault(key, qid) != qid:  # '1' and '001' would be one query, their hits mixed
                raise ValueError(
                    f"{path}: qids {spelled[key]!r} and {qid!r} are the same integer {key}: rename one (integer "
                    "qids are read as integers)"
                )
            data.setdefault(key, []).append((pid, rank, score))
        meta = path.with_name(path.name + ".meta")
        try:
            provenance = json.loads(meta.read_text()) if meta.is_file() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta}: not valid JSON: {e}") from None
        return cls(data, provenance)
