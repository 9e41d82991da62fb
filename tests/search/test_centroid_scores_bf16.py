"""Stage 1's centroid scores on bfloat16 operands with AVX-512 BF16 (`native.centroid_scores_bf16`,
`centroid_scores_bf16.cc`): centroids packed by `native.block_centroids_bf16`, Q rounded to bfloat16 in the
kernel, float32 sums. Its S is the product of the bf16-rounded operands summed in vdpbf16ps' defined order (each
pair's odd coordinate, then its even one), within bfloat16's rounding error of the float32 S, and its block
maxima are S's. A search places the packed centroids where `placement.stage1_precision` says "bf16"
(COLBERT_JAX_STAGE1),
and its stage 1 (the kernel, or XLA's product of the same rounded operands) gives that S. On a CPU without
AVX-512 BF16 the kernel tests check that `avx512_bf16_available()` says so and that calling the kernel is a
`NativeBuildError` (nothing is skipped)."""

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
from tests.search.test_centroid_scores import _problem, stage1_arrays

# (P, Lq, dim): partial groups, one token, 7 tokens, one/two vectors of tokens and masked tails, an odd dim,
# threads (P > 2048) and several tasks
SHAPES = [(100, 1, 64), (17, 7, 96), (64, 32, 128), (50, 40, 128), (4100, 32, 128), (3, 48, 64), (13, 20, 65)]


def _bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(jnp.bfloat16).astype(np.float32)


