"""The int16 dense layer (`colbert_jax.native.dense_int16`, `dense_int16.cc`) and the query encoder on it
(`query_quantization="int16"`): the kernel's vector and scalar paths give the bits of XLA's twin
(`dense_int16_reference`), its GELU epilogue XLA's GELU on them, its skipped rows the full product's bits; the
encoder runs every dense product on it, stays batch-invariant, lowers for accelerators without it, and is
closer to float32's embeddings than the bf16 encoder."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import colbert_jax
from colbert_jax import native
from colbert_jax.modeling import quantize
from colbert_jax.modeling.backbones import unstacked_params
from colbert_jax.modeling.colbert import embed_queries
from colbert_jax.modeling.quantize import fuse_float_params, quantized_apply
from tests.kernels.lowering import lower

SHAPES = [(32, 384, 1536), (33, 1536, 384), (5, 7, 50), (300, 384, 100), (9, 130, 48), (257, 64, 20)]


def _problem(m: int, k: int, n: int):
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if m > 2:
        x[0, k // 2] = 40.0  # an outlier feature: its row's steps are coarse
        x[1] = 0.0  # a zero row: codes and scale 0
    w = (0.05 * rng.standard_normal((k, n))).astype(np.float32)
    w[:, 0] = 0.0  # a zero column
    return x, w


@pytest.mark.parametrize("implementation", native.DENSE_F32_IMPLEMENTATIONS)
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_int16_dense_kernel_is_its_xla_twin_bit_for_bit(implementation, m, k, n):
    """Odd K (a zero-padded pair), partial panels, several row tasks, a K of several 128-coordinate passes, an
    outlier, a zero row and a zero column: the kernel's bits are `dense_int16_reference`'s, and within the
    quantization's error of the float64 product."""
    x, w = _problem(m, k, n)
    packed, scales = native.pack_dense_int16(w)
    assert packed.shape == (-(-n // 48), -(-k // 2), 48, 2) and packed.dtype == np.int16 and scales.shape == (n,)
    codes = packed.transpose(1, 3, 0, 2).reshape(2 * packed.shape[1], -1)[:k, :n].astype(np.int64)
    assert np.abs(codes).max() == native.INT16_MAX_CODE and not codes[:, 0].any() and scales[0] == 0
    np.testing.assert_allclose(codes * scales, w, rtol=0, atol=np.abs(w).max() / native.INT16_MAX_CODE)
    got = np.asarray(
        jax.jit(lambda x, p, s: native.dense_int16(x, p, s, n, implementation=implementation))(x, packed, scales)
    )
    want = np.asarray(jax.jit(native.dense_int16_reference, static_argnums=3)(x, packed, scales, n))
    np.testing.assert_array_equal(got, want)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    # half a step of each operand, summed over K: the codes' rounding, not float32's
    step_x = np.abs(x).max(axis=1, keepdims=True) / native.INT16_MAX_CODE
    step_w = np.abs(w).max(axis=0, keepdims=True) / native.INT16_MAX_CODE
    bound = 0.5 * (step_x * np.abs(w).sum(axis=0, keepdims=True) + np.abs(x).sum(axis=1, keepdims=True) * step_w)
    assert np.all(np.abs(got - exact) <= bound + 1e-6)
    if m > 1:
        assert not got[1].any() and not got[:, 0].any()
    got3 = native.dense_int16(jnp.asarray(x.reshape(1, m, k)), packed, scales, n, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(got3).reshape(m, n), got)  # leading axes are kept


@pytest.mark.parametrize("implementation", native.DENSE_F32_IMPLEMENTATIONS)
@pytest.mark.parametrize("m, k, n", [(32, 384, 1536), (300, 384, 1536), (5, 7, 50), (9, 130, 48)])
def test_int16_dense_kernel_with_gelu_is_xlas_gelu_on_its_product(implementation, m, k, n):
    """`gelu_bias`: the exact GELU of product + bias in the epilogue, bit for bit XLA's GELU on the product, across
    all three erfc branches."""
    x, w = _problem(m, k, n)
    w = w * np.float32(20.0 / np.sqrt(k))
    bias = jnp.asarray(np.random.default_rng(n).uniform(-4, 4, n).astype(np.float32))
    packed, scales = native.pack_dense_int16(w)
    product = native.dense_int16(jnp.asarray(x), packed, scales, n, implementation=implementation)
    want = np.asarray(jax.jit(lambda y, b: jax.nn.gelu(y + b, approximate=False))(product, bias))
    fused = jax.jit(lambda x: native.dense_int16(x, packed, scales, n, gelu_bias=bias, implementation=implementation))
    np.testing.assert_array_equal(np.asarray(fused(jnp.asarray(x))), want)
    assert (np.abs(np.asarray(product) + np.asarray(bias)) >= 2 * np.sqrt(2)).any()


@pytest.mark.parametrize("implementation", native.DENSE_F32_IMPLEMENTATIONS)
@pytest.mark.parametrize("m, k, n, split", [(64, 384, 1152, 384), (300, 384, 1152, 384), (7, 130, 150, 48)])
def test_int16_dense_kernel_skips_the_columns_of_rows_not_needed(implementation, m, k, n, split):
    """`rows_needed`: columns from `split` on only for the marked rows, with the full product's bits there (each
    row keeps its own scale), zero in the others; no row marked; every row marked."""
    x, w = _problem(m, k, n)
    packed, scales = native.pack_dense_int16(w)
    full = np.asarray(native.dense_int16(jnp.asarray(x), packed, scales, n, implementation=implementation))
    rng = np.random.default_rng(split)
    for needed in (rng.random(m) < 0.4, np.zeros(m, bool), np.ones(m, bool)):
        run = jax.jit(
            lambda x, r: native.dense_int16(
                x, packed, scales, n, rows_needed=r, split=split, implementation=implementation
            )
        )
        got = np.asarray(run(jnp.asarray(x), jnp.asarray(needed)))
        np.testing.assert_array_equal(got[:, :split], full[:, :split])
        np.testing.assert_array_equal(got[needed, split:], full[needed, split:])
        assert not got[~needed, split:].any()


def test_int16_dense_kernel_names_bad_shapes():
    packed, scales = native.pack_dense_int16(np.ones((64, 100), np.float32))
    x = jnp.ones((3, 64))
    with pytest.raises(ValueError, match="do not fit"):
        native.dense_int16(jnp.ones((3, 66)), packed, scales, 100)
    with pytest.raises(ValueError, match="do not fit"):
        native.dense_int16(x, packed, scales, 200)
    with pytest.raises(ValueError, match="scales"):
        native.dense_int16(x, packed, scales[:-1], 100)
    with pytest.raises(ValueError, match="implementation"):
        native.dense_int16(x, packed, scales, 100, implementation="amx")
    with pytest.raises(ValueError, match="gelu_bias"):
        native.dense_int16(x, packed, scales, 100, gelu_bias=jnp.zeros(99))
    with pytest.raises(ValueError, match="multiple of 48"):
        native.dense_int16(x, packed, scales, 100, rows_needed=jnp.ones(3, bool), split=5)
    with pytest.raises(ValueError, match="together"):
        native.dense_int16(x, packed, scales, 100, rows_needed=jnp.ones(3, bool), gelu_bias=jnp.zeros(100))
    with pytest.raises(ValueError, match="K, N"):
        native.pack_dense_int16(np.ones(5, np.float32))


TEXTS = [
    "how to parse json",
    "open a file for writing in binary mode and append to it",
    "sort a list of tuples by key",
    "sqlite3 connect",
]


def test_int16_encoder_runs_every_dense_product_on_the_kernel(minilm_model):
    """query_quantization="int16": every layer's four dense products packed for `dense_int16` (the intermediate
    one with its GELU in the epilogue where the native GELU runs, the fused qkv skipping [MASK] keys and values),
    none left for another kernel; the projection head stays float32; a query alone has its batch's bits."""
    model = minilm_model.replace_config(query_quantization="int16")
    assert model.query_quantization == "int16" and model.native_float_encoder
    leaves = jax.tree_util.tree_flatten_with_path(model._query_params)[0]
    names = ["/".join(str(getattr(p, "key", p)) for p in path) for path, _ in leaves]
    int16 = sorted(n.rsplit("/", 1)[0] for n in names if n.endswith(quantize.PACKED_INT16))
    layers = minilm_model.bert_config.num_hidden_layers
    assert len(int16) == 4 * layers
    for tail in ("attention/self/qkv", "attention/output/dense", "intermediate/dense"):
        assert sum(n.endswith(tail) for n in int16) == layers, tail
    assert not any(n.endswith(("packed_f32", "packed_bf16")) for n in names)
    assert not any(n.startswith("linear") for n in int16)
    ids, mask = model.query_tokenizer.tensorize(TEXTS)
    program = model._query_fn.lower(model._query_params, ids, mask).as_text()
    assert program.count("@colbert_jax_dense_int16_rows(") == layers
    if native.gelu_faster_than_xla():
        assert program.count("@colbert_jax_dense_int16_gelu(") == layers
        assert "@colbert_jax_gelu(" not in program
    got = model.encode_queries(TEXTS)
    one = np.stack([model.encode_queries([t])[0] for t in TEXTS])
    np.testing.assert_array_equal(one, got)  # a query alone or in a batch: the same bits


def test_int16_encoder_is_closer_to_float32_than_bf16(minilm_model):
    """The int16 encoder's embeddings are within cosine 1 - 1e-4 of float32's, and nearer float32's than the bf16
    encoder's (`scripts/quality_int16_encoder.py` measures the rankings)."""
    full = minilm_model.replace_config(query_quantization="none").encode_queries(TEXTS)
    errors = {}
    for q in ("int16", "bf16"):
        got = minilm_model.replace_config(query_quantization=q).encode_queries(TEXTS)
        cosine = (got * full).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(full, axis=-1))
        assert cosine.min() > 1 - 1e-4, q
        errors[q] = float((1 - cosine).mean())
    assert 0 < errors["int16"] < errors["bf16"] / 2, errors  # measured: about a third


def test_int16_encoder_without_the_kernel_is_the_same_numbers(minilm_model):
    """The same params in a CPU program with the XLA twin in place of the kernel give the kernel encoder's
    embeddings to float32 accuracy (attention, GELU and the twins are float32-accurate, not bitwise, apart), and
    programs for accelerators lower without any native call."""
    model = minilm_model
    ids, mask = model.query_tokenizer.tensorize(TEXTS)
    module = model.module.clone(unstacked=True)
    host = unstacked_params(model.bert_config, jax.device_get(model.params))
    params = fuse_float_params(host, packed=True, int16=True)
    apply = quantized_apply(functools.partial(embed_queries, module, pad_id=model.query_pad_id))
    kernel = np.asarray(jax.jit(apply)(params, ids, mask))
    for platform in ("cuda", "tpu"):
        text = lower(jax.jit(apply), params, ids, mask, platform=platform, name="int16 encoder")
        assert all(f"colbert_jax_{k}" not in text for k in ("dense_int16", "dense_f32", "attention", "gelu"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "dense_int16", lambda x, packed, scales, n, **kw: _twin(x, packed, scales, n, **kw))
        twin = np.asarray(jax.jit(apply)(params, ids, mask))
    np.testing.assert_allclose(twin, kernel, rtol=0, atol=1e-5)


def _twin(x, packed, scales, n, gelu_bias=None, rows_needed=None, split=0):
    y = native.dense_int16_reference(x, packed, scales, n)
    return y if gelu_bias is None else jax.nn.gelu(y + gelu_bias, approximate=False)


def test_int16_needs_the_native_float_encoder(minilm_model):
    with pytest.raises(ValueError, match="int16"):
        minilm_model.replace_config(query_quantization="int16", compute_dtype="bfloat16")


def test_searcher_takes_int16(real_index, minilm_model):
    """A searcher with query_quantization="int16" ranks as the float32 encoder does, to near-ties."""
    index = colbert_jax.Index.open(real_index)
    queries = ["read a csv file", "regular expression match", "current time in seconds"]
    ranked = {}
    for q in ("int16", "none"):
        searcher = colbert_jax.Searcher(index, minilm_model, query_quantization=q)
        assert searcher.model.query_quantization == q
        ranked[q] = searcher.search_all(queries, k=10).todict()
    for i in range(len(queries)):
        a = [pid for pid, _, _ in ranked["int16"][i]]
        b = [pid for pid, _, _ in ranked["none"][i]]
        assert len(set(a) & set(b)) >= 9 and a[0] == b[0]
