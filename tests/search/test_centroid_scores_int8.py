"""Stage 1's centroid scores on int8 operands with AVX-512 VNNI (`native.centroid_scores_int8`,
`centroid_scores_int8.cc`): centroids quantized and packed by `native.block_centroids_int8`, Q quantized per token
in the kernel (`native.quantize_rows_int8`), exact integer sums scaled by both rows' scales, S held as float16. Its
S has the bits of that formula computed in numpy and by XLA (`candidates._int8_product`'s twin), within int8's (and
float16's) rounding of the float32 S, and its block maxima are S's. On a build without AVX-512 VNNI the kernel tests
check that `stage1_int8_available()` says so and that calling the kernel is a `NativeBuildError` (nothing is
skipped). The searcher with int8 operands is checked beside bfloat16's (`test_centroid_scores_bf16`) and its quality
on the 1,000-query collection in `test_quality`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colbert_jax import native
from colbert_jax.search import candidates
from tests.search.test_centroid_scores import _problem, stage1_arrays

# (P, Lq, dim): partial groups, one token, 7 tokens, one/two vectors of tokens and masked tails, a dim not a
# multiple of 4, threads (P > 2048) and several tasks
SHAPES = [(100, 1, 64), (17, 7, 96), (64, 32, 128), (50, 40, 128), (4100, 32, 128), (3, 48, 64), (13, 20, 65)]


def _reference(C: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """((codes_C . codes_Q^T) * scale_C) * scale_Q in float32, the integer products exact (float64 sums), rounded
    to float16 (nearest even)."""
    cc, cs = native.quantize_rows_int8(np.asarray(C, np.float32))
    qc, qs = native.quantize_rows_int8(np.asarray(Q, np.float32))
    dots = (cc.astype(np.float64) @ qc.T.astype(np.float64)).astype(np.float32)
    return ((dots * cs[:, None]) * qs[None, :]).astype(np.float16)


def _packed(C: np.ndarray):
    return tuple(jnp.asarray(x) for x in native.block_centroids_int8(C))


def _kernel(p: int, block_maxima: bool = False):
    return jax.jit(functools.partial(native.centroid_scores_int8, num_centroids=p, block_maxima=block_maxima))


def _unavailable_is_an_error(packed, terms, Q, p: int) -> bool:
    """True where the kernel runs here; else checks the refusal (what these tests can check on such a build)."""
    if native.stage1_int8_available():
        return True
    with pytest.raises(native.NativeBuildError, match="VNNI"):
        native.centroid_scores_int8(packed, terms, Q, p)
    return False


def test_availability_follows_the_cpu():
    flags = next((ln for ln in open("/proc/cpuinfo").read().splitlines() if ln.startswith("flags")), "").split()
    if native.stage1_int8_available():
        assert "avx512_vnni" in flags and native.vector_bits() == 512
    elif "avx512_vnni" in flags and native.enabled():
        assert native.vector_bits() < 512  # built for an older CPU type (COLBERT_JAX_NATIVE_ARCH)


def test_quantization():
    x = np.array([[0.5, -0.25, 0.125, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.0079, 0.0118]], np.float32)
    codes, scales = native.quantize_rows_int8(x)
    np.testing.assert_array_equal(codes[0], [127, -64, 32, 0])  # -63.5 and 31.75: nearest, a tie to even
    np.testing.assert_array_equal(codes[1], 0)
    assert scales[1] == 0  # a zero row (a padding token) scores 0
    np.testing.assert_array_equal(codes[2], [-127, 64, 1, 1])  # 63.5 -> 64 (even); 0.5017 -> 1; 0.749 -> 1
    np.testing.assert_array_equal(scales, np.float32([0.5, 0.0, 2.0]) * np.float32(1 / 127))
    # a jax array in: the same codes and scales
    for a, b in zip(jax.jit(native.quantize_rows_int8)(jnp.asarray(x)), (codes, scales)):
        np.testing.assert_array_equal(np.asarray(a), b)
    C = _problem(50, 1, 128)[0]
    codes, scales = native.quantize_rows_int8(C)
    assert np.abs(codes).max() == 127 and (np.abs(codes).max(axis=1) == 127).all()
    assert np.abs(codes * scales[:, None] - C).max() <= scales.max() / 2 + 1e-7


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_is_the_int8_product(shape):
    p, lq, dim = shape
    C, Q = _problem(p, lq, dim)
    packed, terms = _packed(C)
    if not _unavailable_is_an_error(packed, terms, Q, p):
        return
    got = np.asarray(_kernel(p)(packed, terms, Q))
    assert got.shape == (p, lq) and got.dtype == np.float16
    np.testing.assert_array_equal(got, _reference(C, Q))
    # against the float32 product: within int8's rounding of both rows (half a step of each scale, per term)
    exact = C.astype(np.float64) @ Q.T.astype(np.float64)
    cs = np.abs(C).max(axis=1) / 127
    qs = np.abs(np.asarray(Q)).max(axis=1) / 127
    bound = 0.5 * (np.outer(cs, np.abs(np.asarray(Q)).sum(1)) + np.outer(np.abs(C).sum(1), qs))
    bound += 0.25 * dim * np.outer(cs, qs) + 1e-6
    bound += np.abs(exact) * 2.0**-11 * 1.01 + 2.0**-25  # float16's rounding (half a step; subnormals below 2^-14)
    got = got.astype(np.float64)
    assert (np.abs(got - exact) <= bound).all()
    assert np.abs(got - exact).max() > 1e-4  # int8 is not float32 (a check that the operands were quantized)


@pytest.mark.parametrize("p", [100, 256, 4100, 8192])
def test_block_maxima_are_ss(p):
    C, Q = _problem(p, 32, 128)
    packed, terms = _packed(C)
    if not _unavailable_is_an_error(packed, terms, Q, p):
        return
    S, maxima = _kernel(p, block_maxima=True)(packed, terms, Q)
    S = np.asarray(S)
    np.testing.assert_array_equal(S, np.asarray(_kernel(p)(packed, terms, Q)))
    padded = np.full((-(-p // 128) * 128, 32), -np.inf, np.float32)
    padded[:p] = S
    assert maxima.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(maxima), padded.reshape(-1, 128, 32).max(axis=1))


def test_zero_query_tokens_score_zero():
    """Padding tokens (zero rows of Q) get S = 0 for every centroid, as the quantization's zero scale says."""
    p, lq, dim = 300, 32, 128
    C, Q = _problem(p, lq, dim)
    Q = np.array(Q)
    Q[20:] = 0.0
    packed, terms = _packed(C)
    if not _unavailable_is_an_error(packed, terms, Q, p):
        return
    S = np.asarray(_kernel(p)(packed, terms, Q))
    assert (S[:, 20:] == 0).all() and (S[:, :20] != 0).any()
    np.testing.assert_array_equal(S, _reference(C, Q))


