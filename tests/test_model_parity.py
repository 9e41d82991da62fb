"""Embeddings and MaxSim scores equal colbert-ai's (fixtures from tests/fixtures/reference)."""

import numpy as np
import pytest

import colbert_jax
from tests.helpers import FIXTURES

FP32_TOL = 1e-4
BF16_TOL = 0.02  # measured 0.0045 (queries) / 0.0038 (docs) on this CPU; see the test output


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.fixture(scope="module")
def ref_model(reference_checkpoint):
    # float32 queries, pinned: the parity bar is colbert-ai's own numbers ("auto" would encode them in int8 on CPU)
    return colbert_jax.load_checkpoint(reference_checkpoint, query_quantization="none")


def test_reference_saved_tensors_are_rebuilt_exactly(reference_checkpoint, manifest):
    import hashlib

    from safetensors.numpy import load_file

    state = load_file(str(reference_checkpoint / "model.safetensors"))
    sums = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in state.items()}
    assert sums == manifest["tensor_sha256"]


def test_query_embeddings_match_reference(ref_model, texts, ref_embeddings):
    Q = ref_model.encode_queries(texts["queries"])
    assert Q.shape == ref_embeddings["Q"].shape == (len(texts["queries"]), 32, 128) and Q.dtype == np.float32
    assert max_err(Q, ref_embeddings["Q"]) <= FP32_TOL


def test_doc_embeddings_match_reference(ref_model, texts, ref_embeddings):
    D, mask = ref_model.encode_docs(texts["documents"])
    assert D.shape == ref_embeddings["D"].shape and mask.dtype == bool
    np.testing.assert_array_equal(mask, ref_embeddings["D_mask"])
    assert max_err(D, ref_embeddings["D"]) <= FP32_TOL
    assert not D[~mask].any()  # masked rows are zero vectors


def test_scores_match_reference(ref_model, texts, ref_embeddings):
    Q = ref_model.encode_queries(texts["queries"])
    D, mask = ref_model.encode_docs(texts["documents"])
    scores = np.stack([np.asarray(colbert_jax.colbert_score(Q[i : i + 1], D, mask)) for i in range(len(Q))])
    np.testing.assert_allclose(scores, ref_embeddings["scores"], atol=32 * FP32_TOL)
    # Same ranking of documents for every query.
    np.testing.assert_array_equal(
        np.argsort(-scores, axis=1)[:, :3], np.argsort(-ref_embeddings["scores"], axis=1)[:, :3]
    )


def test_default_model_equals_reference_built_checkpoint(minilm_model, ref_model, texts):
    """Our MiniLM builder and colbert-ai's save give the same model."""
    np.testing.assert_array_equal(
        minilm_model.replace_config(query_quantization="none").encode_queries(texts["queries"][:3]),
        ref_model.encode_queries(texts["queries"][:3]),
    )


def test_int8_encodes_queries_close_to_reference(reference_checkpoint, texts, ref_embeddings):
    """The two-term int8 encoder (what "auto" picks on CPUs with AMX tiles): every query embedding within cosine
    1e-5 of colbert-ai's float32 one, and really not float32's numbers."""
    model = colbert_jax.load_checkpoint(reference_checkpoint, query_quantization="int8")
    assert model.query_quantization == "int8"
    Q = model.encode_queries(texts["queries"])
    cosine = (Q * ref_embeddings["Q"]).sum(-1)
    assert cosine.min() >= 1 - 1e-5
    assert max_err(Q, ref_embeddings["Q"]) > FP32_TOL


def test_bfloat16_compute_is_close(ref_model, texts, ref_embeddings):
    bf16 = ref_model.replace_config(compute_dtype="bfloat16")
    err_q = max_err(bf16.encode_queries(texts["queries"]), ref_embeddings["Q"])
    D, _ = bf16.encode_docs(texts["documents"])
    err_d = max_err(D, ref_embeddings["D"])
    print(f"bfloat16 max abs error vs float32 reference: queries {err_q:.4f}, docs {err_d:.4f}")
    assert err_q <= BF16_TOL and err_d <= BF16_TOL
    assert err_q > FP32_TOL  # it really computed in bfloat16


def test_tiny_pytorch_bin_checkpoint_matches_reference(tmp_path, texts):
    """A float16 pytorch_model.bin saved by colbert-ai loads without torch and encodes identically."""
    import shutil

    from colbert_jax.default_model import minilm_dir

    ckpt = tmp_path / "tiny_bin"
    shutil.copytree(FIXTURES / "tiny_bin", ckpt)
    for f in ("tokenizer.json", "vocab.txt"):
        shutil.copyfile(minilm_dir() / f, ckpt / f)
    model = colbert_jax.load_checkpoint(ckpt)
    ref = np.load(FIXTURES / "tiny_embeddings.npz")
    assert (model.config.dim, model.config.doc_maxlen, model.bert_config.hidden_size) == (8, 48, 16)
    assert max_err(model.encode_queries(texts["queries"][:6]), ref["Q"]) <= FP32_TOL
    D, mask = model.encode_docs(texts["documents"][:8])
    np.testing.assert_array_equal(mask, ref["D_mask"])
    assert max_err(D, ref["D"]) <= FP32_TOL