def _reference(C: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """bf16(C) . bf16(Q)^T with float32 sums in vdpbf16ps' order: per coordinate pair (2kk, 2kk + 1), the odd
    product then the even one (each product of two bfloat16 is exact in float32)."""
    c, q = _bf16(C), _bf16(Q)
    if c.shape[1] % 2:
        c, q = np.pad(c, ((0, 0), (0, 1))), np.pad(q, ((0, 0), (0, 1)))
    acc = np.zeros((c.shape[0], q.shape[0]), np.float32)
    for kk in range(c.shape[1] // 2):
        for k in (2 * kk + 1, 2 * kk):
            acc = acc + np.outer(c[:, k], q[:, k])
    return acc


def _kernel(p: int, block_maxima: bool = False):
    return jax.jit(functools.partial(native.centroid_scores_bf16, num_centroids=p, block_maxima=block_maxima))


def _unavailable_is_an_error(packed, Q, p: int) -> bool:
    """True where the kernel runs here; else checks the refusal (what these tests can check on such a CPU)."""
    if native.avx512_bf16_available():
        return True
    with pytest.raises(native.NativeBuildError, match="AVX-512 BF16"):
        native.centroid_scores_bf16(packed, Q, p)
    return False


def test_availability_follows_the_cpu():
    flags = next((ln for ln in open("/proc/cpuinfo").read().splitlines() if ln.startswith("flags")), "").split()
    if native.avx512_bf16_available():
        assert "avx512_bf16" in flags and native.vector_bits() == 512
    elif "avx512_bf16" in flags and native.enabled():
        assert native.vector_bits() < 512  # built for an older CPU type (COLBERT_JAX_NATIVE_ARCH)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_is_the_bf16_product(shape):
    p, lq, dim = shape
    C, Q = _problem(p, lq, dim)
    packed = jnp.asarray(native.block_centroids_bf16(C))
    if not _unavailable_is_an_error(packed, Q, p):
        return
    got = np.asarray(_kernel(p)(packed, Q))
    assert got.shape == (p, lq) and got.dtype == np.float32
    # the instruction's defined rounding: the same bits as the reference
    np.testing.assert_array_equal(got, _reference(C, Q))
    exact_bf16 = _bf16(C).astype(np.float64) @ _bf16(Q).T.astype(np.float64)
    np.testing.assert_allclose(got, exact_bf16, rtol=0, atol=1e-6)
    # against the float32 product: within bfloat16's rounding of both operands (2^-9 relative each, per term)
    exact = C.astype(np.float64) @ Q.T.astype(np.float64)
    bound = 2.0**-8 * (np.abs(C).astype(np.float64) @ np.abs(Q).T.astype(np.float64)) + 1e-6
    assert (np.abs(got - exact) <= bound).all()
    assert np.abs(got - exact).max() > 0  # bf16 is not float32 (a check that the operands were rounded)


@pytest.mark.parametrize("p", [100, 256, 4100, 8192])
def test_block_maxima_are_ss(p):
    C, Q = _problem(p, 32, 128)
    packed = jnp.asarray(native.block_centroids_bf16(C))
    if not _unavailable_is_an_error(packed, Q, p):
        return
    S, maxima = _kernel(p, block_maxima=True)(packed, Q)
    S = np.asarray(S)
    np.testing.assert_array_equal(S, np.asarray(_kernel(p)(packed, Q)))
    padded = np.full((-(-p // 128) * 128, 32), -np.inf, np.float32)
    padded[:p] = S
    np.testing.assert_array_equal(np.asarray(maxima), padded.reshape(-1, 128, 32).max(axis=1))


def test_maxima_with_nans_and_infinities():
    """A NaN centroid makes its block's maxima NaN (as XLA's max); infinite scores pass through."""
    p, lq, dim = 300, 20, 128
    C, Q = _problem(p, lq, dim)
    C = np.array(C)
    C[3] = np.nan
    C[130] = 0.0
    C[130, 0] = np.inf
    packed = jnp.asarray(native.block_centroids_bf16(C))
    if not _unavailable_is_an_error(packed, Q, p):
        return
    S, maxima = (np.asarray(a) for a in _kernel(p, block_maxima=True)(packed, Q))
    assert np.isnan(S[3]).all() and np.isnan(maxima[0]).all()
    assert np.isinf(S[130]).all() and (np.abs(maxima[1]) == np.inf).any()
    assert np.isfinite(maxima[2]).all()


def test_vmapped_runs_once_per_query():
    p, lq, dim = 200, 32, 128
    C, _ = _problem(p, lq, dim)
    Qs = np.stack([_problem(1, lq, dim, seed=s)[1] for s in range(3)])
    packed = jnp.asarray(native.block_centroids_bf16(C))
    if not _unavailable_is_an_error(packed, Qs[0], p):
        return
    S, maxima = jax.jit(jax.vmap(lambda Q: native.centroid_scores_bf16(packed, Q, p, block_maxima=True)))(Qs)
    for b in range(3):
        np.testing.assert_array_equal(np.asarray(S[b]), _reference(C, Qs[b]))
        np.testing.assert_array_equal(np.asarray(maxima[b]), np.asarray(_kernel(p, True)(packed, Qs[b])[1]))


def test_packed_layout():
    C = _problem(13, 1, 97)[0]
    packed = native.block_centroids_bf16(C)
    assert packed.shape == (2, 49, 8, 2) and packed.dtype == jnp.bfloat16 and packed.flags.c_contiguous
    rounded = C.astype(jnp.bfloat16)  # ml_dtypes' round to nearest even
    for p in range(13):
        np.testing.assert_array_equal(packed[p // 8, :, p % 8, :].reshape(-1)[:97], rounded[p])
        assert not packed[p // 8, -1, p % 8, 1].astype(np.float32)  # zero past dim
    assert not packed[1, :, 5:].astype(np.float32).any()  # zeros past P
    # a jax array in: the same layout
    np.testing.assert_array_equal(np.asarray(jax.jit(native.block_centroids_bf16)(jnp.asarray(C))), packed)
    # round to nearest even at a tie: 1 + 2^-8 is halfway between bf16's 1 and 1 + 2^-7, and goes to 1
    tie = np.full((1, 2), 1 + 2.0**-8, np.float32)
    assert (native.block_centroids_bf16(tie)[0, 0, 0].astype(np.float32) == 1.0).all()
    with pytest.raises(ValueError, match="float"):
        native.block_centroids_bf16(C[0])


def test_bad_shapes_are_errors():
    C, Q = _problem(100, 32, 96)
    packed = jnp.asarray(native.block_centroids_bf16(C))
    if not _unavailable_is_an_error(packed, Q, 100):
        return
    with pytest.raises(ValueError, match="do not hold"):
        native.centroid_scores_bf16(packed, Q, 90)  # 13 groups are not P=90's 12
    with pytest.raises(ValueError, match="do not fit"):
        native.centroid_scores_bf16(packed, Q[:, :64], 100)
    with pytest.raises(ValueError, match="packed centroids"):
        native.centroid_scores_bf16(jnp.asarray(native.block_centroids(C)), Q, 100)


def test_stage1_mode_follows_the_env(monkeypatch):
    # "auto": float32 on AMX-BF16 (its tiles run float32-class faster), else int8 where its kernel runs, else
    # bfloat16 where its kernel runs, else float32
    if native.amx_bf16_available():
        auto = "f32"
    elif native.stage1_int8_available():
        auto = "int8"
    else:
        auto = "bf16" if native.avx512_bf16_available() else "f32"
    cases = (("", auto), ("auto", auto), ("AUTO", auto), ("f32", "f32"), ("F32", "f32"), ("bf16", "bf16"))
    for value, on_cpu in (*cases, ("int8", "int8"), (" Int8 ", "int8")):
        monkeypatch.setenv(placement.STAGE1_ENV, value)
        assert placement.stage1_precision(True) == on_cpu
        assert placement.stage1_precision(False) == "f32"  # accelerators: XLA's float32 product
    monkeypatch.setenv(placement.STAGE1_ENV, "fp8")
    with pytest.raises(ValueError, match=placement.STAGE1_ENV):
        placement.stage1_precision(True)


@pytest.mark.parametrize("native_on", [True, False], ids=["kernel", "xla"])
def test_stage_1_on_packed_centroids(native_on, monkeypatch):
    """S and maxima through `centroid_scores_and_maxima` on arrays carrying the packed centroids: the kernel's
    bits where it runs, else XLA's product of the bf16-rounded operands (the same numbers up to float32 sums);
    `row_scores` of gathered rows (stage 6's q . c) are float32's product, not S's rows."""
    if not native_on:
        monkeypatch.setenv(native.ENV, "0")
    p, lq = 300, 32
    C, Q = _problem(p, lq + 4, 128)
    arrays = stage1_arrays(C, centroids_bf16=jnp.asarray(native.block_centroids_bf16(C)))
    S, maxima = (np.asarray(a) for a in jax.jit(lambda Q: candidates.centroid_scores_and_maxima(Q, arrays, lq))(Q))
    ref = _reference(C, Q[:lq])
    if native_on and native.avx512_bf16_available():
        np.testing.assert_array_equal(S, ref)
    else:
        np.testing.assert_allclose(S, ref, rtol=0, atol=1e-6)
    padded = np.full((384, lq), -np.inf, np.float32)
    padded[:p] = S
    np.testing.assert_array_equal(maxima, padded.reshape(3, 128, lq).max(axis=1))
    rows = np.array([5, 299, 5, 130, 0])
    got = np.asarray(jax.jit(lambda c, Q: candidates.row_scores(c, Q, arrays))(jnp.asarray(C[rows]), Q[:lq]))
    exact = C[rows].astype(np.float64) @ np.asarray(Q[:lq], np.float64).T
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5)
    assert np.abs(S[rows] - exact).max() > 1e-4  # bfloat16's S is further off


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_searcher_with_approximate_stage_1(precision, real_index, minilm_model, monkeypatch):
    """A searcher places the packed centroids where `stage1_precision` says. Forced on (bfloat16 or int8
    operands), against the float32 stage 1, one query at a time and batched (`search_fused`): the candidates move
    only by the operands' perturbation of near ties, and stage 6 recomputes q . c in float32, so a passage both
    return has the same score (float noise) and no score exceeds exact MaxSim's over the same embeddings."""
    searcher = colbert_jax.Searcher(real_index, checkpoint=minilm_model, truncate=True)
    chosen = placement.stage1_precision(True)
    assert (searcher.arrays.centroids_bf16 is not None) == (chosen == "bf16")
    assert (searcher.arrays.centroids_int8 is not None) == (chosen == "int8")
    assert (searcher.arrays.centroids_int8_terms is not None) == (chosen == "int8")
    engine = searcher._plaid_engine()
    centroids = np.asarray(searcher.index.codec.centroids)
    f32 = dataclasses.replace(
        engine.arrays,
        centroids_split=None,
        centroids_blocked=None,
        centroids_bf16=None,
        centroids_int8=None,
        centroids_int8_terms=None,
    )
    if precision == "bf16":
        approximate = dataclasses.replace(f32, centroids_bf16=jnp.asarray(native.block_centroids_bf16(centroids)))
    else:
        packed, terms = (jnp.asarray(x) for x in native.block_centroids_int8(centroids))
        approximate = dataclasses.replace(f32, centroids_int8=packed, centroids_int8_terms=terms)
    assert approximate.approximate_scores and not f32.approximate_scores
    queries = [
        "how do I read a file line by line",
        "sort a list of dictionaries by a key",
        "parse a URL",
        "format a date as a string",
        "compress a directory into a zip archive",
        "wait for a subprocess to finish",
    ]
    exact = searcher.search_all(queries, k=10, exact=True)
    results = {}
    for name, a in (("approximate", approximate), ("f32", f32)):
        monkeypatch.setattr(engine, "arrays", a)
        single = [searcher.search(q, k=10) for q in queries]
        batched = [searcher.search_all(queries, k=10)[i] for i in range(len(queries))]
        results[name] = single + batched
    for i, (got, want) in enumerate(zip(results["approximate"], results["f32"])):
        assert got[0][0] == want[0][0]
        assert len({pid for pid, _, _ in got} & {pid for pid, _, _ in want}) >= 8
        scores = {pid: s for pid, _, s in want}
        common = [(s, scores[pid]) for pid, _, s in got if pid in scores]
        np.testing.assert_allclose(*zip(*common), rtol=0, atol=1e-5)
        assert all(s <= exact[i % len(queries)][0][2] + 1e-4 for _, _, s in got)
