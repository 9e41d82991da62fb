"""Checkpoint import/export: round trips, the HF layout, and clear errors for bad inputs."""

import json
import shutil

import jax
import numpy as np
import pytest

import colbert_jax
from colbert_jax.checkpoint import CheckpointError, CheckpointFormatError
from colbert_jax.config import ConfigError


def leaves(model):
    return jax.tree_util.tree_leaves_with_path(jax.device_get(model.params))


def test_import_export_import_is_identical(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "exported")
    again = colbert_jax.load_checkpoint(tmp_path / "exported")
    for (pa, a), (pb, b) in zip(leaves(tiny_model), leaves(again), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(a, b)
    assert again.config.to_dict() | {"checkpoint": None} == tiny_model.config.to_dict() | {"checkpoint": None}


def test_export_layout_and_extras(reference_checkpoint, tmp_path):
    from safetensors.numpy import load_file

    model = colbert_jax.load_checkpoint(reference_checkpoint)
    out = model.save(tmp_path / "out") or tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "artifact.metadata",
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
    ]
    original = load_file(str(reference_checkpoint / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(exported)  # pooler carried through
    for k in original:
        np.testing.assert_array_equal(original[k], exported[k])
    meta = json.loads((out / "artifact.metadata").read_text())
    assert meta["dim"] == 128 and meta["doc_maxlen"] == 180 and "meta" in meta
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bert" and cfg["architectures"] == ["HF_ColBERT"]


def test_save_never_replaces_what_is_not_a_checkpoint_of_ours(tiny_model, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("precious")
    (tmp_path / "afile").write_text("also precious")
    for target in ("x", "afile"):
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match="refusing to replace"):
                tiny_model.save(tmp_path / target, overwrite=overwrite)
    assert (tmp_path / "x" / "keep.txt").read_text() == "precious"
    assert (tmp_path / "afile").read_text() == "also precious"

    tiny_model.save(tmp_path / "ckpt")  # a checkpoint of ours: replaced only with overwrite=True
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny_model.save(tmp_path / "ckpt", format="jax")
    tiny_model.save(tmp_path / "ckpt", format="jax", overwrite=True)
    tiny_model.save(tmp_path / "ckpt", format="torch", overwrite=True)
    (tmp_path / "empty").mkdir()
    tiny_model.save(tmp_path / "empty")  # an empty directory is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ckpt", "empty", "x"]  # no temp dirs left


def test_artifact_metadata_applies_and_overrides_win(tiny_checkpoint):
    model = colbert_jax.load_checkpoint(tiny_checkpoint, doc_maxlen=32)
    assert model.config.query_maxlen == 16  # from artifact.metadata
    assert model.config.doc_maxlen == 32  # caller override
    assert model.config.checkpoint == str(tiny_checkpoint)


def test_missing_weight_file(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "c")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight file"):
        colbert_jax.load_checkpoint(ckpt)


def test_wrong_projection_shape(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "c")
    meta = json.loads((ckpt / "artifact.metadata").read_text())
    (ckpt / "artifact.metadata").write_text(json.dumps({**meta, "dim": 32}))
    with pytest.raises(CheckpointFormatError, match=r"wrong projection shape.*linear.weight.*\(16, 32\).*\(32, 32\)"):
        colbert_jax.load_checkpoint(ckpt)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "c")
    state = load_file(str(ckpt / "model.safetensors"))
    del state["bert.encoder.layer.1.output.dense.weight"]
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(
        CheckpointFormatError,
        match=r"missing tensor\(s\) bert.encoder.layer.1.output.dense.weight: expected layers 0..1",
    ):
        colbert_jax.load_checkpoint(ckpt)


def test_a_damaged_checkpoint_of_ours_or_extra_layers_are_named(tiny_model, tiny_checkpoint, tmp_path):
    """Our own layout's truncated weights or missing config came out as safetensors' and Python's own errors;
    a config with fewer layers than the weights said "missing tensor(s) -"."""
    ckpt = tiny_model.save(tmp_path / "jax", format="jax")
    weights = (ckpt / "params.safetensors").read_bytes()
    (ckpt / "params.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="params.safetensors: unreadable safetensors file"):
        colbert_jax.load_checkpoint(ckpt)
    (ckpt / "params.safetensors").write_bytes(weights)
    (ckpt / "colbert_config.json").unlink()
    with pytest.raises(CheckpointError, match="no colbert_config.json"):
        colbert_jax.load_checkpoint(ckpt)
    torch = shutil.copytree(tiny_checkpoint, tmp_path / "torch")
    cfg = json.loads((torch / "config.json").read_text())
    (torch / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointFormatError, match=r"layers \[0, 1\] of .*config.json says 1"):
        colbert_jax.load_checkpoint(torch)


def test_unknown_config_key(tiny_checkpoint):
    with pytest.raises(ConfigError, match="unknown config key 'dimm'"):
        colbert_jax.load_checkpoint(tiny_checkpoint, dimm=3)


def test_missing_directory_and_offline_hub(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        colbert_jax.load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face Hub.*Offline"):
        colbert_jax.load_checkpoint("colbert-ir/not-a-real-model-xyz")


def test_missing_config_json_and_non_bert(tiny_checkpoint, tmp_path):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported; supported: bert, roberta"):
        colbert_jax.load_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        colbert_jax.load_checkpoint(ckpt)


def test_encode_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        tiny_model.encode_queries([])
    with pytest.raises(TypeError, match=r"queries\[1\] must be a str"):
        tiny_model.encode_queries(["fine", 42])
    with pytest.raises(TypeError, match="single str"):
        tiny_model.encode_docs("just one string")


def test_plain_bert_directory_needs_init_projection(caplog):
    """A plain BERT (no linear.weight) is an error unless a fresh, seeded projection is asked for."""
    from colbert_jax.default_model import minilm_dir

    with pytest.raises(CheckpointError, match=r"no ColBERT projection.*init_projection=128"):
        colbert_jax.load_checkpoint(minilm_dir())
    with caplog.at_level("WARNING", logger="colbert_jax.checkpoint"):
        a = colbert_jax.load_checkpoint(minilm_dir(), init_projection=64, projection_seed=3)
    assert "with seed 3" in caplog.text
    b = colbert_jax.load_checkpoint(minilm_dir(), init_projection=64, projection_seed=3)
    q = a.encode_queries(["hello"])
    assert q.shape == (1, 32, 64) and a.config.dim == 64
    np.testing.assert_array_equal(q, b.encode_queries(["hello"]))
    c = colbert_jax.load_checkpoint(minilm_dir(), init_projection=64, projection_seed=4)
    assert not np.array_equal(q, c.encode_queries(["hello"]))


def test_convert_script_both_directions(reference_checkpoint, tmp_path, texts):
    """torch -> jax -> torch with scripts/convert_checkpoint.py; every step encodes identically."""
    import subprocess
    import sys

    from safetensors.numpy import load_file

    script = ["scripts/convert_checkpoint.py"]
    jax_dir, torch_dir = tmp_path / "as_jax", tmp_path / "as_torch"
    subprocess.run([sys.executable, *script, str(reference_checkpoint), str(jax_dir)], check=True)
    assert (jax_dir / "params.safetensors").is_file() and (jax_dir / "colbert_config.json").is_file()
    subprocess.run([sys.executable, *script, str(jax_dir), str(torch_dir)], check=True)
    a, b = load_file(str(reference_checkpoint / "model.safetensors")), load_file(str(torch_dir / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    q = texts["queries"][:4]
    ref = colbert_jax.load_checkpoint(reference_checkpoint).encode_queries(q)
    np.testing.assert_array_equal(colbert_jax.load_checkpoint(jax_dir).encode_queries(q), ref)
    bad = subprocess.run(
        [sys.executable, *script, str(tmp_path / "missing"), str(tmp_path / "x")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "checkpoint directory not found" in bad.stderr
    again = subprocess.run([sys.executable, *script, str(jax_dir), str(torch_dir)], capture_output=True, text=True)
    assert again.returncode == 2 and "add --overwrite to replace it" in again.stderr  # the flag, not overwrite=True
