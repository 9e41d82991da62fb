"""The int8 encoder's native residual + LayerNorm (`colbert_jax.native.add_layer_norm`, `layer_norm.cc`): Flax's
LayerNorm (two-pass variance, as BERT's modules configure it) of (h + h_bias) + residual, to float32 accuracy,
for row widths on and off its 16-lane path; each row depends on itself alone; bad shapes are errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from colbert_jax import native


def _problem(rows: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((rows, n)).astype(np.float32)
    residual = (3 * rng.standard_normal((rows, n)) + 2).astype(np.float32)  # an offset: the mean matters
    h_bias, scale, bias = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    return h, h_bias, residual, scale, bias


@pytest.mark.parametrize("n", [384, 37, 16, 3])
def test_add_layer_norm_is_flax_layer_norm(n):
    h, h_bias, residual, scale, bias = _problem(70, n)
    norm = nn.LayerNorm(epsilon=1e-12, use_fast_variance=False)
    want = np.asarray(
        jax.jit(lambda h, r: norm.apply({"params": {"scale": scale, "bias": bias}}, (h + h_bias) + r))(h, residual)
    )
    kernel = jax.jit(native.add_layer_norm, static_argnums=5)
    got = np.asarray(kernel(h, h_bias, residual, scale, bias, 1e-12))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    # a row alone, and the rows under leading axes, give the same bits
    np.testing.assert_array_equal(np.asarray(kernel(h[5:6], h_bias, residual[5:6], scale, bias, 1e-12)), got[5:6])
    stacked = kernel(h.reshape(7, 10, n), h_bias, residual.reshape(7, 10, n), scale, bias, 1e-12)
    np.testing.assert_array_equal(np.asarray(stacked).reshape(70, n), got)


def test_bad_shapes_are_errors():
    h, h_bias, residual, scale, bias = _problem(4, 16)
    with pytest.raises(ValueError, match="add_layer_norm"):
        native.add_layer_norm(h, h_bias, residual[:, :8], scale, bias, 1e-12)
    with pytest.raises(ValueError, match="add_layer_norm"):
        native.add_layer_norm(h, h_bias[:8], residual, scale, bias, 1e-12)
