"""Loss and every gradient equal colbert-ai's on fixed batches for XLM-RoBERTa and ModernBERT
(fixtures: tests/fixtures/backbones/generate_training.py, eval mode)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import colbert_jax
from colbert_jax.modeling.colbert import ColBERTEncoder
from colbert_jax.modeling.convert import params_to_state_dict
from colbert_jax.training.step import loss_fn
from tests.helpers import BACKBONE_FIXTURES


@pytest.fixture(scope="module", params=["xlm-roberta", "modernbert"])
def backbone(request):
    name = request.param
    cases = json.loads((BACKBONE_FIXTURES / name / "gradients.json").read_text())["cases"]
    return colbert_jax.load_checkpoint(BACKBONE_FIXTURES / name / "checkpoint"), cases


@pytest.mark.parametrize("case_name", ["ce_ib", "distill"])
def test_loss_and_gradients_match_colbert_ai(backbone, case_name):
    model, cases = backbone
    case = cases[case_name]
    s = case["settings"]
    config = model.config.replace(**{k: v for k, v in s.items() if k != "bsize"})
    q_ids, q_mask = model.query_tokenizer.tensorize(case["queries"])
    d_ids, d_mask = model.doc_tokenizer.tensorize(case["passages"])
    teacher = case["teacher_scores"] or np.zeros((s["bsize"], s["nway"]))
    batch = {
        "q_ids": q_ids,
        "q_mask": q_mask,
        "d_ids": d_ids,
        "d_mask": d_mask,
        "scores": np.asarray(teacher, np.float32).reshape(s["bsize"], s["nway"]),
    }
    module = ColBERTEncoder(model.bert_config, config.dim)

    def fn(params):
        return loss_fn(
            params,
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
    assert set(case["grad_norms"]) <= set(named)
    for tensor, norm in case["grad_norms"].items():
        np.testing.assert_allclose(np.linalg.norm(named[tensor]), norm, rtol=2e-3, atol=1e-6, err_msg=tensor)
