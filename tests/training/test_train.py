"""Training end to end: learning on real text, exact resume, a sharded step, bad inputs (several processes:
test_multiprocess.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import colbert_jax
from colbert_jax.config import ConfigError
from colbert_jax.training.config import TrainConfig
from colbert_jax.training.data import DataError
from colbert_jax.training.loop import train
from tests.helpers import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
TRIPLES = REPO / "tests" / "fixtures" / "training" / "triples.jsonl"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("train_tiny") / "ckpt",
        seed=3,
        hidden=32,
        layers=2,
        heads=2,
        intermediate=64,
        dim=16,
        doc_maxlen=32,
        query_maxlen=16,
    )


def tiny_config(ckpt, *extra):
    return TrainConfig.load(
        TINY, [f"checkpoint={ckpt}", "doc_maxlen=32", "query_maxlen=16", "bsize=8", "warmup=2", "lr=1e-3", *extra]
    )


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def heldout_accuracy(model, n=150):
    """Fraction of held-out triples (the last n lines, never trained on here) whose positive scores higher."""
    data = colbert_jax.training.data.TrainingData(
        TRIPLES,
        TRIPLES.parent / "queries.tsv",
        REPO / "tests/fixtures/collections/stdlib_2k.tsv",
        nway=2,
        seed=0,
        shuffle=False,
    )
    batch = data.batch(np.arange(1200 - n, 1200))
    Q = model.encode_queries(batch.queries)
    D, mask = model.encode_docs(batch.passages)
    scores = np.asarray(colbert_jax.colbert_score(np.repeat(Q, 2, axis=0), D, mask)).reshape(n, 2)
    return float((scores[:, 0] > scores[:, 1]).mean()), float((scores[:, 0] - scores[:, 1]).mean())


def test_loss_falls_and_positives_rank_higher(tmp_path, minilm_model):
    """The packaged MiniLM, fine-tuned on real docstring triples (file order, so the held-out lines stay
    unseen): the loss falls and held-out positives beat their negatives more often."""
    config = TrainConfig.load(TINY, ["maxsteps=40", "train.shuffle=false", "train.save_every=null"])
    before = heldout_accuracy(minilm_model)
    out = train(config, tmp_path / "run", show_progress=False)
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])
    after = heldout_accuracy(colbert_jax.load_checkpoint(out / "export"))
    print(f"held-out accuracy {before[0]:.3f} -> {after[0]:.3f}, mean margin {before[1]:.3f} -> {after[1]:.3f}")
    assert after[0] > before[0] and after[1] > before[1]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_ckpt):
    config = tiny_config(tiny_ckpt, "maxsteps=6", "train.save_every=2")
    straight = train(config, tmp_path / "straight", show_progress=False)
    interrupted = tmp_path / "interrupted"
    train(config, interrupted, stop_after=3, show_progress=False)
    assert [m["step"] for m in metrics(interrupted)] == [1, 2, 3]
    assert not (interrupted / "export").exists()
    train(config, interrupted, stop_after=4, show_progress=False)  # the same command again: resumes at 3
    # As if step 4 had been saved by two processes: this process has no position file of its own, and
    # takes the position from the step (one global batch a step).
    positions = interrupted / "checkpoints" / "4" / "data"
    (positions / "process_0-of-1.json").rename(positions / "process_0-of-2.json")
    (positions / "process_1-of-2.json").write_text((positions / "process_0-of-2.json").read_text())
    train(config, interrupted, show_progress=False)
    a, b = metrics(straight), metrics(interrupted)
    assert [m["step"] for m in b] == list(range(1, 7))
    np.testing.assert_allclose([m["loss"] for m in a], [m["loss"] for m in b], rtol=1e-6)
    pa, pb = (
        load_file(str(straight / "export/model.safetensors")),
        load_file(str(interrupted / "export/model.safetensors")),
    )
    for name in pa:
        np.testing.assert_allclose(pa[name], pb[name], atol=1e-7, err_msg=name)
    exported = colbert_jax.load_checkpoint(straight / "export")  # the PyTorch layout, loadable by colbert-ai
    assert exported.config.nway == 2 and exported.config.bsize == 8
    meta = json.loads((straight / "export" / "artifact.metadata").read_text())
    assert meta["doc_maxlen"] == 32 and "linear.weight" in pa


def test_overwrite_keeps_the_earlier_run_when_the_new_inputs_fail(tmp_path, tiny_ckpt):
    """overwrite=True deletes the earlier run only once the new run's checkpoint, settings and data load: a
    mistyped path fails the command and costs nothing."""
    run = train(tiny_config(tiny_ckpt, "maxsteps=2", "train.save_every=1"), tmp_path / "run", show_progress=False)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    bad = tiny_config(tiny_ckpt, "maxsteps=2", "triples=/nonexistent/triples.jsonl")
    with pytest.raises(DataError, match="triples file not found"):
        train(bad, run, overwrite=True, show_progress=False)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_under_other_settings_is_refused(tmp_path, tiny_ckpt):
    """A resumed run under another lr or seed would be another training (and would overwrite the record of
    the settings its first steps used): refused, naming both values; run settings (length, logging) may
    change."""
    run = tmp_path / "run"
    train(tiny_config(tiny_ckpt, "maxsteps=4", "train.save_every=2"), run, stop_after=2, show_progress=False)
    recorded = (run / "config.yaml").read_text()
    other = tiny_config(tiny_ckpt, "maxsteps=4", "train.save_every=2", "lr=0.5", "train.seed=7")
    with pytest.raises(ConfigError, match=r"colbert\.lr: 0\.001 in the run, 0\.5 now; train\.seed: .* 7 now"):
        train(other, run, show_progress=False)
    assert (run / "config.yaml").read_text() == recorded
    train(tiny_config(tiny_ckpt, "maxsteps=5", "train.save_every=3"), run, show_progress=False)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5]


def test_resume_over_changed_data_is_refused(tmp_path, tiny_ckpt):
    """The data order is rebuilt from the triples file on resume: replaced at the same path, the resumed steps
    would repeat some examples and skip others, with nothing said. The run records its inputs' checksums."""
    triples = tmp_path / "triples.jsonl"
    lines = TRIPLES.read_text().splitlines(keepends=True)
    triples.write_text("".join(lines))
    config = tiny_config(tiny_ckpt, "maxsteps=4", "train.save_every=2", f"triples={triples}")
    run = tmp_path / "run"
    train(config, run, stop_after=2, show_progress=False)
    triples.write_text("".join(lines[1:] + lines[:1]))  # the same examples, in another order
    with pytest.raises(ConfigError, match=r"triples.jsonl \(colbert\.triples\) changed since the run started"):
        train(config, run, show_progress=False)
    triples.write_text("".join(lines))
    train(config, run, show_progress=False)
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]


