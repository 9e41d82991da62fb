"""The native int8 dense layer (`colbert_jax.native.int8_dense`, `dense_int8.cc`): the same float32 numbers as
the XLA product it replaces (`quantize._int8_matmul`), bit for bit, on both of its paths (the AMX tiles where
the CPU has them, the portable loops everywhere); the packed weight layout round-trips; the int8 query encoder
on packed params (its products by the kernel, attention by `native.attention`) gives the XLA encoder's
embeddings to float32 accuracy and still lowers for accelerators; bad shapes are errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from colbert_jax import native
from colbert_jax.modeling import quantize
from colbert_jax.modeling.backbones import unstacked_params
from colbert_jax.modeling.colbert import embed_queries
from colbert_jax.modeling.quantize import (
    _int8_matmul,
    _quantize_kernel,
    _unpack,
    fuse_float_params,
    quantize_params,
    quantized_apply,
)
from tests.kernels.lowering import lower

SHAPES = [(1, 32, 37), (5, 64, 16), (17, 100, 64), (33, 384, 1152), (70, 1536, 384), (0, 64, 32)]


def _problem(m: int, k: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if m > 2:
        x[0, k // 2] = 40.0  # an outlier feature: its row's other steps are coarse, the low term matters
        x[1] = 0.0  # a zero row: scale 1, all terms 0
    w = (0.05 * rng.standard_normal((k, n))).astype(np.float32)
    high, cross, scale = _quantize_kernel(w)
    return x, high, cross, scale


def _native(implementation: str):
    return jax.jit(functools.partial(native.int8_dense, implementation=implementation))


def _unavailable(implementation: str) -> str | None:
    """What the error names when this CPU or build lacks the implementation (None: it runs here)."""
    if implementation == "amx" and not native.amx_available():
        return "AMX"
    if implementation == "vnni" and not native.int8_vnni_available():
        return "VNNI"
    return None


@pytest.mark.parametrize("implementation", native.DENSE_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_equals_the_xla_product_bit_for_bit(implementation, shape):
    x, high, cross, scale = _problem(*shape)
    packed = native.pack_dense(high, cross[: shape[1]])
    if missing := _unavailable(implementation):
        with pytest.raises(native.NativeBuildError, match=missing):
            _native(implementation)(x, *packed, scale)
        return
    got = np.asarray(_native(implementation)(x, *packed, scale))
    want = np.asarray(jax.jit(_int8_matmul)(x, high, cross, scale))
    assert got.shape == want.shape == (shape[0], shape[2])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("implementation", native.DENSE_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(33, 384, 1536), (300, 384, 1536), (17, 100, 64), (5, 64, 20)])
def test_kernel_with_gelu_is_the_gelu_kernel_on_its_product(implementation, shape):
    """`gelu_bias`: the exact GELU of product + bias in the kernel's epilogue (each task's rows and column
    blocks), bit for bit the separate GELU kernel on the product (XLA's bits): partial blocks, several row
    groups, all three erfc branches."""
    x, high, cross, scale = _problem(*shape)
    packed = native.pack_dense(high, cross[: shape[1]])
    bias = jnp.asarray(np.random.default_rng(1).uniform(-4, 4, shape[2]).astype(np.float32))
    fused = jax.jit(functools.partial(native.int8_dense, gelu_bias=bias, implementation=implementation))
    if missing := _unavailable(implementation):
        with pytest.raises(native.NativeBuildError, match=missing):
            fused(x, *packed, scale)
        return
    product = _native(implementation)(x, *packed, scale)
    want = np.asarray(jax.jit(lambda y, b: jax.nn.gelu(y + b, approximate=False))(product, bias))
    got = np.asarray(fused(x, *packed, scale))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.asarray(native.gelu(product, bias)))
    assert (np.abs(np.asarray(product) + np.asarray(bias)) >= 2 * np.sqrt(2)).any()
    with pytest.raises(ValueError, match="gelu_bias"):
        native.int8_dense(x, *packed, scale, gelu_bias=bias[:-1], implementation=implementation)


def test_threaded_sizes_and_leading_axes():
    # 600 rows x 1536 columns: split over XLA's thread pool; a [B, L, K] input keeps its leading axes
    x, high, cross, scale = _problem(600, 384, 1536, seed=1)
    packed = native.pack_dense(high, cross[:384])
    want = np.asarray(jax.jit(_int8_matmul)(x, high, cross, scale))
    for implementation in native.DENSE_IMPLEMENTATIONS:
        if _unavailable(implementation):
            continue
        got = np.asarray(_native(implementation)(x.reshape(20, 30, 384), *packed, scale))
        np.testing.assert_array_equal(got.reshape(600, 1536), want)


def test_packed_layout_round_trips():
    rng = np.random.default_rng(2)
    for k, n in [(32, 37), (64, 32), (100, 200), (384, 1152)]:
        high = rng.integers(-127, 128, (3, k, n)).astype(np.int8)  # stacked layers keep their leading axis
        low = rng.integers(-127, 128, (3, k, n)).astype(np.int8)
        packed_hi, packed_lo = native.pack_dense(high, low)
        assert packed_hi.shape == (3, -(-n // 32) * 2, -(-k // 64) * 16, 64)
        for i in range(3):
            np.testing.assert_array_equal(np.asarray(_unpack(jnp.asarray(packed_hi[i]), k, n)), high[i])
            np.testing.assert_array_equal(np.asarray(_unpack(jnp.asarray(packed_lo[i]), k, n)), low[i])


def test_bad_shapes_are_errors():
    x, high, cross, scale = _problem(4, 64, 32)
    packed = native.pack_dense(high, cross[:64])
    with pytest.raises(ValueError, match="implementation"):
        native.int8_dense(x, *packed, scale, implementation="avx2")
    with pytest.raises(ValueError, match="do not fit"):
        native.int8_dense(np.concatenate([x, x], 1), *packed, scale, implementation="portable")
    with pytest.raises(ValueError, match="do not fit"):
        native.int8_dense(x, *packed, jnp.ones(100), implementation="portable")
    with pytest.raises(ValueError, match="int8"):
        native.pack_dense(high.astype(np.int16), high.astype(np.int16))
    with pytest.raises(ValueError, match="differ"):
        native.pack_dense(high, high[:32])


@pytest.mark.parametrize("implementation", native.DENSE_IMPLEMENTATIONS)
def test_packed_encoder_equals_the_xla_encoder(implementation, tiny_model):
    model = tiny_model
    ids, mask = model.query_tokenizer.tensorize(["what is a tiny model", "queries, in a batch of two"])
    fn = functools.partial(embed_queries, model.module, pad_id=model.query_pad_id)
    plain = quantize_params(jax.device_get(model.params))
    packed = quantize_params(jax.device_get(model.params), packed=True)
    assert "packed_hi" in str(jax.tree_util.tree_structure(packed)) and "kernel_cross" not in str(
        jax.tree_util.tree_structure(packed)
    )
    want = np.asarray(jax.jit(quantized_apply(fn))(plain, ids, mask))
    if missing := _unavailable(implementation):
        with pytest.raises(native.NativeBuildError, match=missing):
            jax.jit(quantized_apply(fn, implementation))(packed, ids, mask)
        return
    got = np.asarray(jax.jit(quantized_apply(fn, implementation))(packed, ids, mask))
    # the products are the XLA path's bits; attention is the native kernel's float32 (`native.attention`), whose
    # last-bit differences can move an int8 step of the next layer's input
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    cosine = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cosine.min() > 1 - 1e-5
    # and on the CPU, packed params do call the kernels
    text = jax.jit(quantized_apply(fn, implementation)).lower(packed, ids, mask).as_text()
    assert all(f"colbert_jax_{kernel}" in text for kernel in ("int8_dense", "attention"))
    assert ("colbert_jax_gelu" in text) == native.gelu_faster_than_xla()  # else XLA's GELU: the same bits
    assert "colbert_jax_int8_dense_gelu" not in text  # measured slower for one query on VNNI


def _expected_products() -> str:
    return "amx" if native.amx_available() else "vnni" if native.int8_vnni_available() else "xla"


def test_model_runs_packed_products_where_the_cpu_has_amx_or_vnni(minilm_model):
    model = minilm_model.replace_config(query_quantization="int8")
    assert model.query_quantization == "int8"
    assert model.int8_products == _expected_products()
    leaves = jax.tree_util.tree_leaves_with_path(model._query_params)
    names = {str(path[-1]) for path, _ in leaves}
    assert ("['packed_hi']" in names) == (model.int8_products != "xla")
    if model.int8_products != "xla":  # and its program calls the kernel
        text = model._query_fn.lower(model._query_params, *model.query_tokenizer.tensorize(["a query"])).as_text()
        assert "colbert_jax_int8_dense" in text


def test_amx_turned_off_runs_the_paths_of_cpus_without_it(monkeypatch, minilm_checkpoint):
    """COLBERT_JAX_AMX=0: no tile-unit kernel is chosen or accepted, as on a CPU without AMX (how the other
    paths are measured on a CPU that has it)."""
    import colbert_jax

    monkeypatch.setenv(native.AMX_ENV, "0")
    assert not native.amx_available() and not native.amx_bf16_available()
    x, high, cross, scale = _problem(4, 64, 32)
    with pytest.raises(native.NativeBuildError, match="no AMX"):
        packed = native.pack_dense(high, cross[:64])
        native.int8_dense(jnp.asarray(x), *packed, jnp.asarray(scale), implementation="amx")
    assert not native.int8_tiles()
    # "auto": by the measured rates alone, never int8 for the tiles' sake
    vnni = native.int8_vnni_available()
    assert "int8" not in native.query_products_by_speed() or native.int8_over_f32_rate() > native.INT8_OVER_F32_NEEDED
    float_native = native.dense_f32_vectorized()
    want = next(q for q in native.query_products_by_speed() if q != "int16" or float_native)
    assert colbert_jax.load_checkpoint(minilm_checkpoint).query_quantization == want
    model = colbert_jax.load_checkpoint(minilm_checkpoint, query_quantization="int8")
    assert model.query_quantization == "int8" and model.int8_products == ("vnni" if vnni else "xla")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_packed_encoder_lowers_for_accelerators_without_the_kernel(platform, tiny_model):
    # the same packed params on another platform: the XLA product on unpacked weights, no native call
    model = tiny_model
    ids, mask = model.query_tokenizer.tensorize(["a query"])
    fn = functools.partial(embed_queries, model.module, pad_id=model.query_pad_id)
    packed = quantize_params(jax.device_get(model.params), packed=True)
    # (the CPU branch is traced too: on a CPU without AMX, with the kernel's portable path)
    implementation = "amx" if native.amx_available() else "portable"
    apply = quantized_apply(fn, implementation)
    text = lower(jax.jit(apply), packed, ids, mask, platform=platform, name="packed int8 encoder")
    assert all(f"colbert_jax_{kernel}" not in text for kernel in ("int8_dense", "attention", "gelu"))


def test_without_amx_script_refuses_every_library_the_tile_state():
    """`scripts/without_amx.py` (how a CPU without AMX is measured on one with it): its command is refused Linux's
    tile-state permission by the filter (EPERM, where a kernel or CPU without AMX answers EINVAL or grants it), so
    XLA's, oneDNN's and our kernels' checks all see no AMX."""
    import subprocess
    import sys
    from pathlib import Path

    probe = (
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True); r = libc.syscall(158, 0x1023, 18); "
        "print(r, ctypes.get_errno()); from colbert_jax import native; print(native.int8_tiles())"
    )
    script = Path(__file__).resolve().parents[2] / "scripts" / "without_amx.py"
    out = subprocess.run([sys.executable, str(script), sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["-1", "1", "False"]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fixture", ["tiny_model", "minilm_model"])
def test_float32_encoder_runs_attention_and_gelu_natively_to_float32_tolerance(request, fixture, packed):
    """float32 on the CPU: attention on the fused projections and the intermediate GELU as native kernels
    (`fuse_float_params`), the products XLA's or (packed) `native.dense_f32`'s, equal to the module as written
    to float32 tolerance."""
    from colbert_jax.modeling.quantize import FLOAT_NATIVE_ROWS, fuse_float_params

    model = request.getfixturevalue(fixture)
    texts = ["what is a tiny model", "queries, in a batch of two, the second one a little longer than the first"]
    ids, mask = model.query_tokenizer.tensorize(texts)
    fn = functools.partial(embed_queries, model.module, pad_id=model.query_pad_id)
    params = jax.device_get(model.params)
    fused = fuse_float_params(params, packed=packed)
    structure = str(jax.tree_util.tree_structure(fused))
    assert "qkv" in structure and "kernel_scale" not in structure and ("packed_f32" in structure) == packed
    want = np.asarray(jax.jit(fn)(params, ids, mask))
    got = np.asarray(jax.jit(quantized_apply(fn))(fused, ids, mask))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    text = jax.jit(quantized_apply(fn)).lower(fused, ids, mask).as_text()
    assert "colbert_jax_attention" in text
    assert ("colbert_jax_gelu" in text) == native.gelu_faster_than_xla()  # else XLA's GELU: the same bits
    assert ("colbert_jax_dense_f32" in text) == packed
    # batches of more rows take XLA's products, but for the fused qkv's (the kernel skips [MASK] keys and values)
    copies = FLOAT_NATIVE_ROWS // ids.shape[1] + 1
    many = np.repeat(ids, copies, axis=0), np.repeat(mask, copies, axis=0)
    text = jax.jit(quantized_apply(fn)).lower(fused, *many).as_text()
    assert "@colbert_jax_dense_f32(" not in text
    assert ("@colbert_jax_dense_f32_rows(" in text) == packed  # (one call site: the module scans its layers)
    # the model takes that path for float32 queries on the CPU, and its embeddings are the module's
    f32 = model.replace_config(query_quantization="none")
    assert f32.native_float_encoder == (native.enabled() and native.dense_f32_vectorized())
    np.testing.assert_allclose(f32.encode_queries(texts), want, rtol=0, atol=2e-5)
    assert not model.replace_config(query_quantization="none", compute_dtype="bfloat16").native_float_encoder


@pytest.mark.parametrize("panel", native.F32_PANELS)
@pytest.mark.parametrize("implementation", native.DENSE_F32_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "m, k, n",
    [
        *[(32, 384, 1152), (5, 384, 100), (33, 1536, 384), (1, 64, 48), (70, 200, 97), (300, 128, 32), (9, 16, 80)],
        (20, 800, 45),  # k over three passes of AVX2's depth, a partial vector's sums reloaded between them
    ],
)
def test_float32_dense_kernel_is_the_product_to_float32_rounding(implementation, m, k, n, panel):
    """Either panel width (48: AVX-512's block; 16: AVX2's) in any build, and the same bits from both."""
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    packed = jnp.asarray(native.pack_dense_f32(w, panel))
    assert packed.shape == (-(-n // panel), k, panel)
    got = np.asarray(jax.jit(lambda x, p: native.dense_f32(x, p, n, implementation=implementation))(x, packed))
    want = x.astype(np.float64) @ w.astype(np.float64)
    bound = 4 * k * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))
    assert np.all(np.abs(got - want) <= bound)
    # leading axes are kept, and the packed layout unpacks to the weights
    got3 = np.asarray(native.dense_f32(jnp.asarray(x.reshape(1, m, k)), packed, n, implementation=implementation))
    np.testing.assert_array_equal(got3.reshape(m, n), got)
    np.testing.assert_array_equal(np.swapaxes(np.asarray(packed), 0, 1).reshape(k, -1)[:, :n], w)
    other = jnp.asarray(native.pack_dense_f32(w, 16 if panel == 48 else 48))
    np.testing.assert_array_equal(np.asarray(native.dense_f32(x, other, n, implementation=implementation)), got)


def test_float32_dense_kernel_names_bad_shapes():
    w = native.pack_dense_f32(np.ones((64, 100), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        native.dense_f32(jnp.ones((3, 65)), jnp.asarray(w), 100)
    with pytest.raises(ValueError, match="do not fit"):
        native.dense_f32(jnp.ones((3, 64)), jnp.asarray(w), 200)
    with pytest.raises(ValueError, match="implementation"):
        native.dense_f32(jnp.ones((3, 64)), jnp.asarray(w), 100, implementation="amx")
    with pytest.raises(ValueError, match="K, N"):
        native.pack_dense_f32(np.ones(5, np.float32))
    with pytest.raises(ValueError, match="columns wide"):
        native.pack_dense_f32(np.ones((64, 100), np.float32), 32)


def _bf16(a: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("implementation", native.DENSE_F32_IMPLEMENTATIONS)
@pytest.mark.parametrize("m, k, n", [(32, 384, 1536), (33, 1536, 384), (5, 7, 50), (300, 384, 100), (9, 130, 48)])
def test_bfloat16_dense_kernel_is_the_product_of_rounded_operands(implementation, m, k, n):
    """bf16(x) . bf16(w) with float32 sums, x rounded by the kernel (to nearest even, as ml_dtypes rounds): odd K
    (a zero-padded pair), partial panels, several row tasks; the vector and scalar paths give the same bits."""
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (0.05 * rng.standard_normal((k, n))).astype(np.float32)
    packed = jnp.asarray(native.pack_dense_bf16(w))
    assert packed.shape == (-(-n // 48), -(-k // 2), 48, 2) and packed.dtype == jnp.bfloat16
    unpacked = np.asarray(packed.astype(jnp.float32)).transpose(1, 3, 0, 2).reshape(2 * packed.shape[1], -1)
    np.testing.assert_array_equal(unpacked[:k, :n], _bf16(w))  # the layout holds the rounded weights
    got = np.asarray(jax.jit(lambda x, p: native.dense_bf16(x, p, n, implementation=implementation))(x, packed))
    want = _bf16(x) @ _bf16(w)
    bound = 4 * k * np.finfo(np.float32).eps * (np.abs(_bf16(x)) @ np.abs(_bf16(w)))
    assert np.all(np.abs(got - want) <= bound)
    assert np.abs(got - x.astype(np.float64) @ w.astype(np.float64)).max() > np.abs(got - want).max()  # it rounded
    scalar = native.dense_bf16(jnp.asarray(x), packed, n, implementation="scalar")
    np.testing.assert_array_equal(np.asarray(scalar), got)
    got3 = native.dense_bf16(jnp.asarray(x.reshape(1, m, k)), packed, n, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(got3).reshape(m, n), got)  # leading axes are kept


def test_bfloat16_dense_kernel_names_bad_shapes():
    w = jnp.asarray(native.pack_dense_bf16(np.ones((64, 100), np.float32)))
    with pytest.raises(ValueError, match="do not fit"):
        native.dense_bf16(jnp.ones((3, 66)), w, 100)
    with pytest.raises(ValueError, match="do not fit"):
        native.dense_bf16(jnp.ones((3, 64)), w, 200)
    with pytest.raises(ValueError, match="implementation"):
        native.dense_bf16(jnp.ones((3, 64)), w, 100, implementation="amx")
    with pytest.raises(ValueError, match="K, N"):
        native.pack_dense_bf16(np.ones(5, np.float32))


@pytest.mark.parametrize("implementation", native.DENSE_F32_IMPLEMENTATIONS)
@pytest.mark.parametrize("m, k, n", [(32, 384, 1536), (300, 384, 1536), (5, 7, 50), (9, 130, 48), (257, 64, 20)])
def test_bfloat16_dense_kernel_with_gelu_is_the_gelu_kernel_on_its_product(implementation, m, k, n):
    """`gelu_bias`: the exact GELU of product + bias in the kernel's epilogue, bit for bit the separate GELU kernel
    (XLA's bits) on the product: partial panels, several row tasks, inputs across all three erfc branches, a NaN
    and infinities (each branch's select as XLA makes it)."""
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, 0], x[-1, -1] = np.nan, np.inf
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    bias = jnp.asarray(rng.uniform(-4, 4, n).astype(np.float32))  # |z| < 1, 1 <= |z| < 2, |z| >= 2
    packed = jnp.asarray(native.pack_dense_bf16(w))
    product = native.dense_bf16(jnp.asarray(x), packed, n, implementation=implementation)
    want = np.asarray(jax.jit(lambda y, b: jax.nn.gelu(y + b, approximate=False))(product, bias))
    fused = jax.jit(lambda x: native.dense_bf16(x, packed, n, gelu_bias=bias, implementation=implementation))
    got = np.asarray(fused(jnp.asarray(x)))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, np.asarray(native.gelu(product, bias)))
    assert np.isnan(got).any() and (np.abs(np.asarray(product) + np.asarray(bias)) >= 2 * np.sqrt(2)).any()
    with pytest.raises(ValueError, match="gelu_bias"):
        native.dense_bf16(jnp.asarray(x), packed, n, gelu_bias=bias[:-1])


@pytest.mark.parametrize("implementation", native.DENSE_F32_IMPLEMENTATIONS)
@pytest.mark.parametrize("m, k, n", [(32, 384, 1536), (300, 384, 1536), (5, 7, 50), (9, 130, 51), (257, 64, 20)])
def test_bfloat16_gelu_output_feeds_the_next_product_with_the_same_bits(implementation, m, k, n):
    """`out_dtype=bfloat16` with `gelu_bias`: the GELU's output rounded to nearest even (NaN and infinities kept),
    and the next product reading that bfloat16 x as it is gives the bits it gives on the float32 output (which
    it rounds the same way); an odd K there takes the float32 path."""
    rng = np.random.default_rng(m * k + n + 1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, 0], x[-1, -1] = np.nan, np.inf
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    bias = jnp.asarray(rng.uniform(-4, 4, n).astype(np.float32))
    packed = jnp.asarray(native.pack_dense_bf16(w))
    dense = functools.partial(native.dense_bf16, packed=packed, n=n, gelu_bias=bias, implementation=implementation)
    f32 = jax.jit(dense)(jnp.asarray(x))
    b16 = jax.jit(functools.partial(dense, out_dtype=jnp.bfloat16))(jnp.asarray(x))
    assert b16.dtype == jnp.bfloat16 and b16.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(b16.astype(jnp.float32)), _bf16(np.asarray(f32)))
    assert np.isnan(np.asarray(b16.astype(jnp.float32))).any()
    w2 = (rng.standard_normal((n, 40)) / np.sqrt(n)).astype(np.float32)
    packed2 = jnp.asarray(native.pack_dense_bf16(w2))
    second = jax.jit(lambda h: native.dense_bf16(h, packed2, 40, implementation=implementation))
    if n % 2 == 0:
        assert "colbert_jax_dense_bf16_rounded" in second.lower(b16).as_text()
    np.testing.assert_array_equal(np.asarray(second(b16)), np.asarray(second(f32)))
    with pytest.raises(ValueError, match="needs gelu_bias"):
        native.dense_bf16(jnp.asarray(x), packed, n, out_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        native.dense_bf16(jnp.asarray(x), packed, n, gelu_bias=bias, out_dtype=jnp.float16)


def test_bf16_encoder_runs_every_dense_product_on_the_kernel(minilm_model):
    """query_quantization="bf16": every layer's four dense products (fused qkv, attention's output, the MLP's two)
    packed for `dense_bf16`, none left for the float32 kernel; the projection head stays float32."""
    model = minilm_model.replace_config(query_quantization="bf16")
    assert model.query_quantization == "bf16" and model.native_float_encoder
    leaves = jax.tree_util.tree_flatten_with_path(model._query_params)[0]
    names = ["/".join(str(getattr(p, "key", p)) for p in path) for path, _ in leaves]
    bf16 = sorted(n.rsplit("/", 1)[0] for n in names if n.endswith("packed_bf16"))
    layers = minilm_model.bert_config.num_hidden_layers
    assert len(bf16) == 4 * layers
    for tail in ("attention/self/qkv", "attention/output/dense", "intermediate/dense"):
        assert sum(n.endswith(tail) for n in bf16) == layers, tail
    assert not any(n.endswith("packed_f32") for n in names)
    assert not any(n.startswith("linear") for n in bf16)
    texts = ["how to parse json", "open a file for writing in binary mode", "sort a list of tuples by key"]
    ids, mask = model.query_tokenizer.tensorize(texts)
    program = model._query_fn.lower(model._query_params, ids, mask).as_text()
    if native.gelu_faster_than_xla():  # the intermediate layers' bias and GELU in their products' epilogue
        # ... its output rounded to bfloat16 there, read as it is by the MLP's second product
        assert program.count("@colbert_jax_dense_bf16_gelu_rounded(") == layers
        assert program.count("@colbert_jax_dense_bf16_rounded(") == layers
        assert "@colbert_jax_gelu(" not in program
    got = model.encode_queries(texts)
    full = minilm_model.replace_config(query_quantization="none").encode_queries(texts)
    assert 0 < np.abs(got - full).max() <= 2e-3  # bfloat16's rounding, not float32's
    one = np.stack([model.encode_queries([t])[0] for t in texts])
    np.testing.assert_allclose(one, got, rtol=0, atol=1e-5)  # a query alone or in a batch


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_bf16_encoder_lowers_for_accelerators_without_the_kernel(platform, bf16, minilm_model):
    """The same params in a program for another platform: `jnp.matmul` of the rounded operands (bf16) or of the
    float32 ones (the packed float32 params, whose fused qkv skips [MASK] rows on the CPU), no native call."""
    model = minilm_model
    ids, mask = model.query_tokenizer.tensorize(["a query"])
    module = model.module.clone(unstacked=True)
    host = unstacked_params(model.bert_config, jax.device_get(model.params))
    params = fuse_float_params(host, packed=True, bf16=bf16)
    apply = quantized_apply(functools.partial(embed_queries, module, pad_id=model.query_pad_id))
    text = lower(jax.jit(apply), params, ids, mask, platform=platform, name="bf16 encoder" if bf16 else "f32 encoder")
    assert all(f"colbert_jax_{kernel}" not in text for kernel in ("dense_bf16", "dense_f32", "attention", "gelu"))


def test_bf16_needs_the_native_float_encoder(minilm_model):
    with pytest.raises(ValueError, match="bf16"):
        minilm_model.replace_config(query_quantization="bf16", compute_dtype="bfloat16")


@pytest.mark.parametrize("implementation", native.DENSE_F32_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "m, k, n, split", [(64, 384, 1152, 384), (300, 384, 1152, 384), (7, 130, 150, 48), (9, 64, 96, 0)]
)
def test_bfloat16_dense_kernel_skips_the_columns_of_rows_not_needed(implementation, m, k, n, split):
    """`rows_needed`: columns from `split` on only for the marked rows, the bits of the full product there, zero in
    the others; the columns before `split` for every row. Several row tasks, a partial last panel, no row marked."""
    rng = np.random.default_rng(m + k + n + split)
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    packed = jnp.asarray(native.pack_dense_bf16((0.05 * rng.standard_normal((k, n))).astype(np.float32)))
    full = np.asarray(native.dense_bf16(x, packed, n, implementation=implementation))
    for needed in (rng.random(m) < 0.4, np.zeros(m, bool), np.ones(m, bool)):
        run = jax.jit(
            lambda x, r: native.dense_bf16(x, packed, n, rows_needed=r, split=split, implementation=implementation)
        )
        got = np.asarray(run(x, jnp.asarray(needed)))
        np.testing.assert_array_equal(got[:, :split], full[:, :split])
        np.testing.assert_array_equal(got[needed, split:], full[needed, split:])
        assert not got[~needed, split:].any()
    got3 = native.dense_bf16(x.reshape(1, m, k), packed, n, rows_needed=jnp.asarray(needed).reshape(1, m), split=split)
    np.testing.assert_array_equal(np.asarray(got3).reshape(m, n), full)
    with pytest.raises(ValueError, match="multiple of 48"):
        native.dense_bf16(x, packed, n, rows_needed=jnp.asarray(needed), split=split + 1)
    with pytest.raises(ValueError, match="leading shape"):
        native.dense_bf16(x, packed, n, rows_needed=jnp.asarray(needed)[1:], split=split)
    with pytest.raises(ValueError, match="together"):
        native.dense_bf16(x, packed, n, rows_needed=jnp.asarray(needed), gelu_bias=jnp.zeros(n), split=split)


def test_bf16_encoder_skips_the_keys_and_values_of_mask_tokens_bit_for_bit(monkeypatch, minilm_model):
    """A query's [MASK] padding is not attended as a key: each layer's fused product computes its keys and values
    for the attended tokens only (`colbert_jax_dense_bf16_rows`), and the embeddings, [MASK] rows included, are
    the bits of the full product's."""
    model = minilm_model
    texts = ["how to parse json", "open a file for writing in binary mode and append to it", "sort"]
    ids, mask = model.query_tokenizer.tensorize(texts)
    assert 0 < np.asarray(mask).mean() < 0.6  # most positions are [MASK] padding no key attends
    module = model.module.clone(unstacked=True)
    host = unstacked_params(model.bert_config, jax.device_get(model.params))
    params = fuse_float_params(host, packed=True, bf16=True)

    def encode():
        apply = quantized_apply(functools.partial(embed_queries, module, pad_id=model.query_pad_id))
        fn = jax.jit(apply)
        return fn.lower(params, ids, mask).as_text(), np.asarray(fn(params, ids, mask))

    program, skipped = encode()
    assert program.count("@colbert_jax_dense_bf16_rows(") == model.bert_config.num_hidden_layers
    monkeypatch.setattr(quantize, "_qkv_product", lambda x, p, key_bias: quantize._product(x, p))
    program_full, full = encode()
    assert "@colbert_jax_dense_bf16_rows(" not in program_full
    np.testing.assert_array_equal(skipped, full)


@pytest.mark.parametrize("panel", native.F32_PANELS)
@pytest.mark.parametrize("implementation", native.DENSE_F32_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "m, k, n, split", [(64, 384, 1152, 384), (600, 384, 1152, 384), (7, 130, 150, 48), (9, 64, 96, 0)]
)
def test_float32_dense_kernel_skips_the_columns_of_rows_not_needed(implementation, panel, m, k, n, split):
    """`rows_needed` in the float32 kernel: the columns from `split` on only for the marked rows, with the full
    product's bits there (in either panel width), zero in the others; the columns before `split` for every row.
    Several row tasks (600 rows), a partial last panel, no row marked, every row marked."""
    rng = np.random.default_rng(m + k + n + split + panel)
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    packed = jnp.asarray(native.pack_dense_f32(rng.standard_normal((k, n)).astype(np.float32), panel))
    full = np.asarray(native.dense_f32(x, packed, n, implementation=implementation))
    run = jax.jit(
        lambda x, r: native.dense_f32(x, packed, n, rows_needed=r, split=split, implementation=implementation)
    )
    for needed in (rng.random(m) < 0.3, np.zeros(m, bool), np.ones(m, bool)):
        got = np.asarray(run(x, jnp.asarray(needed)))
        np.testing.assert_array_equal(got[:, :split], full[:, :split])
        np.testing.assert_array_equal(got[needed, split:], full[needed, split:])
        assert not got[~needed, split:].any()
    got3 = native.dense_f32(x.reshape(1, m, k), packed, n, rows_needed=jnp.ones((1, m), bool), split=split)
    np.testing.assert_array_equal(np.asarray(got3).reshape(m, n), full)
    with pytest.raises(ValueError, match="multiple of"):
        native.dense_f32(x, packed, n, rows_needed=jnp.ones(m, bool), split=split + 8)
    with pytest.raises(ValueError, match="leading shape"):
        native.dense_f32(x, packed, n, rows_needed=jnp.ones(m - 1, bool), split=split)


@pytest.mark.parametrize("queries", [3, 12])
def test_float32_encoder_skips_the_keys_and_values_of_mask_tokens_bit_for_bit(monkeypatch, minilm_model, queries):
    """The float32 encoder on packed params: each layer's fused product computes keys and values for the attended
    tokens only (`colbert_jax_dense_f32_rows`), at any batch size (12 queries: 384 rows, past the rows where the
    other products leave the native kernel for XLA's), and the embeddings, [MASK] rows included, are the bits of
    the native kernel's full product."""
    model = minilm_model
    texts = ["how to parse json", "open a file for writing in binary mode and append to it", "sort"]
    texts = (texts * 4)[:queries]
    ids, mask = model.query_tokenizer.tensorize(texts)
    assert 0 < np.asarray(mask).mean() < 0.6
    module = model.module.clone(unstacked=True)
    host = unstacked_params(model.bert_config, jax.device_get(model.params))
    params = fuse_float_params(host, packed=True)

    def encode():
        apply = quantized_apply(functools.partial(embed_queries, module, pad_id=model.query_pad_id))
        fn = jax.jit(apply)
        return fn.lower(params, ids, mask).as_text(), np.asarray(fn(params, ids, mask))

    program, skipped = encode()
    assert program.count("@colbert_jax_dense_f32_rows(") == model.bert_config.num_hidden_layers
    monkeypatch.setattr(
        quantize,
        "_qkv_product",
        lambda x, p, key_bias: native.dense_f32(x, p[quantize.PACKED_F32], p["bias"].shape[-1]),
    )
    program_full, full = encode()
    assert "@colbert_jax_dense_f32_rows(" not in program_full
    np.testing.assert_array_equal(skipped, full)
