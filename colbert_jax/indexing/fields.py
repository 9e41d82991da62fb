"""Passage metadata: JSONL fields beyond id/text/title, stored in SQLite inside the index, and `where=`
expressions over them.

Each part of an index (its base, each added segment) has its own `fields.sqlite`, written once: a table
`passages(row, pid, <one column per field>)`, `row` being the passage's row in that part. A `where`
expression is parsed by a small grammar (never handed to SQLite as text): comparisons of a field with a
literal (`=`, `!=`, `<>`, `<`, `<=`, `>`, `>=`, `LIKE`), `IN (literal, ...)`, `IS [NOT] NULL`, combined with
`AND`, `OR`, `NOT` and parentheses. It becomes SQL whose identifiers are the table's own columns (quoted)
and whose literals are bound parameters. A part without a field reads it as NULL.

Field names are identifiers, neither `row` nor `pid` (the table's own columns) and distinct ignoring case
(SQLite's names ignore it); a field holds numbers or text, never both (SQLite orders all text above all
numbers: `year >= 2020` would match "2019"). `FieldSchema` checks both as a collection is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "WhereError",
    "FieldError",
    "FieldSchema",
    "parse_where",
    "write_fields",
    "read_fields",
    "select_rows",
    "null_matches",
    "RESERVED",
    "INTERNAL",
]

RESERVED = frozenset({"id", "pid", "_id", "text", "title"})  # JSONL keys that are not fields
INTERNAL = frozenset({"row", "pid"})  # the table's own columns: no field may be named so, in any case
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TOKEN = re.compile(
    r"\s*(?:(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|(?P<str>'(?:[^']|'')*')|(?P<op><=|>=|<>|!=|==|=|<|>)"
    r"|(?P<punct>[(),])|(?P<word>[A-Za-z_][A-Za-z0-9_]*))"
)
_KEYWORDS = {"AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "TRUE", "FALSE"}


class WhereError(ValueError):
    """A `where` expression that does not parse or names an unknown field."""


class FieldError(ValueError):
    """Passage fields that cannot be stored: a bad or clashing name, or a field holding numbers and text."""


def _kind(value: Any) -> str | None:
    """How SQLite compares a stored value: "number", "text" (strings; lists and objects are stored as JSON
    text), or None (NULL)."""
    if value is None:
        return None
    return "number" if isinstance(value, bool | int | float) else "text"


def _check_storable(name: str, value: Any, where: str) -> None:
    """Raises FieldError for a value SQLite would refuse once the index is encoded (an integer beyond 64 bits,
    text with a lone surrogate) or store as another (NaN reads back as NULL)."""
    problem = None
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        problem = "an integer beyond 64 bits"
    elif isinstance(value, float) and not math.isfinite(value):
        problem = f"{value} (SQLite stores NaN as NULL)"
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            problem = "text that is not valid Unicode (a lone surrogate)"
    if problem:
        raise FieldError(f"{where}: passage field {name!r} holds {problem}, which its SQLite table cannot hold")


class FieldSchema:
    """The passage fields seen so far, checked passage by passage (`add`), so a collection's are refused as it
    is read, before any encoding: names (see the module docstring) and one kind of value per field."""

    def __init__(self, *, check_types: bool = True) -> None:
        self.check_types = check_types
        self.kinds: dict[str, str | None] = {}  # field -> "number" / "text" (None: only NULLs so far)
        self._first: dict[tuple[str, str], str] = {}  # (field, kind) -> where first seen, with the value
        self._folded: dict[str, tuple[str, str]] = {}  # lower-cased name -> (the field's name, where first seen)

    def add(self, fields: dict[str, Any], where: str) -> None:
        """Adds one passage's fields (`where` names it in errors); raises FieldError for a bad name, or for a
        value whose kind differs from the field's earlier values (`check_types`)."""
        for name, value in fields.items():
            if name not in self.kinds:
                self._new(name, where)
            _check_storable(name, value, where)
            kind = _kind(value)
            if kind is None or kind == self.kinds[name]:
                continue
            self._first.setdefault((name, kind), f"{where} has {value!r:.60}")
            if self.kinds[name] is None:
                self.kinds[name] = kind
            elif self.check_types:
                number, text = self._first[(name, "number")], self._first[(name, "text")]
                raise FieldError(
                    f"passage field {name!r} holds both numbers and text ({number}; {text}): SQLite orders all "
                    f"text above all numbers, so `where` comparisons on it would be wrong; give {name!r} one type "
                    'in every passage (e.g. 2019, not "2019")'
                )

    def _new(self, name: str, where: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise FieldError(f"{where}: passage field name {name!r} is not an identifier [A-Za-z_][A-Za-z0-9_]*")
        if name.lower() in INTERNAL:
            raise FieldError(
                f"{where}: passage field name {name!r} is reserved (the fields table's own columns are "
                f"{', '.join(sorted(INTERNAL))}, in any case): rename it"
            )
        other, first = self._folded.setdefault(name.lower(), (name, where))
        if other != name:
            raise FieldError(
                f"{where}: passage fields {other!r} (at {first}) and {name!r} differ only in case, which SQLite "
                "does not tell apart: rename one"
            )
        self.kinds[name] = None


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


def write_fields(
    path: Path,
    records: Iterable[tuple[int, int, dict[str, Any]]],
    *,
    columns: Iterable[str] = (),
    check_types: bool = True,
) -> list[str] | None:
    """Writes `fields.sqlite` at `path` from (row, pid, fields) records; returns its columns, or None (and no
    file) when there are none. columns: created even where no record has them. Raises FieldError as
    `FieldSchema` does (check_types=False: compaction folds what an index already holds, mixed or not)."""
    path.unlink(missing_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    schema = FieldSchema(check_types=check_types)
    created: list[str] = []
    try:
        con.execute("CREATE TABLE passages (row INTEGER PRIMARY KEY, pid INTEGER NOT NULL)")
        batch: list[tuple[int, int, dict]] = []

        def flush():
            for _, pid, f in batch:
                schema.add(f, f"pid {pid}")
            for name in schema.kinds:
                if name not in created:
                    con.execute(f'ALTER TABLE passages ADD COLUMN "{name}"')  # an identifier: FieldSchema checked
                    created.append(name)
            names = ["row", "pid", *created]
            quoted = ", ".join(f'"{n}"' for n in names)
            sql = f"INSERT INTO passages ({quoted}) VALUES ({', '.join('?' * len(names))})"
            con.executemany(sql, [(r, p, *(_value(f.get(c)) for c in created)) for r, p, f in batch])
            batch.clear()

        schema.add(dict.fromkeys(columns), "the index's fields")
        for record in records:
            batch.append(record)
            if len(batch) >= 10_000:
                flush()
        flush()
        con.execute("CREATE INDEX passages_pid ON passages (pid)")
        con.commit()
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    con.close()
    if not created:
        tmp.unlink()
        return None
    tmp.rename(path)
    return created


def _read_only(path: Path, read: Callable[[sqlite3.Connection], Any]) -> Any:
    """`read(connection)` of `fields.sqlite` at `path`, opened read-only. A missing file is FileNotFoundError
    (SQLite says only "unable to open database file"), so that `Index` tells a version whose files updates
    removed (IndexChangedError) from other errors."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return read(con)
        finally:
            con.close()
    except sqlite3.OperationalError:
        if not path.is_file():
            raise FileNotFoundError(f"passage fields file {path} is gone") from None
        raise


def column_kinds(path: Path, columns: list[str]) -> dict[str, str | None]:
    """The kind of value ("number", "text", None: only NULLs) each of `columns` holds in `fields.sqlite`."""

    def read(con: sqlite3.Connection) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name in columns:
            found = {t for (t,) in con.execute(f'SELECT DISTINCT typeof("{name}") FROM passages')} - {"null"}
            out[name] = "text" if found - {"integer", "real"} else ("number" if found else None)
        return out

    return _read_only(path, read)


def select_rows(path: Path, node: Node, columns: list[str], num_rows: int | None = None) -> np.ndarray:
    """Rows (int64, ascending) of the passages in `fields.sqlite` at `path` that satisfy `node`. num_rows:
    also rows 0..num_rows-1 the table lacks (all-NULL passages: pass it only where `null_matches(node)`)."""
    params: list = []
    sql = f"SELECT row FROM passages WHERE {_sql(node, set(columns), params)} ORDER BY row"

    def read(con: sqlite3.Connection) -> np.ndarray:
        rows = np.array([r for (r,) in con.execute(sql, params)], np.int64)
        if num_rows is not None:  # a compaction before every passage got a row wrote only those with fields
            present = np.array([r for (r,) in con.execute("SELECT row FROM passages")], np.int64)
            rows = np.union1d(rows, np.setdiff1d(np.arange(num_rows, dtype=np.int64), present))
        return rows

    return _read_only(path, read)


def null_matches(node: Node) -> bool:
    """Whether `node` holds for a passage without fields (every field NULL), by SQLite's own three-valued
    logic: `f IS NULL` does; `f = 1` and `NOT (f = 1)` do not (both are NULL)."""
    params: list = []
    sql = _sql(node, set(), params)  # no columns: every field reads as NULL
    con = sqlite3.connect(":memory:")
    try:
        (value,) = con.execute(f"SELECT {sql}", params).fetchone()
    finally:
        con.close()
    return bool(value)


def read_fields(path: Path) -> dict[int, dict[str, Any]]:
    """Every record of `fields.sqlite` at `path`: {row: {field: value}} (NULL fields left out)."""

    def read(con: sqlite3.Connection) -> dict[int, dict[str, Any]]:
        cur = con.execute("SELECT * FROM passages ORDER BY row")
        names = [d[0] for d in cur.description]
        return {r[0]: {n: v for n, v in zip(names[2:], r[2:]) if v is not None} for r in cur}

    return _read_only(path, read)
