"""int8 inference for the encoder's dense layers: int8 weights, dynamically quantized int8 activations.

Each backbone `nn.Dense` kernel [.., in, out] becomes int8 with one float32 scale per output channel
(symmetric, max-abs / 127; stacked layers keep their leading axis). At run time each input row (one token's
features) is quantized with its own max-abs scale in two int8 terms, the value and its rounding error,
x ~ s1 * x1 + s2 * x2; both go through one int8 product with int32 accumulation (the two terms stacked as
rows) and are rescaled: y = (s1 * (x1 . W_q) + s2 * (x2 . W_q)) * s_w + b. One term alone loses too much to
BERT's outlier features (a few channels of the LayerNorm outputs are ten times the rest); with two, the
error is the weights' alone. Kernels that reduce their input (in > out: the MLP's down-projection, a third
of the FLOPs) stay float32: measured on MiniLM, they carry most of the weights' error. XLA:CPU runs int8
products several times faster than float32 ones (`scripts/bench_encoder.py` measures the encoder).

The module code is untouched: `quantize_params` rewrites the parameter tree (a `kernel_scale` next to each
quantized kernel marks it) and `int8_dense` is a Flax method interceptor that computes the quantized product
for a marked `nn.Dense` and leaves every other module call alone. The projection head stays float32 (it is
small and sets the final embedding directly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["QUANTIZATIONS", "quantize_params", "int8_dense", "quantized_apply"]

QUANTIZATIONS = ("none", "int8")
SCALE = "kernel_scale"
_HEADS = ("linear",)  # top-level head modules kept in float32 (PyLate heads are `dense_N`: also kept)


def _quantize_kernel(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: kernel [..., in, out] -> (int8 same shape, float32 [..., out])."""
    kernel = np.asarray(kernel, np.float32)
    scale = np.abs(kernel).max(axis=-2) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(kernel / scale[..., None, :]), -127, 127).astype(np.int8)
    return q, scale


def _quantized(shape: tuple[int, ...]) -> bool:
    """Whether a kernel of this shape [..., in, out] runs in int8: not when it reduces its input."""
    return shape[-2] <= shape[-1]


def quantize_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder's params with the backbone's dense kernels as int8 plus their `kernel_scale`.

    Only the backbone (the top-level entry that is not a projection head) is quantized, and of it only the
    kernels that do not reduce their input (in <= out); embeddings and LayerNorms stay as they are.
    """

    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {k: walk(v) for k, v in tree.items()}
        kernel = tree.get("kernel")
        if kernel is not None and getattr(kernel, "ndim", 0) >= 2 and _quantized(kernel.shape):
            out["kernel"], out[SCALE] = _quantize_kernel(np.asarray(jax.device_get(kernel)))
        return out

    return {k: (v if k in _HEADS or k.startswith("dense_") else walk(v)) for k, v in params.items()}


def _quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row symmetric int8: x [..., n] -> (int8 [..., n], float32 scale [..., 1])."""
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _int8_matmul(x: jax.Array, kernel_q: jax.Array, scale: jax.Array) -> jax.Array:
    """x float [..., in] times int8 kernel [in, out] with per-channel `scale` [out] -> float32 [..., out]."""
    x = x.astype(jnp.float32)
    x1, s1 = _quantize_rows(x)
    x2, s2 = _quantize_rows(x - x1.astype(jnp.float32) * s1)
    both = jnp.concatenate([x1, x2], axis=0)  # one product for both terms
    acc = jax.lax.dot_general(both, kernel_q, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    acc = acc.astype(jnp.float32)
    n = x.shape[0]
    return (acc[:n] * s1 + acc[n:] * s2) * scale


def int8_dense(next_fun, args, kwargs, context):
    """Flax interceptor: a marked `nn.Dense` (its params hold `kernel_scale`) runs the int8 product."""
    module = context.module
    marked = isinstance(module, nn.Dense) and module.has_variable("params", SCALE)
    if not marked or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    (x,) = args
    y = _int8_matmul(x, module.get_variable("params", "kernel"), module.get_variable("params", SCALE))
    if module.use_bias:
        y = y + module.get_variable("params", "bias")
    return y.astype(module.dtype or jnp.float32)


def quantized_apply(fn):
    """Wraps `fn` (which calls `module.apply`) so that marked dense layers run in int8."""

    def wrapped(*args, **kwargs):
        with nn.intercept_methods(int8_dense):
            return fn(*args, **kwargs)

    return wrapped
