"""Training examples -> tokenised batches, streamed, shuffled with a seed, sharded per host.

Formats (colbert-ai's, `colbert/data/examples.py`):
- JSONL, one example per line: `[qid, pid+, pid-, ...]` or, with teacher scores for distillation,
  `[qid, [pid, score], [pid, score], ...]` (the first entry is the positive / best);
- TSV: `qid \\t pid+ \\t pid- ...` (integer ids).
Each example uses its first `nway` passages, as colbert-ai does; an example with fewer is an error naming
its line. Queries come from a TSV/JSONL file, passages from a collection (by the collection's pids).

The file is scanned once (validation, line offsets); examples are then read back by offset. Epoch e
visits examples in a permutation drawn from (seed, e); host h of H takes every H-th example of it, so
each host reads only its own lines. A position (epoch, index in the host's order) resumes exactly.
"""

from __future__ import annotations

import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from colbert_jax.indexing.collection import Collection, CollectionError
from colbert_jax.queries import load_queries

__all__ = ["Examples", "TrainingData", "Batch", "DataError"]


class DataError(ValueError):
    """A training file is missing or has a bad line."""


def _parse(line: str, jsonl: bool, where: str) -> tuple[int, list[int], list[float] | None]:
    if jsonl:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, list) or len(obj) < 2:
            raise DataError(f"{where}: expected a list [qid, pid, ...] or [qid, [pid, score], ...]")
        qid, *entries = obj
    else:
        qid, *entries = line.rstrip("\r\n").split("\t")
    try:
        qid = int(qid)
        if all(isinstance(e, list) for e in entries):
            if not all(len(e) == 2 for e in entries):
                raise ValueError
            return qid, [int(p) for p, _ in entries], [float(s) for _, s in entries]
        return qid, [int(p) for p in entries], None
    except (TypeError, ValueError):
        raise DataError(f"{where}: ids must be integers (and scores numbers)") from None


class Examples:
    """Training examples of a file, validated once, read back by line offset."""

    def __init__(self, path: str | os.PathLike, nway: int):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"training examples file not found: {self.path}")
        self.nway = nway
        self.jsonl = self.path.suffix in (".jsonl", ".json")
        offsets, lines = array("q"), array("q")
        self.has_scores = None
        offset = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                start, offset = offset, offset + len(raw)
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                _, pids, scores = _parse(text, self.jsonl, f"{self.path}:{lineno}")
                if len(pids) < nway:
                    raise DataError(f"{self.path}:{lineno}: the example has {len(pids)} passage(s) but nway={nway}")
                if self.has_scores is None:
                    self.has_scores = scores is not None
                elif self.has_scores != (scores is not None):
                    raise DataError(f"{self.path}:{lineno}: mixes examples with and without teacher scores")
                offsets.append(start)
                lines.append(lineno)
        if not offsets:
            raise DataError(f"{self.path}: no training examples")
        self._offsets = np.frombuffer(offsets, np.int64).copy()
        self._lines = np.frombuffer(lines, np.int64).copy()

    def __len__(self) -> int:
        return len(self._offsets)

    def read(self, indices) -> list[tuple[int, int, list[int], list[float] | None]]:
        """(line number, qid, first nway pids, their scores or None) of examples `indices`."""
        out = []
        with open(self.path, "rb") as f:
            for i in indices:
                f.seek(int(self._offsets[i]))
                qid, pids, scores = _parse(f.readline().decode("utf-8"), self.jsonl, str(self.path))
                out.append(
                    (int(self._lines[i]), qid, pids[: self.nway], None if scores is None else scores[: self.nway])
                )
        return out


@dataclass
class Batch:
    """Texts of one host's part of a step: queries [b], passages [b * nway] (query-major), scores or None."""

    queries: list[str]
    passages: list[str]
    scores: np.ndarray | None  # float32 [b, nway]


class TrainingData:
    """Examples + queries + collection, iterated in (seeded) shuffled order, this host's share only."""

    def __init__(
        self,
        triples,
        queries,
        collection,
        *,
        nway: int,
        seed: int,
        shuffle: bool,
        process_index: int = 0,
        process_count: int = 1,
    ):
        for name, path in (("triples", triples), ("queries", queries), ("collection", collection)):
            if path is None:
                raise DataError(f"the config names no {name} file (colbert.{name})")
            if not Path(path).is_file():
                raise DataError(f"{name} file not found: {path}")
        self.examples = Examples(triples, nway)
        try:
            self.queries = load_queries(queries)
            self.collection = Collection.load(collection)
        except (ValueError, CollectionError) as e:
            raise DataError(str(e)) from None
        self._position_of = {int(p): i for i, p in enumerate(self.collection.pids)}
        self.nway, self.seed, self.shuffle = nway, seed, shuffle
        self.process_index, self.process_count = process_index, process_count

    @property
    def has_scores(self) -> bool:
        return bool(self.examples.has_scores)

    def order(self, epoch: int) -> np.ndarray:
        """This host's example indices for an epoch."""
        n = len(self.examples)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.process_index :: self.process_count]

    def batches(self, per_host: int, epoch: int = 0, position: int = 0, epochs: int = 1):
        """Yields ((epoch, position after this batch), Batch) until `epochs` passes are done; a trailing
        partial batch is dropped, as colbert-ai does."""
        while epoch < epochs:
            order = self.order(epoch)
            while position + per_host <= len(order):
                idx = order[position : position + per_host]
                position += per_host
                yield (epoch, position), self._batch(idx)
            epoch, position = epoch + 1, 0

    def _batch(self, idx) -> Batch:
        queries, pids, scores = [], [], []
        for lineno, qid, example_pids, example_scores in self.examples.read(idx):
            where = f"{self.examples.path}:{lineno}"
            if qid not in self.queries:
                raise DataError(f"{where}: qid {qid} is not in the queries file")
            missing = [p for p in example_pids if p not in self._position_of]
            if missing:
                raise DataError(f"{where}: pid {missing[0]} is not in the collection")
            queries.append(self.queries[qid])
            pids.extend(example_pids)
            if example_scores is not None:
                scores.append(example_scores)
        passages = self.collection.texts([self._position_of[p] for p in pids])
        return Batch(queries, passages, np.asarray(scores, np.float32) if scores else None)
