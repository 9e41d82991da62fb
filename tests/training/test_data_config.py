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


def test_global_batches_are_seeded_per_epoch_and_drop_the_remainder(tmp_path):
    def make(triples=DATA / "triples.jsonl", shuffle=True, seed=5):
        return TrainingData(triples, DATA / "queries.tsv", COLLECTION, nway=2, seed=seed, shuffle=shuffle)

    data = make()
    batches = data.global_batches(8, epochs=2)
    assert len(batches) == 2 * 150 == 2 * data.steps_per_epoch(8)
    first = np.concatenate([batches[s] for s in range(150)])
    second = np.concatenate([batches[s] for s in range(150, 300)])
    assert sorted(first) == sorted(second) == list(range(1200))  # each epoch visits every example once
    assert not np.array_equal(first, second)  # reshuffled per epoch
    assert np.array_equal(batches[7], make().global_batches(8, 2)[7])  # seeded
    assert not np.array_equal(batches[7], make(seed=6).global_batches(8, 2)[7])
    assert np.array_equal(make(shuffle=False).global_batches(8, 1)[2], np.arange(16, 24))
    uneven = tmp_path / "t.jsonl"  # 20 examples, bsize 6: 3 steps an epoch, two examples dropped
    uneven.write_text("".join(line + "\n" for line in (DATA / "triples.jsonl").read_text().splitlines()[:20]))
    assert make(uneven).steps_per_epoch(6) == 3 and len(make(uneven).global_batches(6, 2)) == 6
    with pytest.raises(DataError, match="20 example\\(s\\) make no batch of bsize=32"):
        make(uneven).steps_per_epoch(32)
    with pytest.raises(DataError, match="seed must be in"):
        make(seed=-1)


def test_a_hosts_rows_and_resumed_position():
    data = TrainingData(DATA / "triples.jsonl", DATA / "queries.tsv", COLLECTION, nway=2, seed=5, shuffle=True)
    whole = data.batches(8, epochs=2)
    steps = [next(whole) for _ in range(152)]  # past the epoch boundary
    assert whole.get_state()["next_index"] == 152
    assert len(steps[0].queries) == 8 and len(steps[0].passages) == 16 and steps[0].scores is None
    rows = np.array([1, 2, 5])
    part = data.batches(8, epochs=2, rows=rows)
    for s in range(3):
        got, want = next(part), steps[s]
        assert got.queries == [want.queries[r] for r in rows]
        assert got.passages == [want.passages[2 * r + j] for r in rows for j in range(2)]  # query-major
    resumed = data.batches(8, epochs=2, rows=rows)
    resumed.set_state(json.loads(json.dumps(part.get_state())))  # as Orbax stores it
    assert resumed.get_state()["next_index"] == 3
    assert next(resumed).queries == [steps[3].queries[r] for r in rows]
