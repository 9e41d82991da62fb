"""Query files: colbert-ai's TSV (`qid \\t text`) or JSONL (`{"qid"|"_id"|"id": ..., "text"|"question": ...}`).

qids are ints when every qid is an integer (as colbert-ai reads them), strings otherwise.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["load_queries", "INTEGER"]

INTEGER = re.compile(r"-?[0-9]+")  # an id that colbert-ai reads as an int (not "²", "1_0" or "--1")


def canonical_id(x: object) -> str:
    """The form query and passage ids are matched in across files: an all-digit id without its leading zeros
    ('001' -> '1', as colbert-jax reads all-integer ids as integers), other ids as they are."""
    s = str(x)
    return str(int(s)) if INTEGER.fullmatch(s) else s


def load_queries(path: str | os.PathLike) -> dict:
    """Reads a queries file -> {qid: text}; a malformed file raises ValueError naming its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"queries file not found: {path}")
    rows: list[tuple[str, str]] = []
    jsonl = path.suffix in (".jsonl", ".json")
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            qid = next((obj[k] for k in ("qid", "_id", "id") if k in obj), None)
            text = next((obj[k] for k in ("text", "question", "query") if k in obj), None)
            if not isinstance(qid, (str, int, float)) or isinstance(qid, bool) or not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: expected a qid ('qid', '_id' or 'id') and a 'text'")
            rows.append((str(qid), text))
        else:
            fields = line.rstrip("\n\r").split("\t")
            if len(fields) < 2:
                raise ValueError(f"{path}:{lineno}: expected 'qid<TAB>query'")
            rows.append((fields[0], fields[1]))
    if not rows:
        raise ValueError(f"{path}: no queries")
    as_int = all(INTEGER.fullmatch(q) for q, _ in rows)
    queries = {}
    for qid, text in rows:
        key = int(qid) if as_int else qid
        if key in queries:
            raise ValueError(f"{path}: duplicate qid {qid}")
        queries[key] = text
    return queries


def text_lines(path: Path):
    """(line number, line) of a UTF-8 text file (a BOM is not part of the first line); bad UTF-8 is a
    ValueError naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            yield lineno, line
