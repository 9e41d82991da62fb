"""The CPU query encoder runs the BERT family's layers as one module each (`bert._Encoder(unstacked=True)`,
`backbones.unstacked_params`): the same embeddings as the scanned layers, for BERT, RoBERTa, XLM-RoBERTa and
ELECTRA; ModernBERT keeps its scan."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import colbert_jax
from colbert_jax.modeling.backbones import backbone_module, supports_unstacked, unstacked_params
from colbert_jax.modeling.colbert import embed_queries
from tests.helpers import BACKBONE_FIXTURES

QUERIES = ["read a file line by line", "parse command line arguments", "sort a list in place"]
CHECKPOINTS = {
    "roberta": BACKBONE_FIXTURES / "roberta" / "checkpoint",
    "xlm-roberta": BACKBONE_FIXTURES / "xlm-roberta" / "checkpoint",
    "electra": BACKBONE_FIXTURES / "electra" / "checkpoint",
}


def _embeddings(model, module, params, quantization: str):
    ids, mask = model.query_tokenizer.tensorize(QUERIES)
    fn = functools.partial(embed_queries, module, pad_id=model.query_pad_id)
    if quantization == "int8":
        from colbert_jax.modeling.quantize import quantize_params, quantized_apply

        fn, params = quantized_apply(fn), quantize_params(params)
    return np.asarray(jax.jit(fn)(params, ids, mask))


@pytest.mark.parametrize("quantization", ["none", "int8"])
@pytest.mark.parametrize("backbone", ["bert", *CHECKPOINTS])
def test_unstacked_layers_equal_the_scan(backbone, quantization, tiny_model):
    model = tiny_model if backbone == "bert" else colbert_jax.load_checkpoint(CHECKPOINTS[backbone])
    config = model.bert_config
    assert supports_unstacked(config)
    params = jax.device_get(model.params)
    split = unstacked_params(config, params)
    encoder = split[config.torch_prefix]["encoder"]
    assert "layer" not in encoder and sorted(encoder) == [f"layer_{i}" for i in range(config.num_hidden_layers)]
    np.testing.assert_array_equal(  # a layer's weights, moved not changed
        jax.tree.leaves(encoder[f"layer_{config.num_hidden_layers - 1}"])[0],
        jax.tree.leaves(params[config.torch_prefix]["encoder"]["layer"])[0][-1],
    )
    scanned = _embeddings(model, model.module, params, quantization)
    unrolled = _embeddings(model, model.module.clone(unstacked=True), split, quantization)
    # float32: the same up to rounding; int8: a last-bit difference before a layer can move one activation by one
    # int8 step (the reason for `invariant.py`), about 1e-5 in the embeddings
    np.testing.assert_allclose(unrolled, scanned, rtol=0, atol=2e-6 if quantization == "none" else 1e-4)
    # and what the model itself encodes on CPU is the unstacked encoder's
    if quantization == "none":
        own = model.replace_config(query_quantization="none")
        np.testing.assert_allclose(own.encode_queries(QUERIES), unrolled, rtol=0, atol=1e-6)


def test_modernbert_keeps_its_scan():
    model = colbert_jax.load_checkpoint(BACKBONE_FIXTURES / "modernbert" / "checkpoint")
    assert not supports_unstacked(model.bert_config)
    with pytest.raises(ValueError, match="cannot be unstacked"):
        backbone_module(model.bert_config, np.float32, unstacked=True)
    assert model._query_params is model.params  # float32 queries (auto), the scanned layers' own parameters
