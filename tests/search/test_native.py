"""The native CPU kernels (`colbert_jax.native`) of the streamed PLAID path: the centroid interaction (stages
4-5) and exact MaxSim (stage 6, on the vector unit and on AMX-BF16 tiles), each equal to a brute-force
computation (the interaction also to itself one query at a time when vmapped, and to the jnp streaming it
replaces), and the search they serve equal to the jnp path's (uint16 codes, in memory and memory-mapped, on
the CPU with fewer than 65,536 partitions). Programs lowered for accelerators do not call them; without a
compiler the search warns and runs jnp."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import colbert_jax
from colbert_jax import native
from colbert_jax.scoring import MASKED_SCORE
from colbert_jax.search import exact_scoring, pruning
from colbert_jax.search.arrays import IndexArrays
from pallas_kernels.decompress import byte_table
from tests.helpers import assert_same_ranking_up_to_ties
from tests.kernels.lowering import lower

QUERIES_TSV = Path(__file__).parents[1] / "fixtures" / "collections" / "queries_2k.tsv"
QUERY_TEXTS = [line.split("\t")[1] for line in QUERIES_TSV.read_text().splitlines()[:64]]


def brute_force(S, codes, threshold, starts, lens) -> np.ndarray:
    """Each document's centroid-interaction score, one row at a time."""
    keep = S.max(axis=1) >= threshold
    out = np.empty(len(starts), np.float32)
    for d, (start, n) in enumerate(zip(starts, lens)):
        if n == 0:
            out[d] = -np.inf
            continue
        acc = np.full(S.shape[1], MASKED_SCORE, np.float32)
        for code in codes[start : start + n]:
            if keep[code]:
                acc = np.maximum(acc, S[code])
        out[d] = acc.sum()
    return out


def random_problem(seed: int, num_docs: int = 3000, num_rows: int = 120_000):
    rng = np.random.default_rng(seed)
    S = (0.35 * rng.standard_normal((4096, 32))).astype(np.float32)
    codes = rng.integers(0, S.shape[0], num_rows).astype(np.int32)
    lens = rng.integers(1, 90, num_docs).astype(np.int32)
    lens[rng.choice(num_docs, 50, replace=False)] = 0  # empty slots (a shard's sentinel candidate)
    starts = rng.integers(0, num_rows - 90, num_docs).astype(np.int32)
    return S, codes, starts, lens


@pytest.mark.parametrize("code_dtype", [np.int32, np.uint16])
@pytest.mark.parametrize("threshold", [0.5, 0.9, -np.inf])
def test_kernel_equals_brute_force(code_dtype, threshold):
    # 120,000 rows: enough that the kernel splits the documents over XLA's thread pool.
    S, codes, starts, lens = random_problem(0)
    want = brute_force(S, codes, threshold, starts, lens)
    got = np.asarray(jax.jit(native.centroid_interaction)(S, codes.astype(code_dtype), threshold, starts, lens))
    empty = lens == 0
    assert np.isneginf(got[empty]).all()
    np.testing.assert_allclose(got[~empty], want[~empty], rtol=0, atol=2e-5)  # only the sum's order differs
    if threshold > 0.5:  # some documents keep no code: MASKED_SCORE for every token
        masked = np.isclose(want, 32 * MASKED_SCORE)
        assert masked.any() and np.array_equal(got[masked], want[masked])


