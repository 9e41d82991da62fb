"""Stage 1's float32 centroid scores on CPUs without AMX-BF16 (`native.centroid_scores_f32`,
`centroid_scores_f32.cc`): centroids in groups of 8 (`native.block_centroids`), each score one FMA chain over k.
The vector paths (AVX-512 or AVX2, whichever this build has) give the scalar loops' bits, float32-accurate
against the exact product and XLA's; a Searcher places the blocked centroids exactly where the kernel is the
faster stage 1 (no AMX-BF16; an AVX-512 or AVX2 build), and its rankings equal those of XLA's product there;
bad shapes are errors. (`test_centroid_scores.py` checks, for both CPU layouts, that gathered rows score as
their rows of S and that programs lowered for accelerators take XLA's product.)"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import colbert_jax
from colbert_jax import native
from colbert_jax.search import candidates, placement
from colbert_jax.search.arrays import IndexArrays
from tests.search.test_centroid_scores import _problem, stage1_arrays

# (P, Lq, dim): a partial group, one token, one/two/three vectors of tokens and a masked tail, threads (P > 2048)
SHAPES = [(100, 20, 96), (17, 1, 8), (64, 32, 128), (50, 40, 128), (4100, 32, 128), (3, 48, 64), (8, 16, 160)]


def _arrays(C: np.ndarray, blocked: bool) -> IndexArrays:
    return stage1_arrays(C, centroids_blocked=jnp.asarray(native.block_centroids(C)) if blocked else None)


def _kernel(implementation: str, p: int):
    return jax.jit(functools.partial(native.centroid_scores_f32, num_centroids=p, implementation=implementation))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_is_the_float32_product(shape, monkeypatch):
    C, Q = _problem(*shape)
    blocked = jnp.asarray(native.block_centroids(C))
    got = np.asarray(_kernel("vector", shape[0])(blocked, Q))
    assert got.shape == (shape[0], shape[1]) and got.dtype == np.float32
    # the vector code is the scalar loops' FMA chain: the same bits
    np.testing.assert_array_equal(got, np.asarray(_kernel("scalar", shape[0])(blocked, Q)))
    exact = C.astype(np.float64) @ Q.T.astype(np.float64)
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-6)
    # XLA's float32 product (the kernels off): equal up to float32 accumulation order
    monkeypatch.setenv(native.ENV, "0")
    xla = np.asarray(jax.jit(lambda Q: candidates.centroid_scores(Q, _arrays(C, True), shape[1]))(Q))
    np.testing.assert_allclose(got, xla, rtol=0, atol=1e-6)


@pytest.mark.parametrize("implementation", ["vector", "scalar"])
@pytest.mark.parametrize("p", [100, 256, 4100, 8192])
def test_kernel_gives_the_block_maxima_top_cells_ranks(p, implementation):
    """The maxima over blocks of 128 centroids that the kernel takes beside S are S's (a partial last block,
    one task's two blocks, several tasks), and `top_cells` picks the same cells from them as from S alone."""
    C, Q = _problem(p, 32, 128)
    blocked = jnp.asarray(native.block_centroids(C))
    fn = functools.partial(native.centroid_scores_f32, num_centroids=p, implementation=implementation)
    S, maxima = jax.jit(functools.partial(fn, block_maxima=True))(blocked, Q)
    np.testing.assert_array_equal(np.asarray(S), np.asarray(jax.jit(fn)(blocked, Q)))
    S = np.asarray(S)
    padded = np.full((-(-p // 128) * 128, 32), -np.inf, np.float32)
    padded[:p] = S
    np.testing.assert_array_equal(np.asarray(maxima), padded.reshape(-1, 128, 32).max(axis=1))
    if p % 128 == 0:
        for n in (1, 4, 8):
            top = jax.jit(candidates.top_cells, static_argnums=1)
            np.testing.assert_array_equal(
                np.sort(np.asarray(top(jnp.asarray(S), n, maxima)), axis=1),
                np.sort(np.asarray(top(jnp.asarray(S), n)), axis=1),
            )
    # the stage-1 path a search takes: the same S and maxima through `centroid_scores_and_maxima`
    got_S, got_max = jax.jit(lambda Q: candidates.centroid_scores_and_maxima(Q, _arrays(C, True), 32))(Q)
    if implementation == "vector":
        np.testing.assert_array_equal(np.asarray(got_S), S)
        np.testing.assert_array_equal(np.asarray(got_max), np.asarray(maxima))


@pytest.mark.parametrize("shape", [(300, 1, 64), (300, 20, 128), (4100, 40, 128), (129, 48, 32)])
def test_vector_maxima_are_the_scalar_passs_with_nans_and_infinities(shape):
    """The AVX-512 tiles fold each group's maxima from their registers; the scalar path takes them in a pass over
    S afterwards. Both give the same bits, with NaN and infinite scores among them (a NaN anywhere in a block
    makes that token's maximum NaN, as XLA's max does), for any number of tokens and a partial last block."""
    p, lq, dim = shape
    C, Q = _problem(p, lq, dim)
    C = np.array(C)
    C[3] = np.nan  # a NaN row of S in the first block
    C[p - 2] = 0.0  # zeros beside a partial last group
    C[130 % p] = 0.0
    C[130 % p, 0] = np.inf  # +-inf scores (the sign of each token's first coordinate)
    blocked = jnp.asarray(native.block_centroids(C))
    got = {}
    for implementation in ("vector", "scalar"):
        fn = functools.partial(native.centroid_scores_f32, num_centroids=p, implementation=implementation)
        got[implementation] = [np.asarray(a) for a in jax.jit(functools.partial(fn, block_maxima=True))(blocked, Q)]
    np.testing.assert_array_equal(got["vector"][0], got["scalar"][0])
    np.testing.assert_array_equal(got["vector"][1], got["scalar"][1])
    assert np.isnan(got["vector"][1][0]).all() and np.isinf(got["vector"][0]).any()


def test_maxima_without_the_kernels_are_xlas(monkeypatch):
    """With the kernels off (or lowered for another platform) the blocked path's maxima come from XLA's S."""
    monkeypatch.setenv(native.ENV, "0")
    C, Q = _problem(300, 32, 128)
    S, maxima = jax.jit(lambda Q: candidates.centroid_scores_and_maxima(Q, _arrays(C, True), 32))(Q)
    padded = np.full((384, 32), -np.inf, np.float32)
    padded[:300] = np.asarray(S)
    np.testing.assert_array_equal(np.asarray(maxima), padded.reshape(3, 128, 32).max(axis=1))


def test_block_layout():
    C = _problem(13, 1, 96)[0]
    blocked = native.block_centroids(C)
    assert blocked.shape == (2, 96, 8) and blocked.dtype == np.float32 and blocked.flags.c_contiguous
    for p in range(13):
        np.testing.assert_array_equal(blocked[p // 8, :, p % 8], C[p])
    assert not blocked[1, :, 5:].any()  # zeros past P
    # inside a program (rows gathered there): the same layout from a jax array
    np.testing.assert_array_equal(np.asarray(jax.jit(native.block_centroids)(jnp.asarray(C))), blocked)
    with pytest.raises(ValueError, match="float"):
        native.block_centroids(C[0])


def test_searcher_blocks_the_centroids_where_the_kernel_is_stage_1(real_index, minilm_model, monkeypatch):
    searcher = colbert_jax.Searcher(real_index, checkpoint=minilm_model, truncate=True)
    blocked = searcher.arrays.centroids_blocked
    float32 = (
        not native.amx_bf16_available() and native.scores_f32_vectorized() and placement.stage1_precision(True) == "f32"
    )
    assert (blocked is not None) == float32
    queries = ["how do I read a file line by line", "sort a list of dictionaries by a key", "parse a URL"]
    # the same searcher with the blocked centroids forced on, against XLA's product: the same rankings
    engine = searcher._plaid_engine()
    centroids = np.asarray(searcher.index.codec.centroids)
    blocked = jnp.asarray(native.block_centroids(centroids))
    forced = dataclasses.replace(
        engine.arrays,
        centroids_split=None,
        centroids_blocked=blocked,
        centroids_bf16=None,
        centroids_int8=None,
        centroids_int8_terms=None,
    )
    plain = dataclasses.replace(forced, centroids_blocked=None)
    results = {}
    for name, a in (("blocked", forced), ("xla", plain)):
        monkeypatch.setattr(engine, "arrays", a)
        results[name] = [searcher.search(q, k=10) for q in queries]
    for got, want in zip(results["blocked"], results["xla"]):
        assert [pid for pid, _, _ in got] == [pid for pid, _, _ in want]
        np.testing.assert_allclose([s for _, _, s in got], [s for _, _, s in want], rtol=0, atol=1e-4)


def test_bad_shapes_are_errors():
    C, Q = _problem(100, 32, 96)
    blocked = jnp.asarray(native.block_centroids(C))
    with pytest.raises(ValueError, match="do not hold"):
        native.centroid_scores_f32(blocked, Q, 90)  # 13 groups are not P=90's 12
    with pytest.raises(ValueError, match="blocked centroids"):
        native.centroid_scores_f32(blocked, Q[:, :64], 100)
    with pytest.raises(ValueError, match="blocked centroids"):
        native.centroid_scores_f32(jnp.asarray(C), Q, 100)
    with pytest.raises(ValueError, match="implementation"):
        native.centroid_scores_f32(blocked, Q, 100, implementation="fast")
