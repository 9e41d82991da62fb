"""On a GPU (`JAX_PLATFORMS=cuda pytest -m gpu`, run by `scripts/device_check.sh`; the test conftest
defaults the platform to cpu): the compiled kernels inside the search and the codec give the same results
as their `jnp` twins. Strict kernel selection is on, so a kernel that does not compile fails these tests
instead of falling back. (The compiled kernels against their twins, case by case, are
`tests/kernels/test_kernels.py::TestKernelsCompiled`.)"""

import logging

import jax
import numpy as np
import pytest

import colbert_jax
import pallas_kernels
from pallas_kernels.dispatch import STRICT_ENV

pytestmark = pytest.mark.gpu

QUERIES = [
    "read a file line by line",
    "compute the greatest common divisor",
    "parse command line arguments",
    "join two paths",
    "current time in seconds",
    "sort a list in place",
    "random integer in a range",
    "encode bytes as base64",
    "open a network socket",
    "copy a directory tree",
]


@pytest.fixture(autouse=True)
def on_gpu_strict(monkeypatch):
    assert jax.default_backend() == "gpu", "the gpu tests need a GPU"
    monkeypatch.setenv(STRICT_ENV, "1")


def test_float32_encoders_match_colbert_ai(reference_checkpoint, texts, ref_embeddings):
    """float32 compute on the GPU (its products forced to full float32, not TensorFloat-32) keeps colbert-ai's
    numbers: the CPU parity bar (`tests/test_model_parity.py`)."""
    model = colbert_jax.load_checkpoint(reference_checkpoint, query_quantization="none")
    Q = model.encode_queries(texts["queries"])
    assert np.abs(Q - ref_embeddings["Q"]).max() <= 1e-4
    D, mask = model.encode_docs(texts["documents"])
    np.testing.assert_array_equal(mask, ref_embeddings["D_mask"])
    assert np.abs(D - ref_embeddings["D"]).max() <= 1e-4


@pytest.mark.parametrize("k", [10, 100])
def test_searcher_pallas_ranks_like_jnp(real_index, minilm_model, k, caplog):
    rankings = {}
    with caplog.at_level(logging.WARNING, logger="pallas_kernels"):
        for implementation in ("pallas", "jnp", "auto"):
            searcher = colbert_jax.Searcher(
                real_index, checkpoint=minilm_model, implementation=implementation, truncate=True
            )
            rankings[implementation] = searcher.search_all(QUERIES, k=k).todict()
            if implementation == "auto":
                assert searcher.implementation == "pallas"
    assert not [r for r in caplog.records if r.name == "pallas_kernels"], "a kernel fell back to jnp"
    for qid in rankings["jnp"]:
        want = rankings["jnp"][qid]
        for implementation in ("pallas", "auto"):
            got = rankings[implementation][qid]
            assert [p for p, _, _ in got] == [p for p, _, _ in want], (implementation, qid)
            np.testing.assert_allclose([s for *_, s in got], [s for *_, s in want], rtol=1e-5, atol=1e-4)


def test_codec_decompression_compiled(real_index):
    index = colbert_jax.Index.open(real_index)
    codec = index.codec
    n = min(50_000, len(index.codes))
    codes, residuals = np.asarray(index.codes[:n]), np.asarray(index.residuals[:n])
    got = codec.decompress(codes, residuals)  # auto: the Pallas kernel on GPU (strict: no fallback)
    want = pallas_kernels.decompress(
        codec.centroids[codes], residuals, codec.bucket_weights, nbits=codec.nbits, implementation="jnp"
    )
    assert got.shape == (n, codec.dim)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-6)
