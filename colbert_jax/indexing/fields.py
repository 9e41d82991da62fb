"""Passage metadata: JSONL fields beyond id/text/title, stored in SQLite inside the index, and `where=`
expressions over them.

Each part of an index (its base, each added segment) has its own `fields.sqlite`, written once: a table
`passages(row, pid, <one column per field>)`, `row` being the passage's row in that part. A `where`
expression is parsed by a small grammar (never handed to SQLite as text): comparisons of a field with a
literal (`=`, `!=`, `<>`, `<`, `<=`, `>`, `>=`, `LIKE`), `IN (literal, ...)`, `IS [NOT] NULL`, combined with
`AND`, `OR`, `NOT` and parentheses. It becomes SQL whose identifiers are the table's own columns (quoted)
and whose literals are bound parameters. A part without a field reads it as NULL.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["WhereError", "parse_where", "write_fields", "read_fields", "select_rows", "RESERVED"]

RESERVED = frozenset({"id", "pid", "_id", "text", "title"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|(?P<str>'(?:[^']|'')*')|(?P<op><=|>=|<>|!=|==|=|<|>)"
    r"|(?P<punct>[(),])|(?P<word>[A-Za-z_][A-Za-z0-9_]*))"
)
_KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "TRUE", "FALSE"}


class WhereError(ValueError):
    """A `where` expression that does not parse or names an unknown field."""


@dataclasses.dataclass(frozen=True)
class Node:
    """A parsed expression: kind is "and"/"or" (args: nodes), "not" (args: one node), "cmp" (field, op,
    values), "in" (field, values), "null" (field, negated)."""

    kind: str
    args: tuple = ()
    field: str = ""
    op: str = ""
    values: tuple = ()

    def fields(self) -> set[str]:
        return {self.field} if self.field else set().union(*(a.fields() for a in self.args))


def _tokens(text: str) -> list[tuple[str, Any]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise WhereError(f"where: unexpected {text[pos:].lstrip()[:20]!r} at character {pos}")
        pos = m.end()
        if m["num"] is not None:
            out.append(("lit", float(m["num"]) if any(c in m["num"] for c in ".eE") else int(m["num"])))
        elif m["str"] is not None:
            out.append(("lit", m["str"][1:-1].replace("''", "'")))
        elif m["op"] is not None:
            out.append(("op", "=" if m["op"] == "==" else "!=" if m["op"] == "<>" else m["op"]))
        elif m["punct"] is not None:
            out.append((m["punct"], m["punct"]))
        else:
            word = m["word"]
            upper = word.upper()
            if upper in ("TRUE", "FALSE"):
                out.append(("lit", int(upper == "TRUE")))
            elif upper in _KEYWORDS:
                out.append((upper, upper))
            else:
                out.append(("name", word))
    return out


def parse_where(text: str) -> Node:
    """Parses a where expression (grammar in the module docstring); raises `WhereError` saying what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise WhereError("where: empty expression")
    toks = _tokens(text)
    pos = 0

    def peek(*kinds):
        return pos < len(toks) and toks[pos][0] in kinds

    def take(kind, what):
        nonlocal pos
        if not peek(kind):
            found = repr(toks[pos][1]) if pos < len(toks) else "the end"
            raise WhereError(f"where: expected {what}, found {found} in {text!r}")
        pos += 1
        return toks[pos - 1][1]

    def disjunction():
        nonlocal pos
        args = [conjunction()]
        while peek("OR"):
            pos += 1
            args.append(conjunction())
        return args[0] if len(args) == 1 else Node("or", tuple(args))

    def conjunction():
        nonlocal pos
        args = [negation()]
        while peek("AND"):
            pos += 1
            args.append(negation())
        return args[0] if len(args) == 1 else Node("and", tuple(args))

    def negation():
        nonlocal pos
        if peek("NOT"):
            pos += 1
            return Node("not", (negation(),))
        if peek("("):
            pos += 1
            node = disjunction()
            take(")", "')'")
            return node
        return comparison()

    def comparison():
        nonlocal pos
        field = take("name", "a field name")
        if peek("op"):
            return Node("cmp", field=field, op=take("op", "an operator"), values=(take("lit", "a literal"),))
        if peek("LIKE"):
            pos += 1
            return Node("cmp", field=field, op="LIKE", values=(take("lit", "a string"),))
        if peek("IS"):
            pos += 1
            negated = peek("NOT")
            pos += negated
            take("NULL", "NULL")
            return Node("null", field=field, op="IS NOT NULL" if negated else "IS NULL")
        negated = peek("NOT")
        pos += negated
        if peek("IN"):
            pos += 1
            take("(", "'('")
            values = [take("lit", "a literal")]
            while peek(","):
                pos += 1
                values.append(take("lit", "a literal"))
            take(")", "')'")
            node = Node("in", field=field, values=tuple(values))
            return Node("not", (node,)) if negated else node
        found = repr(toks[pos][1]) if pos < len(toks) else "the end"
        raise WhereError(f"where: expected an operator after {field!r}, found {found} in {text!r}")

    node = disjunction()
    if pos != len(toks):
        raise WhereError(f"where: unexpected {toks[pos][1]!r} in {text!r}")
    return node


