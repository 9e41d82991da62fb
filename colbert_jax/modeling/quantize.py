"""int8 inference for the encoder's dense layers: weights and activations each as two int8 terms.

Every backbone `nn.Dense` kernel [.., in, out] is stored as two int8 arrays with one float32 scale per output
channel (stacked layers keep their leading axis): w ~ s_w * (w_hi + w_lo / 254), where w_hi is the usual
symmetric max-abs / 127 rounding and w_lo the rounding error of w_hi, itself rounded at 1/254 of the step
(the error lies within half a step, so it fits in [-127, 127]). Each activation row (one token's features) is
split the same way with its own scale: x ~ s_x * (x_hi + x_lo / 254). The product keeps the three largest
terms, in two int8 matmuls with int32 accumulation:

    y = s_x * s_w * (x_hi . w_hi + ([x_hi, x_lo] . [w_lo; w_hi]) / 254) + b

(the second one contracts over 2 * in: x_hi . w_lo and x_lo . w_hi in one product; x_lo . w_lo, 254 times
smaller again, is left out). That is about 16-bit precision at 1.5x the int8 work of one term each: query
embeddings stay within cosine 1 - 2e-6 of float32 on MiniLM, where one int8 weight term (1 - 3e-4) or
bfloat16 (1 - 6e-5) already reorders the top 10 of a few percent of queries on collections with near-duplicate
passages. XLA:CPU runs int8 products several times faster per operation than float32 ones, so this still beats
float32 (`scripts/bench_encoder.py` measures it against float32 and colbert-ai).

The module code is untouched: `quantize_params` rewrites the parameter tree (`kernel` becomes w_hi, next to
it `kernel_cross` = [w_lo; w_hi], stored concatenated so that no call copies weights, and `kernel_scale`,
whose presence marks the layer) and `int8_dense` is a Flax method interceptor that computes the quantized
product for a marked `nn.Dense` and leaves every other module call alone. The projection head stays float32
(it is small and sets the final embedding directly).

On CPUs with AMX-INT8, or AVX-512 VNNI fast enough against float32 (`colbert_jax.native.int8_products_fast()`),
`quantize_params(..., packed=True)` stores the two terms in the layout of `colbert_jax.native.int8_dense`
(`packed_hi`, `packed_lo` instead of `kernel` and `kernel_cross`) and the product runs as one native kernel
with the same numbers, bit for bit: XLA:CPU spends most of the int8 encoder's time around its products (the
activation split, a concatenation, the epilogue), and its small-batch int8 products run well below the tile
unit's (or VNNI's) rate. Programs lowered for other platforms unpack the layout and run the XLA product
(`lax.platform_dependent`). With packed params, a self-attention
module that offers `qkv_attention()` (BERT's) is replaced at inference by the fused qkv product and one native
attention kernel (`colbert_jax.native.attention`), instead of XLA:CPU's transposes, batched products and
softmax: float32-accurate but not XLA's bits, so these embeddings differ from the XLA int8 path's by up to a
few 1e-4 (an int8 rounding step of a later layer's input flips), still batch-invariant. A module that is one
dense layer then the exact GELU (`fused_activation()`: BERT's intermediate layer) gets its bias and GELU from one
native kernel (`colbert_jax.native.gelu`) with XLA's bits, which computes the costly erfc branch only for the
elements that select it (XLA computes every branch for every element); on AVX-512 builds only, where that
selection is cheap (elsewhere XLA's GELU, the same bits).

The float32 query encoder on the CPU uses the same interceptor without quantization (`fuse_float_params`): the
fused qkv product then native attention, the intermediate GELU natively (AVX-512 builds), and (where
`native.dense_f32` is vectorised) a few queries' products as that kernel, whose columns run on every thread
where XLA:CPU runs a small product on one core.

Attention's query, key and value projections read the same input: `quantize_params` stores them fused, as one
`qkv` kernel [in, 3 * out] beside them, and the interceptor runs one product (and one activation split) when
`query` is called, keeping the key and value slices for the two calls that follow with the same input (XLA
does not merge the three products itself: the optimized HLO has three dots).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from colbert_jax import native

__all__ = ["QUANTIZATIONS", "IMPLEMENTATIONS", "quantize_params", "fuse_float_params", "int8_dense", "quantized_apply"]

QUANTIZATIONS = ("none", "int8", "bf16", "int16")
SCALE = "kernel_scale"
CROSS = "kernel_cross"
PACKED = ("packed_hi", "packed_lo")  # the two terms in `native.int8_dense`'s layout
PACKED_F32 = "packed_f32"  # a float32 kernel in `native.dense_f32`'s layout
PACKED_BF16 = "packed_bf16"  # a kernel in `native.dense_bf16`'s layout: its product on bfloat16 operands
PACKED_INT16 = "packed_int16"  # a kernel's int16 codes in `native.dense_int16`'s layout: its product on int16
INT16_SCALE = "int16_scale"  # operands, and the codes' column scales
# products of at most this many rows (a few queries) with packed float32 kernels run as `native.dense_f32`; more
# rows run XLA's product (as fast at batch sizes, and it runs beside other batches' work in flight)
FLOAT_NATIVE_ROWS = 256
IMPLEMENTATIONS = native.DENSE_IMPLEMENTATIONS  # which native path runs packed params on the CPU
_LOW_STEPS = 254.0  # the low term's step is the high term's / 254: a half-step error maps onto [-127, 127]
_QKV = ("query", "key", "value")
_HEADS = ("linear",)  # top-level head modules kept in float32 (PyLate heads are `dense_N`: also kept)


def _quantize_kernel(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """kernel [..., in, out] -> (int8 high [..., in, out], int8 [low; high] [..., 2 * in, out], float32 scale
    [..., out]), per output channel."""
    kernel = np.asarray(kernel, np.float32)
    scale = np.abs(kernel).max(axis=-2) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    steps = kernel / scale[..., None, :]
    high = np.clip(np.rint(steps), -127, 127)
    low = np.clip(np.rint((steps - high) * _LOW_STEPS), -127, 127)
    high = high.astype(np.int8)
    return high, np.concatenate([low.astype(np.int8), high], axis=-2), scale


def quantize_params(params: Mapping[str, Any], *, fuse_qkv: bool = True, packed: bool = False) -> dict[str, Any]:
    """The encoder's params with every backbone dense kernel as two int8 terms plus their `kernel_scale`.

    Only the backbone (the top-level entry that is not a projection head) is quantized; embeddings and
    LayerNorms stay as they are. fuse_qkv: store attention's query/key/value kernels as one `qkv` kernel
    (the same products, one matmul; False keeps three, for comparison). packed: the terms in the native
    kernel's layout (`native.pack_dense`) instead of `kernel` and `kernel_cross` (for `quantized_apply`'s
    "amx", "vnni" and "portable" implementations; same numbers).
    """

    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {k: walk(v) for k, v in tree.items()}
        kernel = tree.get("kernel")
        if kernel is not None and getattr(kernel, "ndim", 0) >= 2:
            out["kernel"], out[CROSS], out[SCALE] = _quantize_kernel(np.asarray(jax.device_get(kernel)))
        if fuse_qkv and all(SCALE in out.get(name, {}) and "bias" in out[name] for name in _QKV):
            # one [.., in, 3 * out] kernel: the three projections read the same input
            out["qkv"] = {
                k: np.concatenate([out[n][k] for n in _QKV], axis=-1) for k in ("kernel", CROSS, SCALE, "bias")
            }
            for name in _QKV:
                out[name] = {}
        return out

    def pack(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {k: pack(v) for k, v in tree.items()}
        if CROSS in out:
            high, cross = out.pop("kernel"), out.pop(CROSS)
            out[PACKED[0]], out[PACKED[1]] = native.pack_dense(high, cross[..., : high.shape[-2], :])
        return out

    quantized = {k: (v if k in _HEADS or k.startswith("dense_") else walk(v)) for k, v in params.items()}
    return pack(quantized) if packed else quantized


def fuse_float_params(
    params: Mapping[str, Any], *, packed: bool = False, bf16: bool = False, int16: bool = False
) -> dict[str, Any]:
    """The float32 encoder's params for the native CPU kernels (`quantized_apply` on float params): each
    attention's query/key/value kernels and biases concatenated into one `qkv` dense layer (one product, then
    `native.attention`), and the intermediate layer's bias and exact GELU run as `native.gelu` after the
    product. packed: every backbone dense kernel with a bias also in `native.dense_f32`'s layout (`packed_f32`
    beside `kernel`, twice the dense weights' memory): products of at most `FLOAT_NATIVE_ROWS` rows run as
    that kernel in CPU programs, XLA's from `kernel` otherwise; else XLA runs every product. bf16: every
    backbone dense product (attention's projections and the MLP's) instead on bfloat16 operands with float32
    sums at every row count (`packed_bf16`, `native.dense_bf16`; `query_quantization="bf16"`); attention's
    scores, GELU and LayerNorms stay float32. int16: the same products on int16 operands, each activation row
    and weight column with its own scale (`packed_int16` and `int16_scale`, `native.dense_int16`;
    `query_quantization="int16"`)."""

    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {k: walk(v) for k, v in tree.items()}
        parts = [tree.get(name) for name in _QKV]  # as given: `walk` packs their kernels
        if all(isinstance(q, Mapping) and SCALE not in q and {"kernel", "bias"} <= set(q) for q in parts):
            host = [jax.device_get(q) for q in parts]
            out["qkv"] = walk_dense(
                {k: np.concatenate([np.asarray(q[k]) for q in host], axis=-1) for k in ("kernel", "bias")}
            )
            for name in _QKV:
                out[name] = {}
        return walk_dense(out)

    def walk_dense(p):
        kernel = p.get("kernel")
        if kernel is None or getattr(kernel, "ndim", 0) < 2 or "bias" not in p or SCALE in p:
            return p
        if int16:
            codes, scales = native.pack_dense_int16(np.asarray(jax.device_get(kernel), np.float32))
            return {**p, PACKED_INT16: codes, INT16_SCALE: scales}
        if bf16:
            return {**p, PACKED_BF16: native.pack_dense_bf16(np.asarray(jax.device_get(kernel), np.float32))}
        if packed:
            return {**p, PACKED_F32: native.pack_dense_f32(np.asarray(jax.device_get(kernel), np.float32))}
        return p

    return {k: (v if k in _HEADS or k.startswith("dense_") else walk(v)) for k, v in params.items()}


def _split_rows(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x float [..., n] -> (int8 high, int8 low, float32 scale [..., 1]): x ~ scale * (high + low / 254)."""
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    steps = x / scale
    high = jnp.clip(jnp.round(steps), -127, 127)
    low = jnp.clip(jnp.round((steps - high) * _LOW_STEPS), -127, 127)
    return high.astype(jnp.int8), low.astype(jnp.int8), scale


