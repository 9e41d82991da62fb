"""Training configs and data: every config file loads, overrides, formats, host shards, resume positions."""

import json
from pathlib import Path

import numpy as np
import pytest

from colbert_jax.config import ConfigError
from colbert_jax.training.config import TrainConfig
from colbert_jax.training.data import DataError, Examples, TrainingData

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "fixtures" / "training"
COLLECTION = REPO / "tests" / "fixtures" / "collections" / "stdlib_2k.tsv"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    config = TrainConfig.load(path)
    assert config.colbert.maxsteps > 0 and config.colbert.triples


def test_overrides():
    c = TrainConfig.load(REPO / "configs" / "tiny.yaml", ["lr=1e-5", "train.seed=7", "bsize=16", "train.mesh.model=2"])
    assert (c.colbert.lr, c.train.seed, c.colbert.bsize, c.train.mesh.model) == (1e-5, 7, 16, 2)
    with pytest.raises(ConfigError, match="unknown config key 'lrr'"):
        TrainConfig.load(REPO / "configs" / "tiny.yaml", ["lrr=1"])
    with pytest.raises(ConfigError, match="bad value for 'nway'"):
        TrainConfig.load(REPO / "configs" / "tiny.yaml", ["nway=0"])
    with pytest.raises(ConfigError, match="unknown section"):
        TrainConfig.from_dict({"colbert": {}, "optimizer": {}})
    with pytest.raises(ConfigError, match=r"\[train\].*unknown config key 'sed'"):
        TrainConfig.from_dict({"train": {"sed": 1}})


def test_examples_formats(tmp_path):
    ex = Examples(DATA / "triples.jsonl", nway=2)
    assert len(ex) == 1200 and not ex.has_scores
    line, qid, pids, scores = ex.read([0])[0]
    assert (line, qid, scores) == (1, 0, None) and len(pids) == 2
    distill = Examples(DATA / "distill.jsonl", nway=3)
    _, _, pids, scores = distill.read([1])[0]
    assert distill.has_scores and len(pids) == len(scores) == 3  # the first nway of four
    tsv = tmp_path / "t.tsv"
    tsv.write_text("0\t737\t734\n1\t1667\t1628\n")
    assert Examples(tsv, nway=2).read([1])[0][1:3] == (1, [1667, 1628])


@pytest.mark.parametrize(
    "content,nway,message",
    [
        ("[0, 1, 2]\n[1, 5]\n", 2, r"t.jsonl:2: the example has 1 passage\(s\) but nway=2"),
        ("[0, 1, 2]\n{bad json\n", 2, r"t.jsonl:2: not valid JSON"),
        ('[0, 1, 2]\n[1, "x", 2]\n', 2, r"t.jsonl:2: ids must be integers"),
        ("[0, [1, 0.5], [2, 0.1]]\n[1, 3, 4]\n", 2, r"t.jsonl:2: mixes examples with and without teacher scores"),
        ("", 2, "no training examples"),
    ],
)
def test_bad_examples(tmp_path, content, nway, message):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        Examples(path, nway=nway)


def test_missing_files_and_ids(tmp_path):
    with pytest.raises(DataError, match="triples file not found"):
        TrainingData(tmp_path / "nope.jsonl", DATA / "queries.tsv", COLLECTION, nway=2, seed=0, shuffle=False)
    with pytest.raises(DataError, match="names no queries file"):
        TrainingData(DATA / "triples.jsonl", None, COLLECTION, nway=2, seed=0, shuffle=False)
    bad = tmp_path / "t.jsonl"
    bad.write_text("[0, 1, 2]\n[99999, 1, 2]\n")
    data = TrainingData(bad, DATA / "queries.tsv", COLLECTION, nway=2, seed=0, shuffle=False)
    with pytest.raises(DataError, match=r"t.jsonl:2: qid 99999 is not in the queries file"):
        list(data.batches(2))
    bad.write_text("[0, 1, 55555]\n")
    data = TrainingData(bad, DATA / "queries.tsv", COLLECTION, nway=2, seed=0, shuffle=False)
    with pytest.raises(DataError, match=r"t.jsonl:1: pid 55555 is not in the collection"):
        list(data.batches(1))


def test_shuffling_host_shards_and_positions():
    def make(process_index=0, process_count=1, shuffle=True):
        return TrainingData(
            DATA / "triples.jsonl",
            DATA / "queries.tsv",
            COLLECTION,
            nway=2,
            seed=5,
            shuffle=shuffle,
            process_index=process_index,
            process_count=process_count,
        )

    single = make()
    assert np.array_equal(single.order(0), make().order(0))  # seeded
    assert not np.array_equal(single.order(0), single.order(1))  # reshuffled per epoch
    assert np.array_equal(make(shuffle=False).order(0), np.arange(1200))
    shards = [make(i, 3).order(0) for i in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(1200))  # disjoint, complete
    batches = list(make().batches(8, epochs=2))
    assert len(batches) == 2 * 150 and batches[0][0] == (0, 8) and batches[150][0] == (1, 8)
    first, batch = batches[0]
    assert len(batch.queries) == 8 and len(batch.passages) == 16 and batch.scores is None
    resumed = list(make().batches(8, epoch=0, position=first[1], epochs=2))
    assert [p for p, _ in resumed] == [p for p, _ in batches[1:]]
    assert resumed[0][1].queries == batches[1][1].queries
    assert json.loads(json.dumps(batches[0][0])) == [0, 8]