def _sql(node: Node, columns: set[str], params: list) -> str:
    """SQL for `node` (identifiers: only `columns`, quoted; a field not among them is NULL; literals bound)."""
    if node.kind in ("and", "or"):
        return "(" + f" {node.kind.upper()} ".join(_sql(a, columns, params) for a in node.args) + ")"
    if node.kind == "not":
        return f"(NOT {_sql(node.args[0], columns, params)})"
    column = f'"{node.field}"' if node.field in columns else "NULL"
    if node.kind == "null":
        return f"({column} {node.op})"
    params.extend(node.values)
    if node.kind == "in":
        return f"({column} IN ({', '.join('?' * len(node.values))}))"
    return f"({column} {node.op} ?)"


def _value(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if v is None or isinstance(v, int | float | str):
        return v
    return json.dumps(v, sort_keys=True)


def write_fields(path: Path, records: Iterable[tuple[int, int, dict[str, Any]]]) -> list[str] | None:
    """Writes `fields.sqlite` at `path` from (row, pid, fields) records; returns its columns, or None (and no
    file) when no record has a field. Field names must be identifiers ([A-Za-z_][A-Za-z0-9_]*)."""
    path.unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    columns: list[str] = []
    try:
        con.execute("CREATE TABLE passages (row INTEGER PRIMARY KEY, pid INTEGER NOT NULL)")
        batch: list[tuple[int, int, dict]] = []

        def flush():
            for _, _, f in batch:
                for name in f:
                    if name not in columns:
                        if not _NAME.match(name):
                            raise ValueError(f"passage field name {name!r} is not an identifier [A-Za-z_][A-Za-z0-9_]*")
                        con.execute(f'ALTER TABLE passages ADD COLUMN "{name}"')  # name checked just above
                        columns.append(name)
            names = ["row", "pid", *columns]
            quoted = ", ".join(f'"{n}"' for n in names)
            sql = f"INSERT INTO passages ({quoted}) VALUES ({', '.join('?' * len(names))})"
            con.executemany(sql, [(r, p, *(_value(f.get(c)) for c in columns)) for r, p, f in batch])
            batch.clear()

        for record in records:
            batch.append(record)
            if len(batch) >= 10_000:
                flush()
        flush()
        con.execute("CREATE INDEX passages_pid ON passages (pid)")
        con.commit()
    finally:
        con.close()
    if not columns:
        tmp.unlink()
        return None
    tmp.rename(path)
    return columns


def select_rows(path: Path, node: Node, columns: list[str]) -> np.ndarray:
    """Rows (int64, ascending) of the passages in `fields.sqlite` at `path` that satisfy `node`."""
    params: list = []
    sql = f"SELECT row FROM passages WHERE {_sql(node, set(columns), params)} ORDER BY row"
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return np.array([r for (r,) in con.execute(sql, params)], np.int64)
    finally:
        con.close()


def read_fields(path: Path) -> dict[int, dict[str, Any]]:
    """Every record of `fields.sqlite` at `path`: {row: {field: value}} (NULL fields left out)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cur = con.execute("SELECT * FROM passages ORDER BY row")
        names = [d[0] for d in cur.description]
        return {r[0]: {n: v for n, v in zip(names[2:], r[2:]) if v is not None} for r in cur}
    finally:
        con.close()
