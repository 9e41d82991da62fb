"""PyLate 1.6 checkpoints: embeddings equal PyLate's own `encode` (tests/fixtures/pylate), and conversions
between the PyLate, colbert-ai and colbert-jax layouts keep every embedding."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import colbert_jax
from colbert_jax.checkpoint import CheckpointError
from tests.helpers import BACKBONE_FIXTURES, PYLATE_FIXTURES

FP32_TOL = 1e-4


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.fixture(scope="module", params=["bert", "modernbert"])
def pylate_model(request):
    name = request.param
    ref = dict(np.load(PYLATE_FIXTURES / name / "reference.npz"))
    # float32 queries: the parity below is with PyLate's float32 embeddings
    return name, colbert_jax.load_checkpoint(PYLATE_FIXTURES / name / "checkpoint", query_quantization="none"), ref


def test_settings_come_from_the_pylate_config(pylate_model):
    name, model, _ = pylate_model
    c = model.config
    assert (c.dim, c.query_maxlen, c.doc_maxlen) == (16, 16, 64)
    assert (c.query_token_id, c.doc_token_id) == ("[Q] ", "[D] ") and model.text.pylate
    assert model.head == (((24, True, "identity"), (16, False, "identity")) if name == "bert" else ())
    assert model.bert_config.to_hf_dict()["model_type"] == name


def test_embeddings_match_pylate_encode(pylate_model, texts):
    name, model, ref = pylate_model
    Q = model.encode_queries(texts["queries"])
    D, doclens = model.encode_docs_flat(texts["documents"])
    np.testing.assert_array_equal(doclens, ref["doclens"])  # same kept tokens (skiplist, padding)
    err_q, err_d = max_err(Q, ref["Q"]), max_err(D, ref["D"])
    print(f"pylate {name}: max abs error vs PyLate encode: queries {err_q:.2e}, docs {err_d:.2e}")
    assert err_q <= FP32_TOL and err_d <= FP32_TOL


@pytest.mark.parametrize("target", ["pylate", "jax", "torch"])
def test_conversions_keep_embeddings(pylate_model, tmp_path, texts, target, caplog):
    name, model, _ = pylate_model
    if target == "torch" and model.head:
        with pytest.raises(CheckpointError, match="one bias-free projection; this model has 2 projection layers"):
            model.save(tmp_path / "out", format="torch")
        return
    with caplog.at_level("WARNING", logger="colbert_jax.checkpoint"):
        saved = model.save(tmp_path / "out", format=target)
    # colbert-ai would load this layout, and encode otherwise: it is told
    assert ("colbert-ai zeroes the query expansion embeddings" in caplog.text) == (target == "torch")
    again = colbert_jax.load_checkpoint(saved, query_quantization="none")
    assert again.text == model.text and again.head == model.head
    q, d = texts["queries"], texts["documents"]
    np.testing.assert_array_equal(again.encode_queries(q), model.encode_queries(q))
    np.testing.assert_array_equal(again.encode_docs_flat(d)[0], model.encode_docs_flat(d)[0])


def test_pylate_reloads_our_conversion():
    """Recorded by the generator: PyLate loads `colbert-jax convert --to pylate` output and encodes as before."""
    manifest = json.loads((PYLATE_FIXTURES / "manifest.json").read_text())
    for name in ("bert", "modernbert"):
        check = manifest[name]["round_trip"]
        assert check["doclens_equal"] and check["max_abs_err_Q"] <= FP32_TOL and check["max_abs_err_D"] <= FP32_TOL
    # A colbert-ai ModernBERT checkpoint written by us as PyLate: PyLate's encoding equals ours.
    check = manifest["colbert_ai_modernbert_to_pylate"]
    assert check["doclens_equal"] and check["max_abs_err_Q"] <= FP32_TOL and check["max_abs_err_D"] <= FP32_TOL


def test_colbert_ai_checkpoint_to_pylate_keeps_markers_and_skiplist(tmp_path, texts):
    """A colbert-ai RoBERTa (markers are <unk>) written as PyLate: same ids, same embeddings for stripped text."""
    src = colbert_jax.load_checkpoint(BACKBONE_FIXTURES / "roberta" / "checkpoint")
    out = src.save(tmp_path / "as_pylate", format="pylate")
    st = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st["query_prefix"] == st["document_prefix"] == "<unk>"
    model = colbert_jax.load_checkpoint(out)
    np.testing.assert_array_equal(model.doc_tokenizer.skiplist, src.doc_tokenizer.skiplist)
    q = [t for t in texts["queries"] if t == t.strip()]
    np.testing.assert_allclose(model.encode_queries(q), src.encode_queries(q), atol=1e-6)


def test_cli_convert_to_pylate_and_unsupported_modules(tmp_path):
    src = PYLATE_FIXTURES / "modernbert" / "checkpoint"
    cmd = [sys.executable, "-m", "colbert_jax.cli", "convert", str(src), str(tmp_path / "o"), "--to", "pylate"]
    subprocess.run(cmd, check=True, capture_output=True)
    assert (tmp_path / "o" / "1_Dense" / "model.safetensors").is_file()
    bad = shutil.copytree(src, tmp_path / "bad")
    modules = json.loads((bad / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (bad / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(CheckpointError, match="Normalize' is not supported"):
        colbert_jax.load_checkpoint(bad)


def test_cli_init_projection(tmp_path):
    from colbert_jax.default_model import minilm_dir

    out = tmp_path / "fresh"
    base = [sys.executable, "-m", "colbert_jax.cli", "convert", str(minilm_dir()), str(out), "--to", "torch"]
    bad = subprocess.run(base, capture_output=True, text=True)
    assert bad.returncode == 2 and "--init-projection" in bad.stderr
    subprocess.run([*base, "--init-projection", "32", "--projection-seed", "5"], check=True, capture_output=True)
    assert colbert_jax.load_checkpoint(out).config.dim == 32


def test_an_l2_model_is_not_written_as_pylate(tiny_model, tmp_path):
    """PyLate's layout records no similarity (it scores cosines): an l2 model written there would come back
    as a cosine model without a word."""
    l2 = tiny_model.replace_config(similarity="l2")
    with pytest.raises(CheckpointError, match="similarity='l2'.*save it as torch or jax"):
        l2.save(tmp_path / "out", format="pylate")
    assert not (tmp_path / "out").exists()
    assert colbert_jax.load_checkpoint(l2.save(tmp_path / "as-jax", format="jax")).config.similarity == "l2"


def test_mask_punctuation_off_survives_the_pylate_layout(pylate_model, tmp_path, texts):
    """The PyLate layout has no mask_punctuation key: a model that kept punctuation came back masking it
    (its skiplist written whatever the setting said). An empty skiplist is PyLate's way to mask nothing."""
    name, _, _ = pylate_model
    kept = colbert_jax.load_checkpoint(
        PYLATE_FIXTURES / name / "checkpoint", query_quantization="none", mask_punctuation=False
    )
    docs = [d + " , . ; !" for d in texts["documents"]]
    again = colbert_jax.load_checkpoint(kept.save(tmp_path / "out", format="pylate"), query_quantization="none")
    D, doclens = kept.encode_docs_flat(docs)
    D2, doclens2 = again.encode_docs_flat(docs)
    masked = colbert_jax.load_checkpoint(PYLATE_FIXTURES / name / "checkpoint", query_quantization="none")
    assert doclens.sum() > masked.encode_docs_flat(docs)[1].sum()  # punctuation kept: more embeddings
    np.testing.assert_array_equal(doclens2, doclens)
    np.testing.assert_array_equal(D2, D)
