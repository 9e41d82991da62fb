"""The int8 query encoder's native self-attention (`colbert_jax.native.attention`, `attention.cc`): BERT's
attention from the fused projections (`bert.attention_from_qkv`) to float32 accuracy, on its vector path (length
and head size multiples of 16; AVX2 builds: multiples of 8, at most 64) and its scalar one, masked keys
included; each batch row's output depends on that row alone; bad shapes are errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from colbert_jax import native
from colbert_jax.modeling.bert import attention_from_qkv

# (B, L, H, D): MiniLM's heads (the vector path), other multiples of 16, multiples of 8 (AVX2's vector path, one
# row at a time past 32), and sizes only the scalar path takes
SHAPES = [(5, 32, 12, 32), (3, 16, 2, 64), (2, 64, 4, 16), (4, 24, 3, 24), (2, 40, 2, 56), (1, 64, 2, 64)]
SHAPES += [(4, 20, 3, 24), (1, 7, 2, 8)]


def _problem(b: int, n: int, h: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    qkv = (2 * rng.standard_normal((b, n, 3 * h * d))).astype(np.float32)
    qkv_bias = rng.standard_normal(3 * h * d).astype(np.float32)
    keep = np.ones((b, n), bool)
    keep[:, n // 2 :] = rng.random((b, n - n // 2)) < 0.5  # padding keys: masked as the encoder masks them
    key_bias = np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)
    return qkv, qkv_bias, key_bias


def _reference(qkv, qkv_bias, key_bias, heads):
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(attention_from_qkv, static_argnums=2)(qkv + qkv_bias, key_bias, heads))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_is_berts(shape):
    b, n, h, d = shape
    qkv, qkv_bias, key_bias = _problem(*shape)
    got = np.asarray(jax.jit(native.attention, static_argnums=3)(qkv, qkv_bias, key_bias, h))
    assert got.shape == (b, n, h * d) and got.dtype == np.float32
    want = _reference(qkv, qkv_bias, key_bias, h)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * np.abs(want).max())
    # a masked key gets no weight: changing its value moves nothing
    masked = np.nonzero(key_bias[0] < 0)[0]
    if len(masked):
        moved = qkv.copy()
        moved[0, masked, 2 * h * d :] += 100.0
        again = np.asarray(jax.jit(native.attention, static_argnums=3)(moved, qkv_bias, key_bias, h))
        np.testing.assert_array_equal(again, got)


@pytest.mark.parametrize("dim", [32, 64])
def test_trailing_blocks_of_masked_keys_are_left_out_bit_for_bit(dim):
    """A short query's [MASK] padding: 32 positions whose last 16 (or more) keys are all masked. The kernel reads
    only the blocks of 16 keys up to the last attended one, and the first 16 rows' output is, bit for bit, the
    kernel's output on those 16 positions alone (masked weights are exactly 0); the masked rows' output is
    still the attention over the attended keys, and every row is BERT's to float32 accuracy."""
    heads = 4
    qkv, qkv_bias, _ = _problem(3, 32, heads, dim, seed=2)
    keep = np.zeros((3, 32), bool)
    keep[0, :7], keep[1, :16], keep[2, :17] = True, True, True  # row 2's second block holds one attended key
    key_bias = np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)
    fn = jax.jit(native.attention, static_argnums=3)
    got = np.asarray(fn(qkv, qkv_bias, key_bias, heads))
    want = _reference(qkv, qkv_bias, key_bias, heads)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * np.abs(want).max())
    short = np.asarray(fn(qkv[:2, :16], qkv_bias, key_bias[:2, :16], heads))
    np.testing.assert_array_equal(got[:2, :16], short)


def test_rows_do_not_depend_on_the_batch():
    qkv, qkv_bias, key_bias = _problem(9, 32, 12, 32, seed=1)
    fn = jax.jit(native.attention, static_argnums=3)
    whole = np.asarray(fn(qkv, qkv_bias, key_bias, 12))
    for lo, hi in ((0, 1), (3, 5), (5, 9)):
        np.testing.assert_array_equal(np.asarray(fn(qkv[lo:hi], qkv_bias, key_bias[lo:hi], 12)), whole[lo:hi])


def test_bad_shapes_are_errors():
    qkv, qkv_bias, key_bias = _problem(2, 16, 2, 16)
    with pytest.raises(ValueError, match="qkv"):
        native.attention(qkv[..., :-1], qkv_bias, key_bias, 2)
    with pytest.raises(ValueError, match="key_bias"):
        native.attention(qkv, qkv_bias, key_bias[:, :8], 2)
    with pytest.raises(ValueError, match="qkv_bias"):
        native.attention(qkv, qkv_bias[:-3], key_bias, 2)
    with pytest.raises(ValueError, match="qkv"):
        native.attention(qkv, qkv_bias, key_bias, 5)
