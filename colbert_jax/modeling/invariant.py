"""Batch-invariant int8 and bf16 query encoding on XLA:CPU: the float ops between rounded products see large-batch
shapes.

XLA:CPU compiles an op differently when its batch is small: a size-1 batch dimension changes the layout of
attention's einsums (and so their kernel), and small arrays take other reduction and fusion code paths, so a
query's float32 LayerNorm, softmax, attention products, projection head or final L2 norm can round differently
at batch size 1, 2 or 4 than inside a batch of 16 or more. The int8 dense products are exact integer
arithmetic, but each one rounds its input rows to int8 steps (`quantize._split_rows`), which turns those
last-bit differences into whole-step flips (1e-4 in the embeddings, where float32 shows 1e-7). The bf16 encoder
(`query_quantization="bf16"`) rounds each product's input rows to bfloat16, with the same effect.

`padded(fn, *xs)` runs `fn` on its inputs padded with zero rows along the batch axis, within each device's
block of rows, up to a floor of rows and of `MIN_ELEMENTS` elements of the first input, and slices the result
back: XLA then compiles the shapes it compiles for a large batch, whose rows do not depend on the batch
size. It pads only while `batch_invariant(...)` is tracing (the int8 and bf16 query encoders); elsewhere it is a plain
call, and batches at or above the floor are not padded. The backbones call it around those float ops (BERT,
RoBERTa, XLM-RoBERTa and ELECTRA, which share `bert._Encoder`; ModernBERT's int8 encoder is not
batch-invariant yet), and attention runs with batch and heads merged into one einsum axis there, which no
batch size makes 1. The rest of the invariance is in `quantize._int8_matmul`'s epilogue, which avoids
products that XLA may or may not contract into FMAs depending on its fusion decisions.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["MIN_ELEMENTS", "active", "batch_invariant", "padded"]

MIN_ELEMENTS = 1 << 13  # per shard, of the first input: the tiny test models (hidden 32, 16 tokens) pad to 16
# rows, MiniLM's LayerNorm (32 x 384 per query) is never padded

_state = threading.local()  # trace-time only: the number of batch shards while batch_invariant is active


@contextlib.contextmanager
def _floor(shards: int):
    previous = getattr(_state, "shards", None)
    _state.shards = shards
    try:
        yield
    finally:
        _state.shards = previous


def batch_invariant(fn: Callable, shards: int = 1) -> Callable:
    """Wraps `fn` (which calls `module.apply` on batches split into `shards` equal row blocks, one per
    device) so that the modules' `padded` ops run at the padded shapes while it is traced."""

    def wrapped(*args, **kwargs):
        with _floor(shards):
            return fn(*args, **kwargs)

    return wrapped


def active() -> bool:
    """Whether `batch_invariant` is tracing (the int8 and bf16 query encoders)."""
    return getattr(_state, "shards", None) is not None


def _rows_needed(x: jax.Array, min_rows: int) -> int:
    per_row = max(1, x.size // max(1, x.shape[0]))
    rows = min_rows
    while rows * per_row < MIN_ELEMENTS:
        rows *= 2
    return rows


def padded(fn: Callable[..., jax.Array], *xs: jax.Array, min_rows: int = 1) -> jax.Array:
    """`fn(*xs)`, with every x padded along axis 0 (per shard) while `batch_invariant` is active.

    All xs share their batch axis; `fn` maps rows to rows (its output keeps axis 0 as the batch). Each shard is
    padded to at least `min_rows` rows (2 where one query's rows take another kernel than two queries': the
    float32 projection head's dot) and to `MIN_ELEMENTS` elements of the first x.
    """
    shards = getattr(_state, "shards", None)
    if shards is None:
        return fn(*xs)
    batch = xs[0].shape[0]
    if batch % shards:
        raise ValueError(f"a batch of {batch} rows does not split into {shards} equal shards")
    rows = batch // shards
    floor = _rows_needed(xs[0], min_rows)
    if rows >= floor:
        return fn(*xs)

    def pad(x):
        # [batch, ...] -> [shards, rows, ...] -> zero rows appended in each shard -> [shards * floor, ...]:
        # each device pads its own block, so nothing moves between devices
        x = x.reshape(shards, rows, *x.shape[1:])
        x = jnp.pad(x, [(0, 0), (0, floor - rows)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(shards * floor, *x.shape[2:])

    out = fn(*(pad(x) for x in xs))
    out = out.reshape(shards, floor, *out.shape[1:])[:, :rows]
    return out.reshape(batch, *out.shape[2:])
