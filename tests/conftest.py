"""Shared fixtures. Tests never touch the network: the Hub is forced offline before anything imports it."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Built checkpoints, indexes and compiled programs go to a fresh directory, not the user's cache.
os.environ["COLBERT_JAX_CACHE"] = __import__("tempfile").mkdtemp(prefix="colbert-jax-test-cache-")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.helpers import FIXTURES, write_tiny_checkpoint  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU (run on a lent device, not in CI)")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module. Each XLA:CPU executable holds a few memory
    mappings, and the whole suite in one process compiled enough of them to reach the kernel's limit
    (vm.max_map_count, 65,530), where XLA:CPU's next compilation dies with SIGSEGV (seen in CI, in
    tests/training; reproduced by filling the map table before that test). A program a later module needs
    is compiled again."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def minilm_checkpoint(tmp_path_factory) -> Path:
    """The default MiniLM ColBERT checkpoint (dim 128, seeded projection), built by colbert-jax."""
    from colbert_jax.default_model import build_minilm_checkpoint

    return build_minilm_checkpoint(tmp_path_factory.mktemp("ckpt") / "minilm")


@pytest.fixture(scope="session")
def minilm_model(minilm_checkpoint):
    import colbert_jax

    return colbert_jax.load_checkpoint(minilm_checkpoint)


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint directory colbert-ai saved for the fixtures, reassembled.

    Its small files are committed; vocab.txt is the packaged MiniLM's (identical, per the manifest) and
    model.safetensors is rebuilt from MiniLM + the seeded projection; the test suite checks the rebuilt
    tensors against the sha256 sums colbert-ai's saved file had.
    """
    from safetensors.numpy import load_file, save_file

    from colbert_jax.default_model import minilm_dir, minilm_projection

    out = tmp_path_factory.mktemp("refckpt") / "colbert-ai-saved"
    shutil.copytree(FIXTURES / "ref_checkpoint", out)
    shutil.copyfile(minilm_dir() / "vocab.txt", out / "vocab.txt")
    state = {
        "bert." + k: v
        for k, v in load_file(str(minilm_dir() / "model.safetensors")).items()
        if not k.endswith("position_ids")
    }
    state["linear.weight"] = minilm_projection(128, 0)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


@pytest.fixture(scope="session")
def texts() -> dict:
    return json.loads((FIXTURES / "texts.json").read_text())


@pytest.fixture(scope="session")
def ref_embeddings() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "embeddings.npz"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random BERT ColBERT checkpoint (safetensors), fast to load and encode."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    import colbert_jax

    return colbert_jax.load_checkpoint(tiny_checkpoint)


COLLECTIONS = Path(__file__).parent / "fixtures" / "collections"


@pytest.fixture(scope="session")
def real_index(tmp_path_factory, minilm_model) -> Path:
    """A real-text index: the default MiniLM checkpoint on 2,000 standard-library docstrings, nbits=2."""
    import colbert_jax

    path = tmp_path_factory.mktemp("real") / "stdlib_2k.nbits2"
    colbert_jax.Indexer(minilm_model, nbits=2, show_progress=False).index(path, COLLECTIONS / "stdlib_2k.tsv")
    return path


@pytest.fixture(scope="session")
def real_index_nbits4(tmp_path_factory, minilm_model) -> Path:
    """`real_index` at nbits=4."""
    import colbert_jax

    path = tmp_path_factory.mktemp("real4") / "stdlib_2k.nbits4"
    colbert_jax.Indexer(minilm_model, nbits=4, show_progress=False).index(path, COLLECTIONS / "stdlib_2k.tsv")
    return path


@pytest.fixture(scope="session")
def small_collection(tmp_path_factory) -> Path:
    """300 real passages (TSV) for fast index builds with the tiny model."""
    path = tmp_path_factory.mktemp("coll") / "stdlib_300.tsv"
    lines = (COLLECTIONS / "stdlib_2k.tsv").read_text().splitlines()[:300]
    path.write_text("\n".join(lines) + "\n")
    return path
