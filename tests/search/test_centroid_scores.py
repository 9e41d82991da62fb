"""Stage 1's centroid scores on the tile unit (`native.centroid_scores`, `centroid_scores.cc`): three bfloat16
products accumulated in float32, on AMX-BF16 tiles where the CPU has them and by portable loops everywhere.
Both are within a few 1e-6 of the exact product of unit vectors and equal the same three products run by XLA
(the fallback with the kernels off) to float32 rounding; a gathered row's scores (`row_scores`, stage 6 over
rows read from disk) equal its row of S exactly; a Searcher places the split centroids exactly where the CPU
has AMX-BF16; programs lowered for accelerators take the float32 product (with either CPU layout of the
centroids: split, or in groups of 8 for `native.centroid_scores_f32`); bad shapes are errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import colbert_jax
from colbert_jax import native
from colbert_jax.search import candidates
from colbert_jax.search.arrays import IndexArrays
from tests.kernels.lowering import lower

# (P, Lq, dim): a partial row block, one/two/three column blocks, a partial k step, threads (P > 2048)
SHAPES = [(100, 20, 96), (17, 1, 8), (64, 32, 128), (50, 40, 128), (4096, 32, 128), (2, 16, 160)]


def _unit(rng, *shape) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _problem(p: int, lq: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return _unit(rng, p, dim), _unit(rng, lq, dim)


def stage1_arrays(C: np.ndarray, **fields) -> IndexArrays:
    """Arrays carrying only what stage 1 reads: the centroids, and `fields` (their split or blocked forms)."""
    return IndexArrays(
        centroids=jnp.asarray(C),
        bucket_weights=jnp.zeros(4),
        codes=jnp.zeros(1, jnp.int32),
        doclens=jnp.zeros(1, jnp.int32),
        offsets=jnp.zeros(1, jnp.int32),
        first=jnp.zeros((), jnp.int32),
        count=jnp.zeros((), jnp.int32),
        **fields,
    )


def _arrays(C: np.ndarray, split: bool) -> IndexArrays:
    return stage1_arrays(C, centroids_split=jnp.asarray(native.split_centroids(C)) if split else None)


def _kernel(implementation: str, p: int):
    return jax.jit(functools.partial(native.centroid_scores, num_centroids=p, implementation=implementation))


@pytest.mark.parametrize("implementation", native.SCORES_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_is_the_three_products(implementation, shape, monkeypatch):
    C, Q = _problem(*shape)
    split = jnp.asarray(native.split_centroids(C))
    if implementation == "amx" and not native.amx_bf16_available():
        with pytest.raises(native.NativeBuildError, match="AMX-BF16"):
            _kernel(implementation, shape[0])(split, Q)
        return
    got = np.asarray(_kernel(implementation, shape[0])(split, Q))
    assert got.shape == (shape[0], shape[1]) and got.dtype == np.float32
    exact = C.astype(np.float64) @ Q.T.astype(np.float64)
    np.testing.assert_allclose(got, exact, rtol=0, atol=5e-6)  # float32 alone: ~1e-7; one bfloat16 term: ~1e-3
    one_term = C.astype(jnp.bfloat16).astype(np.float64) @ Q.T.astype(jnp.bfloat16).astype(np.float64)
    assert np.abs(got - exact).max() * 20 < np.abs(one_term - exact).max()  # the low terms count
    # the same three products by XLA (the kernels off): equal up to float32 accumulation order
    monkeypatch.setenv(native.ENV, "0")
    xla = np.asarray(jax.jit(lambda Q: candidates.centroid_scores(Q, _arrays(C, True), shape[1]))(Q))
    np.testing.assert_allclose(got, xla, rtol=0, atol=2e-7)


def test_split_terms():
    C = _problem(100, 1, 96)[0] * 3.0
    split = native.split_centroids(C)
    assert split.shape == (2, 112, 96) and split.dtype == jnp.bfloat16
    hi, lo = split.astype(np.float32)
    np.testing.assert_array_equal(hi[:100], C.astype(jnp.bfloat16).astype(np.float32))
    assert not hi[100:].any() and not lo[100:].any()
    # two terms hold about 16 of float32's 24 bits
    np.testing.assert_allclose(hi[:100] + lo[:100], C, rtol=2.0**-16, atol=0)
    assert np.abs(hi[:100] + lo[:100] - C).max() > 0


@pytest.mark.parametrize("layout", ["split", "blocked"])
def test_gathered_rows_score_as_their_rows_of_S(layout):
    # stage 6 over rows read from disk has no S: each gathered centroid's scores must equal its row of S, with
    # either CPU layout of the centroids (AMX-BF16's split terms, or `native.centroid_scores_f32`'s groups of 8)
    C, Q = _problem(300, 32, 128, seed=2)
    if layout == "split":
        arrays = _arrays(C, True)
    else:
        arrays = stage1_arrays(C, centroids_blocked=jnp.asarray(native.block_centroids(C)))
    codes = np.random.default_rng(3).integers(0, 300, 517)
    S = jax.jit(lambda Q: candidates.centroid_scores(Q, arrays, 32))(Q)
    rows = jax.jit(lambda c, Q: candidates.row_scores(c, Q, arrays))(jnp.asarray(C[codes]), Q)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(S)[codes])
    plain = _arrays(C, False)  # without the split: the float32 product, both ways
    S = jax.jit(lambda Q: candidates.centroid_scores(Q, plain, 32))(Q)
    np.testing.assert_allclose(np.asarray(S), C @ Q.T, rtol=0, atol=1e-6)


def test_searcher_splits_the_centroids_where_the_cpu_has_amx_bf16(real_index, minilm_model):
    searcher = colbert_jax.Searcher(real_index, checkpoint=minilm_model, truncate=True)
    split = searcher.arrays.centroids_split
    assert (split is not None) == native.amx_bf16_available()
    if split is not None:
        np.testing.assert_array_equal(np.asarray(split), native.split_centroids(searcher.index.codec.centroids))


@pytest.mark.parametrize("layout", ["split", "blocked"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowers_for_accelerators_without_the_kernel(platform, layout):
    # either CPU layout of the centroids (AMX-BF16's split terms, or the float32 kernel's groups of 8)
    C, Q = _problem(64, 32, 128)
    if layout == "split":
        arrays = _arrays(C, True)
    else:
        arrays = stage1_arrays(C, centroids_blocked=jnp.asarray(native.block_centroids(C)))
    text = lower(
        lambda Q, a: candidates.centroid_scores(Q, a, 32), Q, arrays, platform=platform, name="centroid scores"
    )
    assert "colbert_jax_centroid_scores" not in text and "dot_general" in text


def test_bad_shapes_are_errors():
    C, Q = _problem(100, 32, 96)
    split = jnp.asarray(native.split_centroids(C))
    with pytest.raises(ValueError, match="do not fit"):
        native.centroid_scores(split, Q, 90, implementation="portable")  # Pp 112 is not P=90's
    with pytest.raises(ValueError, match="do not fit"):
        native.centroid_scores(split, Q[:, :64], 100, implementation="portable")
    with pytest.raises(ValueError, match="bfloat16"):
        native.centroid_scores(split.astype(jnp.float32), Q, 100, implementation="portable")
    with pytest.raises(ValueError, match="implementation"):
        native.centroid_scores(split, Q, 100, implementation="fast")
    with pytest.raises(ValueError, match="float"):
        native.split_centroids(C[0])
