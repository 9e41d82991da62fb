"""ColBERTConfig: reference names and defaults, strict user files, lenient reference files."""

import json

import pytest

from colbert_jax.config import ColBERTConfig, ConfigError


def test_defaults_match_reference():
    c = ColBERTConfig()
    assert (c.dim, c.doc_maxlen, c.query_maxlen, c.nbits, c.kmeans_niters) == (128, 220, 32, 1, 4)
    assert (c.mask_punctuation, c.attend_to_mask_tokens, c.similarity, c.interaction) == (
        True,
        False,
        "cosine",
        "colbert",
    )
    assert (c.bsize, c.accumsteps, c.lr, c.nway, c.maxsteps) == (32, 1, 3e-6, 2, 500_000)
    assert (c.ncells, c.centroid_score_threshold, c.ndocs) == (None, None, None)
    assert (c.query_token_id, c.doc_token_id) == ("[unused0]", "[unused1]")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_load_round_trip(tmp_path, suffix):
    c = ColBERTConfig(dim=64, nbits=2, doc_maxlen=180, ncells=2, lr=1e-5, compute_dtype="bfloat16")
    path = tmp_path / f"c{suffix}"
    c.save(path)
    assert ColBERTConfig.load(path) == c


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dim: 64\nnbitz: 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'nbitz'"):
        ColBERTConfig.load(path)
    with pytest.raises(ConfigError, match="unknown config key 'foo'"):
        ColBERTConfig().replace(foo=1)


@pytest.mark.parametrize(
    "key,value",
    [
        ("dim", -1),
        ("nbits", 3),
        ("similarity", "dot"),
        ("doc_maxlen", "long"),
        ("interaction", "flipr"),
        ("query_maxlen", 1000),
        ("pool_factor", 2),
    ],
)
def test_bad_value_is_named(key, value):
    with pytest.raises(ConfigError, match=f"bad value for '{key}'"):
        ColBERTConfig.from_dict({key: value})


def test_dim_must_fit_bit_packing():
    with pytest.raises(ConfigError, match="multiple of 8\\*nbits"):
        ColBERTConfig(dim=24).replace(nbits=2)
    with pytest.raises(ConfigError, match="bad value for 'dim'"):
        ColBERTConfig(dim=0)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ColBERTConfig.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{dim: ")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ColBERTConfig.load(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        ColBERTConfig.load(lst)


def test_reference_metadata_is_read_leniently(tmp_path):
    ref = json.loads(open("tests/fixtures/reference/foundation/ref_checkpoint/artifact.metadata").read())
    assert "amp" in ref and "meta" in ref  # run settings we drop
    c = ColBERTConfig.from_reference_dict(ref)
    assert (c.dim, c.doc_maxlen, c.query_maxlen) == (128, 180, 32)
    nested = ColBERTConfig.from_reference_dict({"config": {"nbits": 2, "root": "/x"}, "num_chunks": 1})
    assert nested.nbits == 2
    with pytest.raises(ConfigError, match="unknown config key 'amp'.*run setting"):
        ColBERTConfig.from_dict({"amp": True})
