"""Training examples -> global batches of texts, shuffled with a seed, each host reading its rows.

Formats (colbert-ai's, `colbert/data/examples.py`):
- JSONL, one example per line: `[qid, pid+, pid-, ...]` or, with teacher scores for distillation,
  `[qid, [pid, score], [pid, score], ...]` (the first entry is the positive / best);
- TSV: `qid \\t pid+ \\t pid- ...` (integer ids).
Each example uses its first `nway` passages, as colbert-ai does; an example with fewer is an error naming
its line. Queries come from a TSV/JSONL file, passages from a collection (by the collection's pids).

The file is scanned once (validation, line offsets); examples are then read back by offset. The input
pipeline is Grain's (deterministic, random access, an iterator whose position Orbax checkpoints): step s
uses global batch s, `bsize` example indices drawn from a seeded shuffle of epoch s // steps_per_epoch,
the same on every host whatever the number of hosts. Each host reads only the examples at its rows of
the global batch (where the mesh puts them, `loop.py`), so N hosts train on exactly what one would, and
all agree on the number of steps (a trailing partial batch is dropped everywhere).
"""

from __future__ import annotations

import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path

import grain
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
    """Texts of (a host's part of) a global batch: queries [b], passages [b * nway] (query-major), scores or None."""

    queries: list[str]
    passages: list[str]
    scores: np.ndarray | None  # float32 [b, nway]


class TrainingData:
    """Examples + queries + collection, served as global batches in a seeded order (see the module doc)."""

    def __init__(self, triples, queries, collection, *, nway: int, seed: int, shuffle: bool):
        for name, path in (("triples", triples), ("queries", queries), ("collection", collection)):
            if path is None:
                raise DataError(f"the config names no {name} file (colbert.{name})")
            if not Path(path).is_file():
                raise DataError(f"{name} file not found: {path}")
        if not 0 <= seed < 2**32:
            raise DataError(f"the seed must be in [0, 2**32) (got {seed})")
        self.examples = Examples(triples, nway)
        try:
            self.queries = load_queries(queries)
            self.collection = Collection.load(collection)
        except (ValueError, CollectionError) as e:
            raise DataError(str(e)) from None
        self._position_of = {int(p): i for i, p in enumerate(self.collection.pids)}
        self.nway, self.seed, self.shuffle = nway, seed, shuffle

    @property
    def has_scores(self) -> bool:
        return bool(self.examples.has_scores)

    def steps_per_epoch(self, bsize: int) -> int:
        """Global batches in one pass (a trailing partial batch is dropped, as colbert-ai does)."""
        steps = len(self.examples) // bsize
        if steps == 0:
            raise DataError(f"{self.examples.path}: {len(self.examples)} example(s) make no batch of bsize={bsize}")
        return steps

    def global_batches(self, bsize: int, epochs: int) -> grain.MapDataset:
        """Step s -> the example indices [bsize] of global batch s, for `epochs` passes: the same on every
        host whatever their number. Epoch e is shuffled with seed + e (Grain's index shuffle)."""
        self.steps_per_epoch(bsize)
        ds = grain.MapDataset.range(len(self.examples))
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed)
        return ds.batch(bsize, drop_remainder=True).repeat(epochs)

    def batches(
        self, bsize: int, epochs: int = 1, rows: np.ndarray | None = None, *, prefetch: int = 2
    ) -> grain.DatasetIterator:
        """Iterator over this host's part of each global batch: the examples at positions `rows` (sorted,
        default all) of it, read ahead by a thread. Its `get_state()`/`set_state()` (Orbax saves it with
        `grain.checkpoint.CheckpointSave`) is the position: {"next_index": steps consumed}."""
        rows = np.arange(bsize) if rows is None else np.asarray(rows)
        ds = self.global_batches(bsize, epochs).map(lambda idx: self.batch(idx[rows]))
        options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
        return iter(ds.to_iter_dataset(options))

    def batch(self, idx) -> Batch:
        """The texts (and scores) of examples `idx`, in that order."""
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
