"""Loss and gradients equal colbert-ai's on fixed batches (fixture: generate_training.py, eval mode)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colbert_jax.modeling.colbert import ColBERTEncoder
from colbert_jax.modeling.convert import params_to_state_dict
from colbert_jax.training.losses import in_batch_loss, pair_scores
from colbert_jax.training.step import loss_fn
from tests.helpers import FIXTURES

CASES = json.loads((FIXTURES.parent / "training" / "gradients.json").read_text())["cases"]


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    import colbert_jax

    # float32 queries, as colbert-ai's (CPU's default "auto" encodes queries in int8)
    return colbert_jax.load_checkpoint(reference_checkpoint, doc_maxlen=64, query_maxlen=32, query_quantization="none")


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradients_match_colbert_ai(model, name):
    case = CASES[name]
    s = case["settings"]
    config = model.config.replace(**{k: v for k, v in s.items() if k != "bsize"})
    q_ids, q_mask = model.query_tokenizer.tensorize(case["queries"])
    d_ids, d_mask = model.doc_tokenizer.tensorize(case["passages"])
    batch = {
        "q_ids": q_ids,
        "q_mask": q_mask,
        "d_ids": d_ids,
        "d_mask": d_mask,
        "scores": np.asarray(case["teacher_scores"] or np.zeros((s["bsize"], s["nway"])), np.float32).reshape(
            s["bsize"], s["nway"]
        ),
    }
    module = ColBERTEncoder(model.bert_config, config.dim)
    fn = lambda p: loss_fn(
        p,
        batch,
        None,
        module=module,
        colbert=config,
        pad_id=model.doc_tokenizer.pad_id,
        skiplist=jnp.asarray(model.doc_tokenizer.skiplist),
        distill=bool(case["teacher_scores"]),
    )
    (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(model.params)
    np.testing.assert_allclose(float(loss), case["loss"], rtol=1e-4)
    if case["ib_loss"] is not None:
        np.testing.assert_allclose(float(metrics["loss_ib"]), case["ib_loss"], rtol=1e-4)
    total = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
    np.testing.assert_allclose(total, case["grad_norm"], rtol=2e-3)
    named = params_to_state_dict(grads)
    for tensor, norm in case["grad_norms"].items():
        np.testing.assert_allclose(np.linalg.norm(named[tensor]), norm, rtol=2e-3, err_msg=tensor)


def test_scores_match_colbert_ai(model):
    case = CASES["ce"]
    Q = model.encode_queries(case["queries"])
    D, mask = model.encode_docs(case["passages"])
    np.testing.assert_allclose(np.asarray(pair_scores(Q, D, mask, 2, "cosine")), case["scores"], atol=1e-3)
    assert float(in_batch_loss(Q, D, mask, 2)) > 0