@pytest.mark.parametrize("code_dtype", [np.int32, np.uint16])
def test_float16_scores_are_read_as_their_float32_values(code_dtype):
    """S held as float16 (stage 1 on int8 operands): the kernel reads each score as its float32 value, so the
    scores are float32's of the same values, bit for bit, pruned or not, one query or vmapped; subnormal, zero
    and infinite halves included. The jnp path (float32 sums of the same values) agrees."""
    S, codes, starts, lens = random_problem(3, num_docs=800, num_rows=40_000)
    S16 = S.astype(np.float16)
    S16[:4, :3] = [np.float16(3e-7), np.float16(-0.0), np.float16(np.inf)]  # a subnormal, -0, +inf
    S16[4:8, 5] = np.float16(6.1e-5)  # the smallest normal
    codes = codes.astype(code_dtype)
    run = jax.jit(native.centroid_interaction)
    for threshold in (0.5, 0.9, -np.inf):
        got = np.asarray(run(jnp.asarray(S16), codes, threshold, starts, lens))
        want = np.asarray(run(jnp.asarray(S16.astype(np.float32)), codes, threshold, starts, lens))
        np.testing.assert_array_equal(got, want)
        brute = brute_force(S16.astype(np.float32), codes.astype(np.int64), threshold, starts, lens)
        finite = np.isfinite(brute)
        np.testing.assert_allclose(got[finite], brute[finite], rtol=0, atol=2e-5)
    Sb = np.stack([S16, S16[::-1]])
    thresholds = np.array([0.5, -np.inf], np.float32)
    batched = jax.vmap(native.centroid_interaction, in_axes=(0, None, 0, None, None))(
        Sb, codes, thresholds, starts, lens
    )
    for i in range(2):
        one = native.centroid_interaction(jnp.asarray(Sb[i]), codes, thresholds[i], starts, lens)
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(one))


def test_vmapped_queries_equal_one_at_a_time():
    S, codes, starts, lens = random_problem(1, num_docs=500)
    Sb = np.stack([S, 0.5 * S, S[::-1]])
    thresholds = np.array([0.5, 0.2, -np.inf], np.float32)
    startsb = np.stack([starts, starts[::-1], starts])
    batched = jax.vmap(native.centroid_interaction, in_axes=(0, None, 0, 0, None))(Sb, codes, thresholds, startsb, lens)
    for i in range(3):
        one = native.centroid_interaction(Sb[i], codes, thresholds[i], startsb[i], lens)
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(one))


def test_equals_the_jnp_path():
    """The kernel and the jnp streaming it replaces, over the same IndexArrays (the sums' order may differ)."""
    S, codes, starts, lens = random_problem(2, num_docs=400, num_rows=30_000)
    n = len(lens)
    # One passage per document slot, laid out as an index's arrays with a sentinel (doclen 0) at the end.
    arrays = IndexArrays(
        centroids=jnp.zeros((S.shape[0], 8)),
        bucket_weights=jnp.zeros(4),
        codes=jnp.asarray(np.append(codes, S.shape[0]).astype(np.int32)),
        doclens=jnp.asarray(np.append(lens, 0)),
        offsets=jnp.asarray(np.append(starts, len(codes))),
        first=jnp.zeros((), jnp.int32),
        count=jnp.asarray(n, jnp.int32),
    )
    cand = jnp.asarray(np.r_[[n, n], np.arange(n)[::-1]].astype(np.int32))  # as stage 4 reads them: sentinels first
    for threshold in (None, jnp.float32(0.5)):
        got = np.asarray(jax.jit(pruning.approx_streamed, static_argnums=4)(cand, S, threshold, arrays, 4096))
        want = np.asarray(jax.jit(pruning._approx_chunks, static_argnums=4)(cand, S, threshold, arrays, 4096))
        assert np.array_equal(np.isneginf(got), np.isneginf(want)) and np.isneginf(got[:2]).all()
        np.testing.assert_allclose(got[2:], want[2:], rtol=0, atol=2e-5)