def overrides(*pairs: str) -> list[str]:
    """Command-line overrides: one --set per KEY=VALUE."""
    return [a for pair in pairs for a in ("--set", pair)]


def _run(args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
    )


def test_sharded_step_equals_single_device(tmp_path, tiny_ckpt):
    """Two steps on 8 fake CPU devices (mesh data=4 x model=2) give the single device's parameters within
    1e-6 (they move by ~1e-3 a step), the attention key biases included: their true gradient, exactly zero
    (softmax ignores a per-query shift of the logits), is what the step applies, not the rounding noise that
    differs with the summation order and that Adam would scale up to steps of ~lr."""
    lr, steps = 1e-3, 2
    args = [
        "scripts/train.py",
        "--config",
        str(TINY),
        *overrides(
            f"checkpoint={tiny_ckpt}",
            "doc_maxlen=32",
            "query_maxlen=16",
            "bsize=8",
            f"lr={lr}",
            f"maxsteps={steps}",
            "train.save_every=null",
            "train.dropout=false",
        ),
    ]
    single = _run([*args, "--out", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-2000:]
    sharded = _run(
        [*args, *overrides("train.mesh.data=4", "train.mesh.model=2"), "--out", str(tmp_path / "eight")],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    a = load_file(str(tmp_path / "one/export/model.safetensors"))
    b = load_file(str(tmp_path / "eight/export/model.safetensors"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
    la, lb = metrics(tmp_path / "one"), metrics(tmp_path / "eight")
    np.testing.assert_allclose([m["loss"] for m in la], [m["loss"] for m in lb], rtol=1e-5)


def test_bad_inputs(tmp_path, tiny_ckpt):
    missing = _run(
        [
            "scripts/train.py",
            "--config",
            str(TINY),
            "--out",
            str(tmp_path / "a"),
            *overrides(f"checkpoint={tiny_ckpt}", "triples=/nowhere/triples.jsonl"),
        ]
    )
    assert missing.returncode == 2 and "triples file not found: /nowhere/triples.jsonl" in missing.stderr
    too_wide = _run(
        [
            "scripts/train.py",
            "--config",
            str(TINY),
            "--out",
            str(tmp_path / "b"),
            *overrides(f"checkpoint={tiny_ckpt}", "nway=3"),
        ]
    )
    assert too_wide.returncode == 2 and "triples.jsonl:1: the example has 2 passage(s) but nway=3" in too_wide.stderr
    unknown = _run(
        ["scripts/train.py", "--config", str(TINY), "--out", str(tmp_path / "c"), "--set", "learning_rate=1"]
    )
    assert unknown.returncode == 2 and "unknown config key 'learning_rate'" in unknown.stderr
    no_ckpt = _run(
        [
            "scripts/train.py",
            "--config",
            str(TINY),
            "--out",
            str(tmp_path / "d"),
            "--set",
            f"checkpoint={tmp_path / 'nope'}",
        ]
    )
    assert no_ckpt.returncode == 2 and "checkpoint directory not found" in no_ckpt.stderr
