"""Every backbone equals colbert-ai 0.2.22: token ids, embeddings and scores (tests/fixtures/backbones)."""

import json
import shutil

import jax
import numpy as np
import pytest

import colbert_jax
from colbert_jax.checkpoint import CheckpointError
from colbert_jax.tokenization import DocTokenizer, QueryTokenizer
from tests.helpers import BACKBONE_FIXTURES

FP32_TOL = 1e-4
BACKBONES = ["roberta", "xlm-roberta", "electra", "modernbert"]


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request):
    name = request.param
    ref = dict(np.load(BACKBONE_FIXTURES / name / "reference.npz"))
    # float32 queries: the parity below is with colbert-ai's float32 embeddings (int8: tests/test_quantize.py)
    return name, colbert_jax.load_checkpoint(BACKBONE_FIXTURES / name / "checkpoint", query_quantization="none"), ref


def test_loads_the_right_backbone(backbone):
    name, model, _ = backbone
    assert model.bert_config.to_hf_dict()["model_type"] == name
    assert (model.config.dim, model.config.query_maxlen, model.config.doc_maxlen) == (16, 16, 64)


@pytest.mark.parametrize("setting", ["default", "attend"])
def test_token_ids_match_reference(backbone, texts, setting):
    _, model, ref = backbone
    config = model.config.replace(attend_to_mask_tokens=setting == "attend")
    ids, mask = QueryTokenizer(model.hf_tokenizer, config).tensorize(texts["queries"])
    np.testing.assert_array_equal(ids, ref[f"{setting}_query_ids"])
    np.testing.assert_array_equal(mask, ref[f"{setting}_query_mask"])
    ids, mask = DocTokenizer(model.hf_tokenizer, config).tensorize(texts["documents"])
    np.testing.assert_array_equal(ids, ref[f"{setting}_doc_ids"])
    np.testing.assert_array_equal(mask, ref[f"{setting}_doc_mask"])


def test_embeddings_and_scores_match_reference(backbone, texts):
    name, model, ref = backbone
    Q = model.encode_queries(texts["queries"])
    D, mask = model.encode_docs(texts["documents"])
    err_q, err_d = max_err(Q, ref["Q"]), max_err(D, ref["D"])
    print(f"{name}: max abs error vs colbert-ai: queries {err_q:.2e}, docs {err_d:.2e}")
    np.testing.assert_array_equal(mask, ref["D_mask"])
    assert err_q <= FP32_TOL and err_d <= FP32_TOL
    scores = np.stack([np.asarray(colbert_jax.colbert_score(Q[i : i + 1], D, mask)) for i in range(len(Q))])
    np.testing.assert_allclose(scores, ref["scores"], atol=16 * FP32_TOL)


def test_export_round_trip_is_exact(backbone, tmp_path, texts):
    """Our PyTorch-layout export keeps every tensor name and value colbert-ai saved."""
    from safetensors.numpy import load_file

    name, model, _ = backbone
    out = model.save(tmp_path / "export")
    a = load_file(str(BACKBONE_FIXTURES / name / "checkpoint" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text())["model_type"] == name
    again = colbert_jax.load_checkpoint(out, query_quantization="none")  # as the fixture's model
    q = texts["queries"][:3]
    np.testing.assert_array_equal(again.encode_queries(q), model.encode_queries(q))


def test_modernbert_documents_exceed_the_local_window(texts):
    """The fixture exercises sliding-window attention: documents are longer than the window."""
    cfg = json.loads((BACKBONE_FIXTURES / "modernbert" / "checkpoint" / "config.json").read_text())
    ref = np.load(BACKBONE_FIXTURES / "modernbert" / "reference.npz")
    assert ref["default_doc_mask"].sum(axis=1).max() > cfg["local_attention"] + 1
    assert cfg["global_attn_every_n_layers"] < cfg["num_hidden_layers"]


def test_unsupported_model_type_and_remote_code_are_clear_errors(tmp_path):
    ckpt = shutil.copytree(BACKBONE_FIXTURES / "roberta" / "checkpoint", tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "deberta-v2"}))
    supported = "supported: bert, roberta, xlm-roberta, electra, modernbert"
    with pytest.raises(CheckpointError, match=f"model_type 'deberta-v2' is not supported; {supported}"):
        colbert_jax.load_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "custom.Model"}}))
    with pytest.raises(CheckpointError, match=f"needs remote code.*AutoModel.*{supported}"):
        colbert_jax.load_checkpoint(ckpt)


def test_plain_backbone_needs_init_projection(tmp_path):
    """A bare Hugging Face backbone directory (no linear.weight) of a new backbone type."""
    from safetensors.numpy import load_file, save_file

    src = BACKBONE_FIXTURES / "modernbert" / "checkpoint"
    bare = shutil.copytree(src, tmp_path / "bare", ignore=shutil.ignore_patterns("artifact.metadata"))
    state = load_file(str(src / "model.safetensors"))
    bare_state = {k.removeprefix("model."): v for k, v in state.items() if k != "linear.weight"}
    save_file(bare_state, str(bare / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no ColBERT projection.*modernbert backbone"):
        colbert_jax.load_checkpoint(bare)
    model = colbert_jax.load_checkpoint(bare, init_projection=16)
    full = colbert_jax.load_checkpoint(src)
    flat = dict(jax.tree_util.tree_leaves_with_path(model.params["model"]))
    for path, leaf in jax.tree_util.tree_leaves_with_path(full.params["model"]):
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(leaf))
    assert model.config.dim == 16 and model.params["linear"]["kernel"].shape == (32, 16)
