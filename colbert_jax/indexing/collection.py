"""Collections: passages with their own integer ids, from a TSV or JSONL file or a list of texts.

- TSV (colbert-ai's format): `pid \\t passage [\\t title ...]`, read exactly as colbert-ai's
  `load_collection` reads it ("title | passage" when a third column exists); a first line whose pid field
  is `id` is a header and skipped.
- JSONL: one object per line with `text`, an integer id under `id`, `pid` or `_id` (BEIR), and an
  optional `title`; other keys are the passage's metadata fields (`colbert_jax.indexing.fields`: their names
  and value types are checked as the file is read, not once the index is encoded).
- A list of texts: ids 0..n-1.
A file is scanned once to validate every line and remember where it starts; text is then read back on
demand, so a collection larger than memory costs 16 bytes per passage. Errors name the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from array import array
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from colbert_jax.indexing.fields import RESERVED, FieldError, FieldSchema

__all__ = ["Collection", "CollectionError"]

UTF8_BOM = b"\xef\xbb\xbf"


class CollectionError(ValueError):
    """A collection file or list is unreadable, empty, or has a bad line."""


class Collection:
    """Passages addressed by position 0..N-1, each with its collection id (`pids[i]`)."""

    def __init__(
        self,
        pids: np.ndarray,
        *,
        texts: list[str] | None = None,
        path: Path | None = None,
        offsets: np.ndarray | None = None,
        fmt: str = "list",
        fingerprint: str = "",
        field_kinds: dict[str, str | None] | None = None,
    ):
        self.pids = pids
        self.field_kinds = field_kinds or {}  # metadata field -> "number" / "text" (None: only nulls)
        self._texts = texts
        self.path = path
        self._offsets = offsets
        self._format = fmt
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.pids)

    def __repr__(self) -> str:
        return f"Collection({self.source!r}, {len(self)} passages)"

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "<list of texts>"

    @property
    def location(self) -> str | None:
        """The collection file's absolute path (what an index records), or None for a list of texts."""
        return str(self.path.absolute()) if self.path else None

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, collection: str | os.PathLike | Sequence[str] | Collection) -> Collection:
        if isinstance(collection, Collection):
            return collection
        if isinstance(collection, (str, os.PathLike)):
            return cls.from_file(collection)
        if isinstance(collection, (list, tuple)):
            return cls.from_texts(collection)
        raise TypeError(f"collection must be a file path or a list of texts, got {type(collection).__name__}")

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> Collection:
        if len(texts) == 0:
            raise CollectionError("the collection is empty")
        h = hashlib.sha256()
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise CollectionError(f"passage {i} must be a str, got {type(t).__name__}")
            if not t.strip():
                raise CollectionError(f"passage {i} is empty")
            h.update(_utf8(t, f"passage {i}") + b"\0")
        return cls(np.arange(len(texts), dtype=np.int64), texts=list(texts), fingerprint=h.hexdigest())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Collection:
        path = Path(path)
        if not path.is_file():
            raise CollectionError(f"collection file not found: {path}")
        fmt = "jsonl" if path.suffix in (".jsonl", ".json") else "tsv"
        pids, offsets, lines = array("q"), array("q"), array("q")  # compact: 24 bytes a passage while scanning
        schema = FieldSchema()
        h = hashlib.sha256()
        lineno = 0
        try:
            with open(path, "rb") as f:
                offset = 0
                for lineno, raw in enumerate(f, 1):
                    h.update(raw)
                    start, offset = offset, offset + len(raw)
                    if lineno == 1 and raw.startswith(UTF8_BOM):  # editors on Windows write one
                        raw, start = raw[len(UTF8_BOM) :], start + len(UTF8_BOM)
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if not line.strip():
                        continue
                    if fmt == "tsv" and lineno == 1 and line.split("\t", 1)[0] == "id":
                        continue  # header row
                    if fmt == "jsonl":
                        pid, text, obj = _parse_json(line, f"{path}:{lineno}")
                        schema.add(_fields(obj), f"{path}:{lineno}")
                    else:
                        pid, text = _parse(line, fmt, path, lineno)
                    if not text.strip():
                        raise CollectionError(f"{path}:{lineno}: passage {pid} is empty")
                    pids.append(pid)
                    offsets.append(start)
                    lines.append(lineno)
        except UnicodeDecodeError as e:
            raise CollectionError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
        except OSError as e:
            raise CollectionError(f"cannot read collection {path}: {e}") from None
        except FieldError as e:  # here, not after hours of encoding when the fields are written
            raise CollectionError(str(e)) from None
        if not pids:
            raise CollectionError(f"the collection {path} is empty")
        pids_np = np.frombuffer(pids, np.int64)
        order = np.argsort(pids_np, kind="stable")
        dup = np.flatnonzero(pids_np[order[1:]] == pids_np[order[:-1]])
        if len(dup):
            first, second = sorted((lines[order[dup[0]]], lines[order[dup[0] + 1]]))
            raise CollectionError(f"{path}:{second}: duplicate pid {pids_np[order[dup[0]]]} (first on line {first})")
        return cls(
            pids_np.copy(),
            path=path,
            offsets=np.frombuffer(offsets, np.int64).copy(),
            fmt=fmt,
            fingerprint=h.hexdigest(),
            field_kinds=schema.kinds,
        )

    def check_unchanged(self) -> None:
        """Raises CollectionError where the file's contents differ from what was read (its sha256): texts are
        read back by offset, and an edit that kept the lines' places would give other texts unseen."""
        if self.path is None:
            return
        h = hashlib.sha256()
        try:
            with open(self.path, "rb") as f:
                for raw in f:
                    h.update(raw)
        except OSError as e:
            raise CollectionError(f"cannot read collection {self.path}: {e}") from None
        if h.hexdigest() != self.fingerprint:
            raise CollectionError(f"{self.path} changed while it was being indexed: index it again")

    # ----------------------------------------------------------------------------------------------
    def texts(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """The passages at positions `indices` (not pids), in that order."""
        if self._texts is not None:
            return [self._texts[i] for i in indices]
        out = []
        with open(self.path, "rb") as f:
            for i in indices:
                f.seek(int(self._offsets[i]))
                line = f.readline().decode("utf-8").rstrip("\r\n")
                pid, text = _parse(line, self._format, self.path, -1)
                if pid != self.pids[i]:  # the file was edited after it was read: its lines moved
                    raise CollectionError(
                        f"{self.path} changed while in use: passage {int(i)} should be pid {int(self.pids[i])}, "
                        f"the file now has pid {pid} there"
                    )
                out.append(text)
        return out

    def text_range(self, start: int, stop: int) -> list[str]:
        return self.texts(range(start, min(stop, len(self))))

    @property
    def may_have_fields(self) -> bool:
        """Whether passages can carry metadata fields (JSONL keys beyond id/text/title)."""
        return self._format == "jsonl"

    def fields(self, indices: Sequence[int] | np.ndarray) -> list[dict]:
        """The metadata fields (JSONL keys other than id/pid/_id/text/title) of the passages at `indices`."""
        if not self.may_have_fields:
            return [{} for _ in indices]
        out = []
        with open(self.path, "rb") as f:
            for i in indices:
                f.seek(int(self._offsets[i]))
                out.append(_fields(json.loads(f.readline().decode("utf-8"))))
        return out


def _fields(obj: dict) -> dict:
    """A JSONL object's metadata fields: its keys other than id/pid/_id/text/title."""
    return {k: v for k, v in obj.items() if k not in RESERVED}


def _parse(line: str, fmt: str, path: Path, lineno: int) -> tuple[int, str]:
    where = f"{path}:{lineno}" if lineno > 0 else str(path)
    if fmt == "tsv":
        fields = line.strip("\n\r ").split("\t")  # as colbert-ai's load_collection
        if "\r" in line.rstrip("\r\n"):  # colbert-ai (universal newlines) would read several passages here
            raise CollectionError(
                f"{where}: a carriage return inside the line (old Mac line endings?): convert the file to \\n or "
                "\\r\\n line endings"
            )
        if len(fields) < 2:
            raise CollectionError(f"{where}: expected 'pid<TAB>passage[<TAB>title]', found no tab")
        pid = _int_pid(fields[0], where)
        text = fields[1] if len(fields) == 2 else f"{fields[2]} | {fields[1]}"
        return pid, text
    pid, text, _ = _parse_json(line, where)
    return pid, text


def _parse_json(line: str, where: str) -> tuple[int, str, dict]:
    """(pid, text, the whole object) of a JSONL line."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CollectionError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise CollectionError(f"{where}: expected a JSON object")
    key = next((k for k in ("id", "pid", "_id") if k in obj), None)
    if key is None:
        raise CollectionError(f"{where}: no id (expected one of 'id', 'pid', '_id')")
    if not isinstance(obj.get("text"), str):
        raise CollectionError(f"{where}: no 'text' string")
    title = obj.get("title") or ""
    if not isinstance(title, str):
        raise CollectionError(f"{where}: 'title' must be a string")
    text = f"{title} | {obj['text']}" if title.strip() else obj["text"]
    _utf8(text, where)  # JSON's \ud800 escapes decode to lone surrogates: the encoder refused them hours later
    return _int_pid(obj[key], where), text, obj


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CollectionError(
            f"{where}: not valid Unicode (a lone surrogate {text[e.start]!r} at character {e.start})"
        ) from None


_PID = re.compile(r"\s*-?[0-9]+\s*")
_INT64 = (-(2**63), 2**63 - 1)


def _int_pid(value, where: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | str)
        or (
            isinstance(value, str) and not _PID.fullmatch(value)  # not "²" or "--5", which passed isdigit()
        )
    ):
        raise CollectionError(f"{where}: pid must be an integer, got {value!r}")
    pid = int(value)
    if not _INT64[0] <= pid <= _INT64[1]:
        raise CollectionError(f"{where}: pid {pid} is beyond 64-bit integers")
    return pid