@pytest.mark.parametrize("implementation", ["vector", "amx", "table"])
@pytest.mark.parametrize("code_dtype", [np.int32, np.uint16])
@pytest.mark.parametrize(
    "nbits, dim, table_kind",
    [(2, 64, "fields"), (4, 64, "fields"), (1, 128, "fields"), (2, 48, "fields"), (2, 64, "any")],
)
def test_exact_maxsim_equals_brute_force(code_dtype, nbits, dim, table_kind, implementation):
    """Stage 6's kernel: each token's best (q . c + q . r) / ||c + r|| over a document's rows, from packed bytes,
    on the vector unit and on AMX-BF16 tiles (three bfloat16 products; dim 48: k padded to the tiles' 64). An
    index's byte table holds bit fields (nbits 2 on the tiles: unpacked by permutes); any other table of 4 values
    per byte takes the table lookups. "table" sums each byte nibble's contributions from a per-query table (other
    sums than the vector unit's, so other bits) where the byte table splits into nibbles, and is the vector path
    where it does not."""
    rng = np.random.default_rng(nbits)
    lq, num_rows, num_docs = 32, 6000, 120
    Q = rng.standard_normal((lq, dim)).astype(np.float32)
    centroids = rng.standard_normal((300, dim)).astype(np.float32)
    S = centroids @ Q.T
    codes = rng.integers(0, len(centroids), num_rows)
    residuals = rng.integers(0, 256, (num_rows, dim * nbits // 8)).astype(np.uint8)
    weights = np.sort(rng.standard_normal(1 << nbits)).astype(np.float32) * 0.1
    table = np.asarray(byte_table(jnp.asarray(weights), nbits))
    if table_kind == "any":
        table = (rng.standard_normal(table.shape) * 0.1).astype(np.float32)
    r = table[residuals].reshape(num_rows, dim)
    inv_norms = (1.0 / np.linalg.norm(centroids[codes] + r, axis=1)).astype(np.float32)
    lens = rng.integers(0, 100, num_docs).astype(np.int32)
    lens[:3] = 0
    starts = rng.integers(0, num_rows - 100, num_docs).astype(np.int32)
    kernel = jax.jit(functools.partial(native.exact_maxsim, implementation=implementation))
    args = (Q, S, codes.astype(code_dtype), residuals, inv_norms, table, starts, lens)
    if implementation == "amx" and not native.amx_bf16_available():
        with pytest.raises(native.NativeBuildError, match="AMX-BF16"):
            kernel(*args)
        return
    got = np.asarray(kernel(*args))
    sims = (S[codes] + r @ Q.T) * inv_norms[:, None]  # [rows, Lq]
    for d, (start, n) in enumerate(zip(starts, lens)):
        if n == 0:
            assert np.isneginf(got[d]).all()
        else:
            np.testing.assert_allclose(got[d], sims[start : start + n].max(axis=0), rtol=0, atol=1e-5)
    if implementation == "table":
        vector = np.asarray(jax.jit(functools.partial(native.exact_maxsim, implementation="vector"))(*args))
        assert np.array_equal(got, vector) == (table_kind == "any")


@pytest.mark.parametrize("lq", [32, 16])
def test_exact_maxsim_recomputes_centroid_scores(lq):
    """With the centroids, stage 6's kernel takes q . c in float32 from them for the documents' rows, not from S
    (stage 1 on bfloat16 operands): the scores equal brute force with the exact q . c, whatever S holds; rows with
    codes out of range are skipped as without them, and a second call (the kernel's slot map reused) agrees."""
    tiles = lq == 32 and native.amx_bf16_available()  # "auto": the tile path there
    rng = np.random.default_rng(lq)
    dim, num_rows, num_docs, nbits = 128, 8000, 150, 2
    Q = rng.standard_normal((lq, dim)).astype(np.float32) / np.sqrt(dim)
    centroids = rng.standard_normal((2000, dim)).astype(np.float32) / np.sqrt(dim)
    S_exact = centroids.astype(np.float64) @ Q.T.astype(np.float64)
    S_rough = (S_exact + rng.standard_normal(S_exact.shape) * 0.05).astype(np.float32)  # far off: must not be read
    codes = rng.integers(0, len(centroids), num_rows)
    codes[::97] = len(centroids) + 3  # out of range: skipped
    residuals = rng.integers(0, 256, (num_rows, dim * nbits // 8)).astype(np.uint8)
    weights = np.sort(rng.standard_normal(1 << nbits)).astype(np.float32) * 0.05
    table = np.asarray(byte_table(jnp.asarray(weights), nbits))
    r = table[residuals].reshape(num_rows, dim).astype(np.float64)
    inv_norms = rng.uniform(0.8, 1.2, num_rows).astype(np.float32)
    lens = rng.integers(0, 120, num_docs).astype(np.int32)
    lens[:2] = 0
    starts = rng.integers(0, num_rows - 120, num_docs).astype(np.int32)
    kernel = jax.jit(native.exact_maxsim)
    args = (Q, S_rough, codes.astype(np.int32), residuals, inv_norms, table, starts, lens)
    valid = codes < len(centroids)
    sims = np.full((num_rows, lq), -np.inf)
    sims[valid] = (S_exact[codes[valid]] + r[valid] @ Q.T) * inv_norms[valid, None]
    want = np.stack([sims[s : s + n].max(axis=0) if n else np.full(lq, -np.inf) for s, n in zip(starts, lens)])
    tol = 1e-4 if tiles else 1e-5  # the tiles' r . q: three bfloat16 products
    for _ in range(2):
        got = np.asarray(kernel(*args, centroids=jnp.asarray(centroids)))
        assert np.array_equal(np.isneginf(got), np.isneginf(want))
        np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], rtol=0, atol=tol)
    # float16 S (stage 1 on int8 operands) with the centroids: only its shape is read, the same scores
    args16 = (Q, S_rough.astype(np.float16), *args[2:])
    np.testing.assert_array_equal(np.asarray(kernel(*args16, centroids=jnp.asarray(centroids))), got)
    rough = np.asarray(kernel(*args))  # without them: S's rows, as before
    assert np.abs(rough[np.isfinite(want)] - want[np.isfinite(want)]).max() > 1e-2
    with pytest.raises(ValueError, match="centroids"):
        kernel(*args, centroids=jnp.asarray(centroids[:10]))


def test_exact_maxsim_refuses_what_it_cannot_run():
    Q, S = jnp.zeros((16, 64)), jnp.zeros((10, 16))
    rows = (jnp.zeros(4, jnp.int32), jnp.zeros((4, 16), jnp.uint8), jnp.ones(4), jnp.zeros((256, 4)))
    docs = (jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32))
    with pytest.raises(ValueError, match="implementation"):
        native.exact_maxsim(Q, S, *rows, *docs, implementation="tiles")
    if native.amx_bf16_available():  # the tile path is written for 32 query tokens
        with pytest.raises(ValueError, match="32 query tokens"):
            native.exact_maxsim(Q, S, *rows, *docs, implementation="amx")
    else:
        with pytest.raises(native.NativeBuildError, match="AMX-BF16"):
            native.exact_maxsim(Q, S, *rows, *docs, implementation="amx")
    with pytest.raises(ValueError, match="32 query tokens"):
        native.exact_maxsim(Q, S, *rows, *docs, implementation="table")
    # "auto" runs where the tiles and the table cannot: 16 tokens on the vector unit
    assert native.exact_maxsim(Q, S, *rows, *docs).shape == (1, 16)


@pytest.mark.parametrize("n, k", [(1000, 1), (1000, 10), (1000, 256), (1000, 1000), (64, 10), (3, 2)])
def test_top_k_equals_lax_top_k(n, k):
    """`native.top_k` (stages 3-5's rankings on the CPU) gives `jax.lax.top_k`'s values and indices bit for bit:
    ties to the lower index, -0 below +0, -NaN < -inf < ... < +inf < +NaN, under jit and vmap; other dtypes
    go to lax.top_k."""
    assert native.enabled()
    rng = np.random.default_rng(n + k)
    x = rng.normal(size=(5, n)).astype(np.float32)
    x[:, ::3] = np.round(x[:, ::3])  # ties
    x[0, : n // 2] = -0.0
    x[0, n // 2 :: 2] = 0.0
    x[1, ::2] = -np.inf
    x[2, -1] = np.inf
    x[3, 1] = np.nan
    x[3, 2] = -np.nan
    x[4] = 0.0
    want_v, want_i = jax.lax.top_k(x, k)
    got_v, got_i = jax.jit(lambda v: native.top_k(v, k))(x)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_v).view(np.uint32), np.asarray(want_v).view(np.uint32))
    mapped_v, mapped_i = jax.jit(jax.vmap(lambda v: native.top_k(v, k)))(x[:, None, :])
    np.testing.assert_array_equal(np.asarray(mapped_i)[:, 0], np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(mapped_v)[:, 0].view(np.uint32), np.asarray(want_v).view(np.uint32))
    ints = jnp.asarray(rng.integers(0, 5, size=(2, n)), jnp.int32)
    np.testing.assert_array_equal(native.top_k(ints, k)[1], jax.lax.top_k(ints, k)[1])


def test_stage6_kernel_follows_the_fma_width(monkeypatch):
    """Stage 6's "auto": the tiles where there is AMX-BF16; the nibble table at nbits 1-2 on AVX-512 cores whose
    512-bit FMAs issue no more multiply-adds than 256-bit ones (Zen 4: halves; one FMA unit); the products on the
    vector unit where they issue twice as many (Zen 5; Xeons with two units), at nbits 4, and without AVX-512. The
    width probe reads 1 or 0.5 after rounding (0 without AVX-512), once per process, and readings up to 25% off
    choose alike."""
    full = native.full_width_fma()
    reading = native._measured_rate("f32_256", lambda: native.vector_bits() >= 512)
    if native.vector_bits() >= 512:
        assert reading in (0.5, 1.0), native.measured_rates()
        assert full == (reading == 0.5)
    else:
        assert reading == 0.0 and not full
    assert native.full_width_fma() == full  # measured once per process
    monkeypatch.setattr(native, "amx_bf16_available", lambda: False)
    monkeypatch.setattr(native, "vector_bits", lambda: 512)
    for raw, per_byte, chosen in [(1.0, 4, "table"), (1.0, 8, "table"), (1.0, 2, "vector"), (0.5, 4, "vector")]:
        for noise in (0.75, 1.0, 1.25):
            monkeypatch.setattr(native, "_rates", {"f32_256": raw * noise})
            assert native._maxsim_auto(32, per_byte) == chosen, (raw, noise, per_byte)
            assert native._maxsim_auto(16, per_byte) == "vector"
    monkeypatch.setattr(native, "vector_bits", lambda: 256)
    monkeypatch.setattr(native, "_rates", {})
    assert native._maxsim_auto(32, 4) == "vector"
    monkeypatch.setattr(native, "amx_bf16_available", lambda: True)
    assert native._maxsim_auto(32, 4) == "amx"


def _rankings(searcher, Q, k):
    ranking = searcher.search_all(list(Q), k=k).todict()
    return [ranking[i] for i in range(len(Q))]


@pytest.mark.parametrize("mmap", [False, True], ids=["in_memory", "mmap"])
def test_search_equals_the_jnp_path(real_index, minilm_model, monkeypatch, mmap):
    """Rankings with the kernel equal those of the jnp path (COLBERT_JAX_NATIVE=0), at k=10 and 100."""
    searcher = colbert_jax.Searcher(real_index, minilm_model, truncate=True, load_index_with_mmap=mmap)
    Q = searcher.encode(QUERY_TEXTS)
    assert native.enabled()
    jax.clear_caches()
    with_kernel = {k: _rankings(searcher, Q, k) for k in (10, 100)} | {1: [searcher.search(q, k=10) for q in Q[:5]]}
    monkeypatch.setenv(native.ENV, "0")
    assert not native.enabled()
    jax.clear_caches()  # the programs above called the kernel: trace again without it
    without = {k: _rankings(searcher, Q, k) for k in (10, 100)} | {1: [searcher.search(q, k=10) for q in Q[:5]]}
    jax.clear_caches()
    for k in with_kernel:
        for a, b in zip(with_kernel[k], without[k]):
            assert_same_ranking_up_to_ties(a, b, atol=1e-5)


def _programs():
    """Jitted stage 4 (centroid interaction) and stage 6 (exact MaxSim) over a small IndexArrays, with inputs."""
    arrays = IndexArrays(
        centroids=jnp.zeros((64, 8)),
        bucket_weights=jnp.zeros(4),
        codes=jnp.zeros(101, jnp.int32),
        doclens=jnp.full(11, 10, jnp.int32),
        offsets=jnp.arange(0, 110, 10, dtype=jnp.int32),
        first=jnp.zeros((), jnp.int32),
        count=jnp.asarray(10, jnp.int32),
        residuals=jnp.zeros((101, 2), jnp.uint8),
        inv_norms=jnp.ones(101),
    )
    cand, S = jnp.arange(10, dtype=jnp.int32), jnp.zeros((64, 32))
    approx = jax.jit(lambda cand, S, t: pruning.approx_streamed(cand, S, t, arrays, 4096))
    exact = jax.jit(lambda Q, S, cand: exact_scoring.exact_streamed(Q, S, cand, arrays, 512, 2))
    return [
        (approx, (cand, S, jnp.float32(0.5)), "colbert_jax_centroid_interaction"),
        (exact, (jnp.zeros((32, 8)), S, cand), "colbert_jax_exact_maxsim"),
    ]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_accelerator_programs_do_not_call_the_kernels(platform):
    for fn, args, target in _programs():
        assert target in fn.lower(*args).as_text()  # the CPU program calls it
        assert target not in lower(fn, *args, platform=platform, name=target)


def test_the_build_key_covers_every_source_and_header():
    """The cached library's name hashes SOURCES and HEADERS: a file left out of them would leave a stale build in
    the cache after it changes (and a source left out would not be compiled at all)."""
    folder = Path(native.__file__).parent
    assert set(native.SOURCES) == set(folder.glob("*.cc"))
    assert set(native.HEADERS) == set(folder.glob("*.h"))


def test_without_a_compiler_the_search_warns_and_runs_jnp(real_index, minilm_model, monkeypatch, tmp_path):
    searcher = colbert_jax.Searcher(real_index, minilm_model, truncate=True)
    Q = searcher.encode(QUERY_TEXTS[:4])
    want = _rankings(searcher, Q, 10)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("COLBERT_JAX_CACHE", str(tmp_path))  # no kernel built here yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(native.ENV, "1")
    with pytest.raises(native.NativeBuildError, match="no-such-compiler"):
        native.library()
    monkeypatch.delenv(native.ENV)
    monkeypatch.setattr(native, "_state", {})  # the default ("auto") warns at the first failure
    jax.clear_caches()
    with pytest.warns(native.NativeKernelWarning, match="no C\\+\\+ compiler"):
        got = _rankings(searcher, Q, 10)
    assert not native.enabled()
    jax.clear_caches()
    for a, b in zip(got, want):
        assert_same_ranking_up_to_ties(a, b, atol=1e-5)
    assert not (tmp_path / "native").exists()


@pytest.mark.parametrize("arch, bits, native_encoder", [("x86-64-v3", 256, True), ("x86-64-v2", 0, False)])
def test_kernels_built_for_older_cpu_types_equal_brute_force(arch, bits, native_encoder):
    """`COLBERT_JAX_NATIVE_ARCH` builds the kernels for an older x86-64 type than this CPU: AVX2 (AMD Zen 2 and 3,
    where a register-spilling stage 6 once ran at a few GFLOP/s) or SSE4.2's plain loops. Each build's stage 4-5
    and stage 6 kernels, float32 dense product, stage 1's float32 product and attention still equal brute force
    (GELU XLA's bits), whatever this CPU has; the AVX2 build runs the float32 encoder's products natively (its
    GELU is XLA's), and its encoder equals the module's to float32 tolerance."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "COLBERT_JAX_NATIVE_ARCH": arch, "COLBERT_JAX_NATIVE": "1", "JAX_PLATFORMS": "cpu"}
    probe = (
        "from colbert_jax import native; "
        "print(native.vector_bits(), native.dense_f32_vectorized(), native.gelu_faster_than_xla())"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(bits), str(native_encoder), "False"]
    tests = [
        "tests/search/test_native.py::test_kernel_equals_brute_force",
        "tests/search/test_native.py::test_float16_scores_are_read_as_their_float32_values",
        "tests/search/test_native.py::test_exact_maxsim_equals_brute_force",
        "tests/models/test_native_dense.py::test_float32_dense_kernel_is_the_product_to_float32_rounding",
        "tests/models/test_native_dense.py::test_float32_encoder_runs_attention_and_gelu_natively_to_float32_tolerance"
        "[tiny_model-True]",
        "tests/models/test_native_attention.py::test_attention_is_berts",
        "tests/models/test_native_gelu.py::test_gelu_has_xlas_bits",
        "tests/search/test_centroid_scores_f32.py::test_kernel_is_the_float32_product",
    ]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    run = subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout and "deselected" not in run.stdout