def _int8_matmul(x: jax.Array, high: jax.Array, cross: jax.Array, scale: jax.Array) -> jax.Array:
    """x float [..., in] times the two-term int8 kernel (high [in, out], cross = [low; high] [2 * in, out],
    `scale` [out]) -> float32 [..., out]."""
    x_hi, x_lo, x_scale = _split_rows(x.astype(jnp.float32))
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    main = jax.lax.dot_general(x_hi, high, dims, preferred_element_type=jnp.int32)
    # x_hi . w_lo + x_lo . w_hi as one product over the concatenated inputs (int32 cannot overflow:
    # 2 * in * 127 * 127 < 2**31 for in < 66,000)
    both = jnp.concatenate([x_hi, x_lo], axis=-1)
    cross = jax.lax.dot_general(both, cross, dims, preferred_element_type=jnp.int32)
    # XLA:CPU contracts a product that feeds an addition (here, or the caller's bias or residual add) into one
    # FMA only when both land in the same fusion, which depends on the batch shape and on SPMD partitioning: the
    # rounding would depend on the batch. A select between them (its predicate is always true: scales are
    # never 0, and NaN or inf still pass) keeps every product rounded on its own in every compiled program.
    keep = x_scale != 0
    acc = main.astype(jnp.float32) + jnp.where(keep, cross.astype(jnp.float32) * (1.0 / _LOW_STEPS), 0.0)
    return acc / ((1.0 / x_scale) * (1.0 / scale))


