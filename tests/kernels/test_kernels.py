"""Every Pallas kernel equals its plain-jnp reference on random inputs of awkward sizes.

CI runs the kernels in interpret mode (CPU). The `gpu`-marked class compiles them for the device
(`pytest -m gpu` on a machine with a GPU).
"""

import numpy as np
import pytest

from pallas_kernels.centroid_interaction import centroid_interaction, centroid_interaction_reference
from pallas_kernels.decompress import decompress, decompress_reference
from pallas_kernels.maxsim import maxsim, maxsim_reference


def _codec_inputs(rng, n, nbits, dim=128):
    rows = rng.normal(size=(n, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    residuals = rng.integers(0, 256, (n, dim * nbits // 8)).astype(np.uint8)
    weights = np.sort(rng.normal(scale=0.05, size=1 << nbits)).astype(np.float32)
    return rows, residuals, weights


class TestKernelsInterpret:
    INTERPRET = True

    @pytest.mark.parametrize("nbits", [1, 2, 4, 8])
    @pytest.mark.parametrize("n", [1, 37, 130])
    def test_decompress(self, nbits, n):
        rng = np.random.default_rng(n * 10 + nbits)
        rows, residuals, weights = _codec_inputs(rng, n, nbits)
        got = np.asarray(decompress(rows, residuals, weights, nbits=nbits, interpret=self.INTERPRET))
        want = np.asarray(decompress_reference(rows, residuals, weights, nbits=nbits))
        assert got.shape == (n, 128)
        np.testing.assert_allclose(got, want, atol=1e-6)

    @pytest.mark.parametrize("nbits", [1, 2, 4])
    @pytest.mark.parametrize("clamp", [False, True])
    def test_maxsim(self, nbits, clamp):
        rng = np.random.default_rng(nbits + 7 * clamp)
        n, L, lq = 5, 24, 32
        rows, residuals, weights = _codec_inputs(rng, n * L, nbits)
        Q = rng.normal(size=(lq, 128)).astype(np.float32)
        lengths = np.array([1, 24, 7, 0, 13], np.int32)  # includes an empty document
        args = (Q, rows.reshape(n, L, 128), residuals.reshape(n, L, -1), weights, lengths)
        got = np.asarray(maxsim(*args, nbits=nbits, clamp=clamp, interpret=self.INTERPRET))
        want = np.asarray(maxsim_reference(*args, nbits=nbits, clamp=clamp))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert got[3] == pytest.approx(0.0 if clamp else -9999.0 * lq)

    @pytest.mark.parametrize("P,L,n", [(65, 13, 7), (1024, 1, 3), (300, 50, 2)])
    def test_centroid_interaction(self, P, L, n):
        rng = np.random.default_rng(P + L)
        S = rng.normal(size=(P + 1, 32)).astype(np.float32)
        S[-1] = -9999.0  # the padding sentinel row
        codes = rng.integers(0, P + 1, (n, L)).astype(np.int32)
        got = np.asarray(centroid_interaction(S, codes, interpret=self.INTERPRET))
        np.testing.assert_allclose(got, np.asarray(centroid_interaction_reference(S, codes)), rtol=1e-6, atol=1e-4)


@pytest.mark.gpu
class TestKernelsCompiled(TestKernelsInterpret):
    INTERPRET = False
