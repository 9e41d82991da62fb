"""The exact GELU after the int8 encoder's intermediate layer (`colbert_jax.native.gelu`, `gelu.cc`): XLA:CPU's
bits for `jax.nn.gelu(y + bias, approximate=False)`, everywhere (each erfc branch, the exp's clamps, infinities,
signed zeros and denormals), on its vector path and its scalar reference, whatever the row width (a partial last
vector) and leading axes."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from colbert_jax import native


def _xla(y, bias):
    return np.asarray(jax.jit(lambda y, b: jax.nn.gelu(y + b, approximate=False))(y, bias))


@pytest.mark.parametrize("implementation", native.GELU_IMPLEMENTATIONS)
@pytest.mark.parametrize("width", [1536, 37, 16, 5])
def test_gelu_has_xlas_bits(width, implementation):
    rng = np.random.default_rng(width)
    values = [rng.standard_normal(60_000).astype(np.float32) * s for s in (0.5, 1.5, 3.0, 8.0)]
    edges = [0.0, -0.0, np.inf, -np.inf, 1.0, -1.0, 1.4142135, -1.4142135, 2.828427, -2.828427, 13.3, -13.3]
    edges += [1e-40, -1e-40, 3e38, -3e38, 13.0, -13.0, 12.0, -12.0]
    flat = np.concatenate([*values, np.linspace(-20, 20, 40_001, dtype=np.float32), np.float32(edges)])
    y = flat[: len(flat) // width * width].reshape(-1, width)
    bias = (rng.standard_normal(width) * (width > 16)).astype(np.float32)
    got = np.asarray(jax.jit(functools.partial(native.gelu, implementation=implementation))(y, bias))
    want = _xla(y, bias)
    assert got.shape == want.shape == y.shape
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))


def test_leading_axes_and_bad_shapes():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((3, 4, 48)).astype(np.float32)
    bias = rng.standard_normal(48).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(native.gelu)(y, bias)), _xla(y, bias))
    with pytest.raises(ValueError, match="bias"):
        native.gelu(y, bias[:-1])
    with pytest.raises(ValueError, match="implementation"):
        native.gelu(y, bias, implementation="fast")
