"""Hub names resolve through huggingface_hub's cache; with HF_HUB_OFFLINE=1 only the cache is used.

The cache is laid out by the test as huggingface_hub writes it (refs/main -> commit, snapshots/<commit>/
files as symlinks into blobs/), never downloaded."""

import hashlib
import os
import shutil

import numpy as np
import pytest

import colbert_jax
from colbert_jax.checkpoint import CheckpointError
from tests.helpers import BACKBONE_FIXTURES, PYLATE_FIXTURES

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache, repo_id: str, source) -> None:
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    (root / "blobs").mkdir()
    for f in sorted(p for p in source.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = root / "snapshots" / COMMIT / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache_repo(cache, "colbert-test/tiny-modernbert", BACKBONE_FIXTURES / "modernbert" / "checkpoint")
    cache_repo(cache, "colbert-test/pylate-bert", PYLATE_FIXTURES / "bert" / "checkpoint")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return cache


@pytest.mark.parametrize(
    "name,fixture",
    [
        ("colbert-test/tiny-modernbert", BACKBONE_FIXTURES / "modernbert" / "checkpoint"),
        ("colbert-test/pylate-bert", PYLATE_FIXTURES / "bert" / "checkpoint"),
    ],
)
def test_hub_name_loads_from_the_cache(hub_cache, texts, name, fixture):
    model = colbert_jax.load_checkpoint(name)
    assert model.config.checkpoint == str(hub_cache / ("models--" + name.replace("/", "--")) / "snapshots" / COMMIT)
    direct = colbert_jax.load_checkpoint(fixture)
    q = texts["queries"][:4]
    np.testing.assert_array_equal(model.encode_queries(q), direct.encode_queries(q))


def test_offline_name_missing_from_the_cache_is_an_error(hub_cache):
    with pytest.raises(CheckpointError, match=r"'colbert-test/absent'.*HF_HUB_OFFLINE=1 and it is not in the"):
        colbert_jax.load_checkpoint("colbert-test/absent")


def test_hf_hub_cache_wins_over_hf_home(hub_cache, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    shutil.copytree(hub_cache, other, symlinks=True)
    shutil.rmtree(hub_cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert colbert_jax.load_checkpoint("colbert-test/tiny-modernbert").config.dim == 16