def _unpack(packed: jax.Array, k: int, n: int) -> jax.Array:
    """A term in `native.pack_dense`'s layout [Nb, Kp / 4, 64] -> [k, n] (for programs without the kernel)."""
    nb, quads = packed.shape[0], packed.shape[1]
    w = packed.reshape(nb, quads, 16, 4).transpose(1, 3, 0, 2).reshape(quads * 4, nb * 16)
    return w[:k, :n]


def _rounded_bf16_product(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """`native.dense_bf16`'s products (exact in float32) and float32 sums in XLA's order, for programs without
    the kernel: x and the kernel rounded to bfloat16, multiplied in float32."""

    def r(a):
        return a.astype(jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)

    return jnp.matmul(r(x), r(p["kernel"]), precision=jax.lax.Precision.HIGHEST)


def _product(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """x times a dense layer's kernel (params `p`: float32, or quantized in either layout), float32 [..., out]."""
    if PACKED_BF16 in p:
        packed, n = p[PACKED_BF16], p["bias"].shape[-1]
        return jax.lax.platform_dependent(
            x, cpu=lambda x: native.dense_bf16(x, packed, n), default=lambda x: _rounded_bf16_product(x, p)
        )
    if PACKED_INT16 in p:
        packed, scales, n = p[PACKED_INT16], p[INT16_SCALE], p["bias"].shape[-1]
        return jax.lax.platform_dependent(
            x,
            cpu=lambda x: native.dense_int16(x, packed, scales, n),
            default=lambda x: native.dense_int16_reference(x, packed, scales, n),
        )
    if PACKED_F32 in p:
        packed, n = p[PACKED_F32], p["bias"].shape[-1]

        def xla(x):
            return jnp.matmul(x.astype(jnp.float32), p["kernel"].astype(jnp.float32))

        if int(np.prod(x.shape[:-1], dtype=np.int64)) > FLOAT_NATIVE_ROWS:
            return xla(x)
        return jax.lax.platform_dependent(x, cpu=lambda x: native.dense_f32(x, packed, n), default=xla)
    if SCALE not in p:
        return jnp.matmul(x.astype(jnp.float32), p["kernel"].astype(jnp.float32))
    scale = p[SCALE]
    if PACKED[0] not in p:
        return _int8_matmul(x, p["kernel"], p[CROSS], scale)
    high, low = p[PACKED[0]], p[PACKED[1]]

    def kernel(x):
        return native.int8_dense(x, high, low, scale, implementation=_int8_implementation())

    return jax.lax.platform_dependent(x, cpu=kernel, default=lambda x: _packed_int8_product(x, p))


def _int8_implementation() -> str:
    return getattr(_trace, "implementation", None) or "amx"


def _packed_int8_product(x: jax.Array, p: Mapping[str, jax.Array]) -> jax.Array:
    """`native.int8_dense`'s numbers for programs without the kernel: the packed terms unpacked, `_int8_matmul`."""
    high, low, scale = p[PACKED[0]], p[PACKED[1]], p[SCALE]
    k, n = x.shape[-1], scale.shape[-1]
    w_hi, w_lo = _unpack(high, k, n), _unpack(low, k, n)
    return _int8_matmul(x, w_hi, jnp.concatenate([w_lo, w_hi], axis=0), scale)


_pending = threading.local()  # trace-time only: the fused key and value outputs awaiting their calls
_trace = threading.local()  # trace-time only: `quantized_apply`'s implementation


def _fused_projection(module: nn.Dense, x: jax.Array) -> jax.Array:
    """`module` is one of query/key/value whose parent holds the fused `qkv` params: its output for x."""
    parent = module.parent
    index = _QKV.index(module.name)
    pending = getattr(_pending, "outputs", None)
    if pending is None:
        pending = _pending.outputs = {}
    key = id(parent)
    held = pending.get(key)
    if held is not None and held[0] is x and index in held[1]:
        out = held[1].pop(index)
        if not held[1]:
            del pending[key]
        return out
    p = parent.variables["params"]["qkv"]
    y = _product(x, p) + p["bias"]
    parts = dict(enumerate(jnp.split(y, 3, axis=-1)))
    out = parts.pop(index)
    pending[key] = (x, parts)  # the sibling projections are called next with this same x
    return out


def _qkv_product(x: jax.Array, p: Mapping[str, jax.Array], key_bias: jax.Array) -> jax.Array:
    """The fused query/key/value product for self-attention under key_bias [B, L]. With bfloat16- or int16-packed
    params, and float32 ones packed for `native.dense_f32` (at every row count: XLA's product cannot skip rows),
    the keys and values of masked positions (a query's [MASK] padding, often most of its tokens) are not
    computed: zero there, which no softmax weight reaches (finfo.min scores), so the attention output keeps its
    bits. A batch row with no attended key keeps all its rows (its softmax is uniform over whatever is there)."""
    if PACKED_BF16 not in p and PACKED_INT16 not in p and PACKED_F32 not in p:
        return _product(x, p)
    n = p["bias"].shape[-1]
    split = -(-(n // 3) // native.BF16_PANEL) * native.BF16_PANEL  # the queries' columns, whole panels
    if n % 3 or split >= n:
        return _product(x, p)
    attended = key_bias > jnp.finfo(jnp.float32).min / 2
    needed = attended | ~attended.any(axis=-1, keepdims=True)
    if PACKED_F32 in p:
        packed = p[PACKED_F32]

        def kernel(x, needed):
            return native.dense_f32(x, packed, n, rows_needed=needed, split=split)

        def xla(x, needed):
            return jnp.matmul(x.astype(jnp.float32), p["kernel"].astype(jnp.float32))

        return jax.lax.platform_dependent(x, needed, cpu=kernel, default=xla)
    if PACKED_INT16 in p:
        packed, scales = p[PACKED_INT16], p[INT16_SCALE]

        def kernel(x, needed):
            return native.dense_int16(x, packed, scales, n, rows_needed=needed, split=split)

        def xla(x, needed):
            return native.dense_int16_reference(x, packed, scales, n)

        return jax.lax.platform_dependent(x, needed, cpu=kernel, default=xla)
    packed = p[PACKED_BF16]

    def kernel(x, needed):
        return native.dense_bf16(x, packed, n, rows_needed=needed, split=split)

    def xla(x, needed):
        return _rounded_bf16_product(x, p)

    return jax.lax.platform_dependent(x, needed, cpu=kernel, default=xla)


def _unpacked_int8(p: Mapping[str, Any]) -> bool:
    """Quantized params in XLA's layout (`quantize_params(packed=False)`): the path without native kernels."""
    return SCALE in p and PACKED[0] not in p


def _native_attention(module: nn.Module, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array | None:
    """A self-attention module whose fused qkv params are packed or float32 (`qkv_attention()`: BERT's), at
    inference: the fused product, then attention as one native kernel (`native.attention`) in CPU programs; None
    otherwise (the module runs as written)."""
    p = module.variables.get("params", {}).get("qkv")
    if not deterministic or p is None or _unpacked_int8(p):
        return None
    heads, reference = module.qkv_attention()
    key_bias = bias.reshape(bias.shape[0], bias.shape[-1])  # [B, 1, 1, L]: one row per batch row
    qkv = _qkv_product(x, p, key_bias)

    def kernel(qkv, key_bias):
        return native.attention(qkv, p["bias"], key_bias, heads)

    def xla(qkv, key_bias):
        return reference(qkv + p["bias"], key_bias)

    out = jax.lax.platform_dependent(qkv, key_bias, cpu=kernel, default=xla)
    return out.astype(module.dtype or jnp.float32)


def _native_activation(module: nn.Module, x: jax.Array) -> jax.Array | None:
    """A module that is one dense layer then an activation (`fused_activation()`: BERT's intermediate layer,
    "gelu") with packed or float32 params: the product, then bias and GELU by one native kernel (`native.gelu`:
    XLA's bits, its expensive branch computed only where selected) in CPU programs where that kernel is the
    faster (`native.gelu_faster_than_xla()`), else by XLA; None otherwise. bf16-packed params there take the
    bias and GELU in the product's epilogue (`native.dense_bf16(..., gelu_bias=)`, the same bits), on the
    product's output while it is in cache."""
    p = module.variables.get("params", {}).get("dense")
    if module.fused_activation() != "gelu" or p is None or _unpacked_int8(p) or "bias" not in p:
        return None

    def xla(y):
        return jax.nn.gelu(y + p["bias"], approximate=False)

    if native.gelu_faster_than_xla() and PACKED_BF16 in p:
        # the product with the bias and GELU in its epilogue: the same bits as the two kernels. (int8's kernel
        # can do the same, `native.int8_dense(gelu_bias=)`, but on AVX-512 VNNI it made one query's encoding
        # slower: scripts/bench_gelu_epilogue.py --products int8.)
        # Its output leaves rounded to bfloat16, as the next product (the MLP's second, also on bfloat16
        # operands) rounds its input anyway: the same bits, half the bytes.
        packed, n = p[PACKED_BF16], p["bias"].shape[-1]
        fused = functools.partial(native.dense_bf16, packed=packed, n=n, gelu_bias=p["bias"], out_dtype=jnp.bfloat16)
        plain = _rounded_bf16_product
        out = jax.lax.platform_dependent(x, cpu=fused, default=lambda x: xla(plain(x, p)).astype(jnp.bfloat16))
        return out if module.dtype in (None, jnp.float32) else out.astype(module.dtype)
    if native.gelu_faster_than_xla() and PACKED_INT16 in p:
        # the product with the bias and GELU in its epilogue, as for bf16 (float32 out: the next product
        # quantizes its input rows itself)
        packed, scales, n = p[PACKED_INT16], p[INT16_SCALE], p["bias"].shape[-1]
        fused = functools.partial(native.dense_int16, packed=packed, scales=scales, n=n, gelu_bias=p["bias"])
        out = jax.lax.platform_dependent(
            x, cpu=fused, default=lambda x: xla(native.dense_int16_reference(x, packed, scales, n))
        )
        return out.astype(module.dtype or jnp.float32)
    y = _product(x, p)

    def kernel(y):
        return native.gelu(y, p["bias"])

    out = jax.lax.platform_dependent(y, cpu=kernel, default=xla) if native.gelu_faster_than_xla() else xla(y)
    return out.astype(module.dtype or jnp.float32)


def int8_dense(next_fun, args, kwargs, context):
    """Flax interceptor: a marked `nn.Dense` (its params hold `kernel_scale`) runs the int8 product; query,
    key and value projections whose parent holds a fused `qkv` kernel run it once for the three."""
    module = context.module
    if context.method_name == "__call__" and hasattr(module, "qkv_attention"):
        out = _native_attention(module, *args, **kwargs)
        return next_fun(*args, **kwargs) if out is None else out
    if context.method_name == "__call__" and hasattr(module, "fused_activation"):
        out = _native_activation(module, *args)
        return next_fun(*args, **kwargs) if out is None else out
    if not isinstance(module, nn.Dense) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    (x,) = args
    if module.name in _QKV and module.parent is not None and "qkv" in module.parent.variables.get("params", {}):
        return _fused_projection(module, x).astype(module.dtype or jnp.float32)
    if not any(module.has_variable("params", key) for key in (SCALE, PACKED_F32, PACKED_BF16, PACKED_INT16)):
        return next_fun(*args, **kwargs)
    p = module.variables["params"]
    y = _product(x, p)
    if module.use_bias:
        y = y + p["bias"]
    return y.astype(module.dtype or jnp.float32)


def quantized_apply(fn, implementation: str = "amx"):
    """Wraps `fn` (which calls `module.apply`) so that marked dense layers run in int8, and attention and GELU
    run as native kernels where the params are packed or float32-fused (`fuse_float_params`).

    implementation: which path of the native kernel runs layers whose params are packed
    (`quantize_params(..., packed=True)`) in CPU programs: "amx" (the tile unit: `native.amx_available()`),
    "vnni" (AVX-512 VNNI dot products: `native.int8_vnni_available()`) or "portable" (plain loops); unpacked
    params run XLA's products."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")

    def wrapped(*args, **kwargs):
        previous = getattr(_trace, "implementation", None)
        _trace.implementation = implementation
        try:
            with nn.intercept_methods(int8_dense):
                return fn(*args, **kwargs)
        finally:
            _trace.implementation = previous

    return wrapped