def test_vmapped_runs_once_per_query():
    p, lq, dim = 200, 32, 128
    C, _ = _problem(p, lq, dim)
    Qs = np.stack([_problem(1, lq, dim, seed=s)[1] for s in range(3)])
    packed, terms = _packed(C)
    if not _unavailable_is_an_error(packed, terms, Qs[0], p):
        return
    S, maxima = jax.jit(jax.vmap(lambda Q: native.centroid_scores_int8(packed, terms, Q, p, block_maxima=True)))(Qs)
    for b in range(3):
        np.testing.assert_array_equal(np.asarray(S[b]), _reference(C, Qs[b]))
        np.testing.assert_array_equal(np.asarray(maxima[b]), np.asarray(_kernel(p, True)(packed, terms, Qs[b])[1]))


def test_packed_layout():
    C = _problem(13, 1, 97)[0]
    packed, terms = native.block_centroids_int8(C)
    assert packed.shape == (2, 25, 8, 4) and packed.dtype == np.int8 and packed.flags.c_contiguous
    assert terms.shape == (16, 2) and terms.dtype == np.float32
    codes, scales = native.quantize_rows_int8(C)
    for p in range(13):
        np.testing.assert_array_equal(packed[p // 8, :, p % 8, :].reshape(-1)[:97], codes[p])
        assert not packed[p // 8, -1, p % 8, 1:].any()  # zeros past dim
        assert terms[p, 0] == scales[p] and terms[p, 1] == 128 * codes[p].sum()
    assert not packed[1, :, 5:].any() and not terms[13:].any()  # zeros past P
    with pytest.raises(ValueError, match="float"):
        native.block_centroids_int8(C[0])
    with pytest.raises(ValueError, match="dim 640"):
        native.block_centroids_int8(np.ones((4, 640), np.float32))


def test_bad_shapes_are_errors():
    C, Q = _problem(100, 32, 96)
    packed, terms = _packed(C)
    if not _unavailable_is_an_error(packed, terms, Q, 100):
        return
    with pytest.raises(ValueError, match="do not hold"):
        native.centroid_scores_int8(packed, terms, Q, 90)  # 13 groups are not P=90's 12
    with pytest.raises(ValueError, match="do not fit"):
        native.centroid_scores_int8(packed, terms, Q[:, :64], 100)
    with pytest.raises(ValueError, match="terms"):
        native.centroid_scores_int8(packed, terms[:8], Q, 100)
    with pytest.raises(ValueError, match="packed centroids"):
        native.centroid_scores_int8(jnp.asarray(native.block_centroids_bf16(C)), terms, Q, 100)


@pytest.mark.parametrize("native_on", [True, False], ids=["kernel", "xla"])
def test_stage_1_on_int8_centroids(native_on, monkeypatch):
    """S and maxima through `centroid_scores_and_maxima` on arrays carrying the int8 centroids: the kernel's bits
    where it runs, else XLA's twin, with the same bits (exact integer sums, the same two scalings);
    `row_scores` of gathered rows (stage 6's q . c) are float32's product, not S's rows."""
    if not native_on:
        monkeypatch.setenv(native.ENV, "0")
    p, lq = 300, 32
    C, Q = _problem(p, lq + 4, 128)
    packed, terms = _packed(C)
    arrays = stage1_arrays(C, centroids_int8=packed, centroids_int8_terms=terms)
    assert arrays.approximate_scores and arrays.scores_dtype == jnp.float16
    S, maxima = (np.asarray(a) for a in jax.jit(lambda Q: candidates.centroid_scores_and_maxima(Q, arrays, lq))(Q))
    assert S.dtype == np.float16 and maxima.dtype == np.float32
    np.testing.assert_array_equal(S, _reference(C, Q[:lq]))
    padded = np.full((384, lq), -np.inf, np.float32)
    padded[:p] = S
    np.testing.assert_array_equal(maxima, padded.reshape(3, 128, lq).max(axis=1))
    rows = np.array([5, 299, 5, 130, 0])
    got = np.asarray(jax.jit(lambda c, Q: candidates.row_scores(c, Q, arrays))(jnp.asarray(C[rows]), Q[:lq]))
    exact = C[rows].astype(np.float64) @ np.asarray(Q[:lq], np.float64).T
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5)
    assert np.abs(S[rows] - exact).max() > 1e-4  # int8's S is further off


@pytest.mark.parametrize("ncells", [1, 2])
def test_cells_are_float32s_choice_among_the_approximate_best(ncells):
    """With S from int8 operands, each token's cells are the best by float32 q . c among its ncells +
    CELL_REFINE best by S: where int8's rounding reorders a near tie at the cut, the cells are still float32's."""
    p, lq = 2048, 32
    lengths = jnp.ones(p + 1, jnp.int32).at[p].set(0)  # one IVF entry a cell (none for the padding cell P)
    run = jax.jit(functools.partial(candidates.cells_one, ncells=ncells, query_maxlen=lq))
    for seed in range(20):  # a problem where int8's S alone picks other cells for some token: the test can fail
        C, Q = _problem(p, lq, 128, seed=seed)
        packed, terms = _packed(C)
        approximate = dataclasses.replace(
            stage1_arrays(C, centroids_int8=packed, centroids_int8_terms=terms), ivf_lengths=lengths
        )
        exact = np.asarray(C, np.float64) @ np.asarray(Q, np.float64).T
        want = np.sort(np.argsort(-exact, axis=0, kind="stable")[:ncells].T, axis=1)
        S_int8 = np.asarray(run(Q, approximate)[0])
        if (np.sort(np.argsort(-S_int8, axis=0, kind="stable")[:ncells].T, axis=1) != want).any():
            break
    else:
        raise AssertionError("no problem where int8's S picks other cells than float32's")
    f32 = dataclasses.replace(approximate, centroids_int8=None, centroids_int8_terms=None)
    for arrays in (approximate, f32):
        _, cells, n = run(Q, arrays)
        cells = np.asarray(cells)
        np.testing.assert_array_equal(cells[cells < p], np.unique(want))
        assert int(n) == len(np.unique(want))
