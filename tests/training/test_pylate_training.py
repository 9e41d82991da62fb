"""Training from a PyLate checkpoint (tests/fixtures/pylate/bert: two Dense layers, the first with a bias; a
tokenizer that pads with [MASK]): the training forward pass is the inference one, and the export is PyLate's."""

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

import colbert_jax
from colbert_jax.model import ColBERTModel
from colbert_jax.training.config import TrainConfig
from colbert_jax.training.data import TrainingData
from colbert_jax.training.loop import train
from tests.helpers import PYLATE_FIXTURES

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
SOURCE = PYLATE_FIXTURES / "bert" / "checkpoint"
BSIZE, STEPS = 4, 2


def ce_loss(Q, D, mask) -> float:
    """colbert-ai's cross-entropy (positive first) from embeddings: Q [b, Lq, dim], D [b * 2, Ld, dim]."""
    scores = np.asarray(colbert_jax.colbert_score(np.repeat(Q, 2, axis=0), D, mask), np.float64).reshape(-1, 2)
    return float(np.mean(np.logaddexp(scores[:, 0], scores[:, 1]) - scores[:, 0]))


def test_pylate_checkpoint_trains_as_it_encodes_and_exports_as_pylate(tmp_path):
    # float32 queries ("none"): the training loss is computed from float32 embeddings, and CPU's default
    # ("auto") encodes queries in int8
    source = colbert_jax.load_checkpoint(SOURCE, query_quantization="none")
    # What the fixture exercises: a Dense stack, and [MASK] query expansion with [MASK] as the pad token.
    assert source.head == ((24, True, "identity"), (16, False, "identity")) and source.text.pylate
    assert source.query_pad_id == -1 and source.doc_tokenizer.pad_id == source.doc_tokenizer.mask_id

    config = TrainConfig.load(
        TINY,
        [
            f"checkpoint={SOURCE}",
            "doc_maxlen=64",
            "query_maxlen=16",
            f"bsize={BSIZE}",
            f"maxsteps={STEPS}",
            "warmup=null",
            "lr=1e-3",
            "train.shuffle=false",  # file order: the first batch is the first BSIZE examples
            "train.dropout=false",  # the inference forward pass
            "train.save_every=null",
        ],
    )
    out = train(config, tmp_path / "run", show_progress=False)

    # (1) The first step's loss (the source parameters) is the loss of ColBERTModel's embeddings.
    c = config.colbert
    data = TrainingData(c.triples, c.queries, c.collection, nway=2, seed=config.train.seed, shuffle=False)
    batch = data.batch(np.arange(BSIZE))
    Q = source.encode_queries(batch.queries)
    D, mask = source.encode_docs(batch.passages)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2]
    np.testing.assert_allclose(logged[0]["loss"], ce_loss(Q, D, mask), rtol=1e-5)
    # ...which keeps the [MASK] rows: zeroing them (the document pad id's rule) gives another loss.
    q_ids, _ = source.query_tokenizer.tensorize(batch.queries)
    pad_rows = q_ids == source.doc_tokenizer.pad_id
    assert pad_rows.any()
    assert abs(ce_loss(Q * ~pad_rows[..., None], D, mask) - logged[0]["loss"]) > 1e-3

    # (2) The export is a PyLate directory that reloads with the same head and text settings and encodes
    # as the trained parameters (the final Orbax checkpoint's) do.
    export = out / "export"
    assert (export / "modules.json").is_file() and (export / "2_Dense" / "model.safetensors").is_file()
    exported = colbert_jax.load_checkpoint(export, query_quantization="none")
    assert exported.head == source.head and exported.text == source.text
    assert (exported.config.query_maxlen, exported.config.doc_maxlen) == (16, 64)
    state = ocp.CheckpointManager(out.resolve() / "checkpoints").restore(
        STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )["state"]
    params = jax.device_get(state["params"])  # restored without a target: TrainState's fields by name
    trained = ColBERTModel(
        source.config, source.bert_config, params, source.hf_tokenizer, head=source.head, text=source.text
    )
    texts = [*batch.queries[:2], " Leading and trailing space "]
    docs = [*batch.passages[:3], " Leading and trailing space. "]
    np.testing.assert_array_equal(exported.encode_queries(texts), trained.encode_queries(texts))
    np.testing.assert_array_equal(exported.encode_docs_flat(docs)[0], trained.encode_docs_flat(docs)[0])
    assert np.abs(exported.encode_queries(texts) - source.encode_queries(texts)).max() > 1e-3  # it trained


def test_an_l2_run_from_a_pylate_checkpoint_exports_what_holds_it(tmp_path):
    """PyLate's layout scores cosines only: an l2 run from a PyLate checkpoint trained to its last step and then
    had its export refused (a rerun resumed and failed the same way). It exports in our layout instead, with
    l2 and the PyLate head and text settings; and a run without punctuation masking exports one that keeps it."""
    overrides = [f"checkpoint={SOURCE}", "doc_maxlen=64", "query_maxlen=16", f"bsize={BSIZE}", "maxsteps=1"]
    overrides += ["warmup=null", "train.shuffle=false", "train.save_every=null"]
    out = train(TrainConfig.load(TINY, [*overrides, "similarity=l2"]), tmp_path / "l2", show_progress=False)
    exported = colbert_jax.load_checkpoint(out / "export")
    assert exported.config.similarity == "l2" and exported.head == ((24, True, "identity"), (16, False, "identity"))
    assert exported.text.pylate and not (out / "export" / "modules.json").exists()
    out = train(TrainConfig.load(TINY, [*overrides, "mask_punctuation=false"]), tmp_path / "kept", show_progress=False)
    kept = colbert_jax.load_checkpoint(out / "export")  # PyLate's layout again
    assert (out / "export" / "modules.json").is_file() and len(kept.doc_tokenizer.skiplist) == 0
