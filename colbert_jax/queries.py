"""Query files: colbert-ai's TSV (`qid \\t text`) or JSONL (`{"qid"|"_id"|"id": ..., "text"|"question": ...}`).

qids are ints when every qid is an integer (as colbert-ai reads them), strings otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["load_queries"]


def load_queries(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"queries file not found: {path}")
    rows: list[tuple[str, str]] = []
    jsonl = path.suffix in (".jsonl", ".json")
    with open(path, encoding="utf-8-sig") as f:  # a BOM is not part of the first qid
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                qid = next((obj[k] for k in ("qid", "_id", "id") if k in obj), None)
                text = next((obj[k] for k in ("text", "question", "query") if k in obj), None)
                if qid is None or not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: expected a qid ('qid', '_id' or 'id') and a 'text'")
                rows.append((str(qid), text))
            else:
                fields = line.rstrip("\n\r").split("\t")
                if len(fields) < 2:
                    raise ValueError(f"{path}:{lineno}: expected 'qid<TAB>query'")
                rows.append((fields[0], fields[1]))
    if not rows:
        raise ValueError(f"{path}: no queries")
    as_int = all(q.lstrip("-").isdigit() for q, _ in rows)
    queries = {}
    for qid, text in rows:
        key = int(qid) if as_int else qid
        if key in queries:
            raise ValueError(f"{path}: duplicate qid {qid}")
        queries[key] = text
    return queries
