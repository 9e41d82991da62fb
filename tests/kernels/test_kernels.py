"""Every kernel equals its `jnp` twin on random inputs of awkward sizes, through the one public API.

CI runs the Pallas path in interpret mode (CPU). The `gpu`-marked class runs the same cases compiled by
Triton (`JAX_PLATFORMS=cuda pytest -m gpu` on a GPU machine; `scripts/device_check.sh` does), where the
kernels' float32 matmuls must still agree with the twins to 1e-5.
"""

import logging

import jax
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import dispatch


def _codec_inputs(rng, shape, nbits, dim):
    rows = rng.normal(size=(*shape, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
    residuals = rng.integers(0, 256, (*shape, dim * nbits // 8)).astype(np.uint8)
    weights = np.sort(rng.normal(scale=0.05, size=1 << nbits)).astype(np.float32)
    return rows, residuals, weights


class TestKernelsInterpret:
    def check_platform(self):
        assert jax.default_backend() == "cpu"

    @pytest.mark.parametrize("nbits", [1, 2, 4, 8])
    @pytest.mark.parametrize("n,dim", [(1, 128), (37, 48), (130, 96), (64, 64)])
    def test_decompress(self, nbits, n, dim):
        self.check_platform()
        if dim % (8 * nbits):
            dim = 8 * nbits * (dim // (8 * nbits) + 1)
        rng = np.random.default_rng(n * 10 + nbits)
        args = _codec_inputs(rng, (n,), nbits, dim)
        got = np.asarray(pallas_kernels.decompress(*args, nbits=nbits, implementation="pallas"))
        want = np.asarray(pallas_kernels.decompress_reference(*args, nbits=nbits))
        assert got.shape == (n, dim)
        np.testing.assert_allclose(got, want, atol=1e-6)

    @pytest.mark.parametrize("nbits", [1, 2, 4])
    @pytest.mark.parametrize("clamp", [False, True])
    @pytest.mark.parametrize("n,L,lq,dim", [(5, 24, 32, 128), (3, 180, 24, 96), (9, 1, 64, 48), (70, 13, 32, 64)])
    def test_maxsim(self, nbits, clamp, n, L, lq, dim):
        self.check_platform()
        rng = np.random.default_rng(nbits + 7 * clamp + n)
        rows, residuals, weights = _codec_inputs(rng, (n, L), nbits, dim)
        Q = rng.normal(size=(lq, dim)).astype(np.float32)
        lengths = rng.integers(1, L + 1, n).astype(np.int32)
        lengths[0], lengths[-1] = L, 0  # a full and an empty document
        args = (Q, rows, residuals, weights, lengths)
        got = np.asarray(pallas_kernels.maxsim(*args, nbits=nbits, clamp=clamp, implementation="pallas"))
        want = np.asarray(pallas_kernels.maxsim_reference(*args, nbits=nbits, clamp=clamp))
        assert got.shape == (n,)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert got[-1] == pytest.approx(0.0 if clamp else -9999.0 * lq)

    def test_maxsim_lengths_past_rows(self):
        """A length larger than the rows given counts every row, as the reference does (no padding rows)."""
        self.check_platform()
        rng = np.random.default_rng(3)
        rows, residuals, weights = _codec_inputs(rng, (4, 20), 2, 64)
        Q = rng.normal(size=(32, 64)).astype(np.float32)
        args = (Q, rows, residuals, weights, np.array([20, 25, 99, 3], np.int32))
        got = pallas_kernels.maxsim(*args, nbits=2, implementation="pallas")
        np.testing.assert_allclose(got, pallas_kernels.maxsim_reference(*args, nbits=2), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("P,L,n,lq", [(65, 13, 7, 32), (1024, 1, 3, 24), (300, 50, 70, 64)])
    def test_centroid_interaction(self, P, L, n, lq):
        self.check_platform()
        rng = np.random.default_rng(P + L)
        S = rng.normal(size=(P + 1, lq)).astype(np.float32)
        S[-1] = -9999.0  # the padding sentinel row
        codes = rng.integers(0, P + 1, (n, L)).astype(np.int32)
        got = np.asarray(pallas_kernels.centroid_interaction(S, codes, implementation="pallas"))
        want = np.asarray(pallas_kernels.centroid_interaction_reference(S, codes))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.gpu
class TestKernelsCompiled(TestKernelsInterpret):
    """The same cases compiled for the GPU (Triton), not interpreted."""

    def check_platform(self):
        assert jax.default_backend() == "gpu", "the gpu tests need a GPU"


def _maxsim_args(rng):
    rows, residuals, weights = _codec_inputs(rng, (3, 16), 2, 64)
    return rng.normal(size=(32, 64)).astype(np.float32), rows, residuals, weights, np.array([16, 5, 0], np.int32)


class TestSelection:
    """`implementation="auto"` falls back to the twin only when the kernel fails to compile, logs it once,
    and never falls back when strict or when "pallas" is asked for."""

    @pytest.fixture
    def failing_gpu(self, monkeypatch):
        monkeypatch.setattr(dispatch, "_backend", lambda: "gpu")
        monkeypatch.setattr(dispatch, "_warned", set())
        calls = []

        def compile_error(pallas_fn, structs, statics):
            calls.append(structs)
            return RuntimeError("Triton lowering failed: shape (180, 128) is not a power of 2")

        monkeypatch.setattr(dispatch, "_compile_error", compile_error)
        return calls

    def test_auto_on_cpu_is_jnp(self):
        assert dispatch.resolve("maxsim", "auto", None, (), {}) == "jnp"

    def test_fallback_logged_once_with_the_error(self, failing_gpu, caplog, monkeypatch):
        monkeypatch.delenv(dispatch.STRICT_ENV, raising=False)
        rng = np.random.default_rng(0)
        args = _maxsim_args(rng)
        with caplog.at_level(logging.WARNING, logger="pallas_kernels"):
            for n_q in (32, 24):  # two shapes: two compile attempts, one log line
                Q = args[0][:n_q]
                got = pallas_kernels.maxsim.__wrapped__(Q, *args[1:], nbits=2, implementation="auto")
                np.testing.assert_allclose(got, pallas_kernels.maxsim_reference(Q, *args[1:], nbits=2))
        assert len(failing_gpu) == 2
        messages = [r.getMessage() for r in caplog.records if r.name == "pallas_kernels"]
        assert len(messages) == 1
        assert "pallas_kernels.maxsim" in messages[0] and "not a power of 2" in messages[0]

    def test_strict_env_raises(self, failing_gpu, monkeypatch):
        monkeypatch.setenv(dispatch.STRICT_ENV, "1")
        assert dispatch.resolve("maxsim", "auto", None, (), {}) == "pallas"
        assert failing_gpu == []  # no compile probe, so no fallback: the kernel's own error will propagate

    def test_explicit_pallas_never_falls_back(self, failing_gpu):
        assert dispatch.resolve("decompress", "pallas", None, (), {}) == "pallas"
        assert failing_gpu == []

    def test_real_compile_error_is_caught(self, monkeypatch):
        """The probe really compiles: a kernel that raises while lowering is reported, not hidden."""
        monkeypatch.setattr(dispatch, "_backend", lambda: "gpu")
        monkeypatch.setattr(dispatch, "_warned", set())
        monkeypatch.delenv(dispatch.STRICT_ENV, raising=False)

        def broken(x):
            raise NotImplementedError("no lowering for this block")

        x = (np.zeros((4,), np.float32),)
        assert dispatch.resolve("broken", "auto", broken, x, {}) == "jnp"
        assert dispatch.resolve("fine", "auto", lambda x: x * 2, x, {}) == "pallas"

    def test_bad_implementation(self):
        args = _codec_inputs(np.random.default_rng(0), (2,), 2, 64)
        with pytest.raises(ValueError, match="implementation"):
            pallas_kernels.decompress(*args, nbits=2, implementation="x")

    def test_block_sizes_are_powers_of_two(self):
        for platform, blocks in pallas_kernels.BLOCK_SIZES.items():
            for name in ("decompress_rows", "maxsim_docs", "maxsim_rows", "interaction_docs"):
                value = getattr(blocks, name)
                assert value >= 1 and value & (value - 1) == 0, (platform, name, value)
            assert blocks.maxsim_rows >= dispatch.MIN_DOT and blocks.decompress_rows >= dispatch.MIN_DOT
