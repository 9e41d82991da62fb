"""Residual compression (PLAID): embeddings <-> (centroid code, packed residual bucket indices).

Mirrors colbert-ai 0.2.22 `colbert/indexing/codecs/residual.py` (CPU path) bit for bit:
- code = argmax_c (C . e), with e the float16-rounded embedding and C the float16-stored centroids,
  both computed in float32 (ties: lowest index);
- residual r = e - C[code]; bucket b_d = number of cutoffs strictly below r_d (torch.bucketize);
- bits: b_d's nbits bits, least significant first, dimension by dimension, packed 8 to a byte with the
  first bit in the most significant position (numpy.packbits order);
- decompression: v = C[code] + bucket_weights[b], then L2-normalised.
Cutoffs and weights are quantiles of the held-out residuals, computed like torch.quantile in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels.decompress import byte_table, unpack_bits

__all__ = ["ResidualCodec", "residual_buckets", "compress", "decompress", "pack_bits", "unpack_bits", "torch_quantile"]

COMPRESS_BATCH = 1 << 13
COMPRESS_BLOCK = 1 << 11  # rows per compress call, fixed


def pack_bits(buckets: jax.Array, nbits: int) -> jax.Array:
    """Bucket indices uint8 [n, dim] -> packed uint8 [n, dim * nbits / 8]."""
    n, dim = buckets.shape
    bits = (buckets[..., None] >> jnp.arange(nbits, dtype=jnp.uint8)) & 1  # [n, dim, nbits], LSB first
    bits = bits.reshape(n, dim * nbits // 8, 8).astype(jnp.uint8)
    weights = jnp.array([128, 64, 32, 16, 8, 4, 2, 1], jnp.uint8)  # first bit -> most significant
    return (bits * weights).sum(-1, dtype=jnp.uint8)


def assign_codes(embs: jax.Array, centroids: jax.Array) -> jax.Array:
    """Nearest centroid by inner product: float32 [n, dim] x [P, dim] -> int32 [n]."""
    scores = jnp.dot(embs, centroids.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.argmax(scores, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="nbits")
def compress(embs: jax.Array, centroids: jax.Array, cutoffs: jax.Array, *, nbits: int):
    """float32 [n, dim] -> (codes int32 [n], residuals uint8 [n, dim * nbits / 8])."""
    codes = assign_codes(embs, centroids)
    residual = embs - centroids[codes]
    buckets = (residual[..., None] > cutoffs).sum(-1, dtype=jnp.uint8)
    return codes, pack_bits(buckets, nbits)


@functools.partial(jax.jit, static_argnames=("nbits", "implementation"))
def decompress(
    codes: jax.Array,
    residuals: jax.Array,
    centroids: jax.Array,
    weights: jax.Array,
    *,
    nbits: int,
    implementation: str = "auto",
):
    """(codes int32 [n], residuals uint8 [n, dim*nbits/8]) -> float32 [n, dim], L2-normalised.
    `implementation`: the kernel's ("auto": Pallas on GPU, else jnp; see `pallas_kernels.dispatch`)."""
    return pallas_kernels.decompress(centroids[codes], residuals, weights, nbits=nbits, implementation=implementation)


@functools.partial(jax.jit, static_argnames=("nbits",))
def _norms(codes, residuals, centroids, weights, *, nbits: int):
    n, dim = codes.shape[0], centroids.shape[1]
    v = centroids[codes] + byte_table(weights, nbits)[residuals].reshape(n, dim)
    return jnp.linalg.norm(v, axis=-1)


def torch_quantile(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """`torch.quantile(x, q)` (linear interpolation) over a flattened float32 array, in float32 arithmetic."""
    v = np.sort(np.asarray(x, np.float32).ravel())
    rank = np.asarray(q, np.float32) * np.float32(v.size - 1)
    lo = np.floor(rank).astype(np.int64)
    hi = np.ceil(rank).astype(np.int64)
    w = (rank - lo.astype(np.float32)).astype(np.float32)
    a, b = v[lo], v[hi]
    diff = (b - a).astype(np.float32)
    # torch.lerp: a + w * (b - a) for w < 0.5, else b - (b - a) * (1 - w)
    low = (a + w * diff).astype(np.float32)
    high = (b - diff * (np.float32(1) - w)).astype(np.float32)
    return np.where(w < 0.5, low, high).astype(np.float32)


def residual_buckets(residuals: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket cutoffs [K-1] at quantiles i/K and weights [K] at (i + 0.5)/K of the flattened residuals."""
    k = 1 << nbits
    quantiles = np.arange(k, dtype=np.float32) * np.float32(1.0 / k)
    return torch_quantile(residuals, quantiles[1:]), torch_quantile(residuals, quantiles + np.float32(0.5 / k))


@dataclasses.dataclass(frozen=True, eq=False)
class ResidualCodec:
    """Centroids and residual buckets of an index; `compress` / `decompress` embeddings.

    centroids hold the float32 values of the float16 centroids stored in the index (as colbert-ai
    computes after reloading its codec); cutoffs and weights are float32.
    """

    centroids: np.ndarray  # float32 [P, dim]
    bucket_cutoffs: np.ndarray  # float32 [2**nbits - 1]
    bucket_weights: np.ndarray  # float32 [2**nbits]
    nbits: int
    avg_residual: float = 0.0

    def __post_init__(self):
        k = 1 << self.nbits
        if self.bucket_cutoffs.shape != (k - 1,) or self.bucket_weights.shape != (k,):
            raise ValueError(
                f"nbits={self.nbits} needs {k - 1} cutoffs and {k} weights, got "
                f"{self.bucket_cutoffs.shape} and {self.bucket_weights.shape}"
            )
        if self.dim % (8 * self.nbits):
            raise ValueError(f"dim={self.dim} must be a multiple of 8*nbits={8 * self.nbits}")

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def num_partitions(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def packed_dim(self) -> int:
        return self.dim * self.nbits // 8

    @functools.cached_property
    def _device(self):
        return (
            jnp.asarray(self.centroids, jnp.float32),
            jnp.asarray(self.bucket_cutoffs, jnp.float32),
            jnp.asarray(self.bucket_weights, jnp.float32),
        )

    @classmethod
    def train(cls, centroids: np.ndarray, heldout: np.ndarray, nbits: int) -> ResidualCodec:
        """Builds a codec from normalised float32 centroids and held-out embeddings.

        As in colbert-ai, the residual statistics use the float32 centroids; the codec keeps their
        float16 rounding, which is what the index stores and compresses with.
        """
        centroids = np.asarray(centroids, np.float32)
        heldout = np.asarray(heldout, np.float32)
        codes = (
            np.concatenate(
                [
                    np.asarray(assign_codes(jnp.asarray(b), jnp.asarray(centroids)))
                    for b in _batches(heldout, COMPRESS_BATCH)
                ]
            )
            if len(heldout)
            else np.zeros(0, int)
        )
        residuals = heldout - centroids[codes]
        cutoffs, weights = residual_buckets(residuals, nbits)
        avg_residual = float(np.abs(residuals).mean(axis=0).mean()) if len(heldout) else 0.0
        stored = centroids.astype(np.float16).astype(np.float32)
        return cls(stored, cutoffs, weights, nbits, avg_residual)

    def compress(self, embs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float [n, dim] -> (codes int32 [n], residuals uint8 [n, dim*nbits/8]).

        Embeddings are rounded to float16 first, as colbert-ai stores them before compressing.
        """
        embs = np.asarray(embs)
        if embs.ndim != 2 or embs.shape[1] != self.dim:
            raise ValueError(f"embeddings must be [n, {self.dim}], got {embs.shape}")
        embs = embs.astype(np.float16).astype(np.float32)
        c, cut, _ = self._device
        codes, residuals = [], []
        # One block shape for every call: an embedding's code and residual then do not depend on how many
        # others are compressed with it (an index grown by Indexer.add equals a rebuild bit for bit).
        for batch in _batches(embs, COMPRESS_BLOCK):
            k, r = compress(_pad_to(batch, COMPRESS_BLOCK), c, cut, nbits=self.nbits)
            codes.append(np.asarray(k)[: len(batch)])
            residuals.append(np.asarray(r)[: len(batch)])
        if not codes:
            return np.zeros(0, np.int32), np.zeros((0, self.packed_dim), np.uint8)
        return np.concatenate(codes), np.concatenate(residuals)

    def norms(self, codes: np.ndarray, residuals: np.ndarray) -> np.ndarray:
        """||centroid + residual|| of each embedding before normalisation, float32 [n]."""
        c, _, w = self._device
        out = []
        for start in range(0, len(codes), COMPRESS_BATCH):
            k, r = codes[start : start + COMPRESS_BATCH], residuals[start : start + COMPRESS_BATCH]
            size = COMPRESS_BATCH if len(codes) > COMPRESS_BATCH else _pow2(len(k))
            out.append(np.asarray(_norms(_pad_to(k, size), _pad_to(r, size), c, w, nbits=self.nbits))[: len(k)])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def decompress(self, codes: np.ndarray, residuals: np.ndarray) -> np.ndarray:
        """(codes int32 [n], residuals uint8 [n, dim*nbits/8]) -> float32 [n, dim], L2-normalised."""
        codes, residuals = np.asarray(codes), np.asarray(residuals)
        if codes.ndim != 1 or residuals.shape != (len(codes), self.packed_dim):
            raise ValueError(
                f"expected codes [n] and residuals [n, {self.packed_dim}], got {codes.shape} and {residuals.shape}"
            )
        if len(codes) and (codes.min() < 0 or codes.max() >= self.num_partitions):
            raise ValueError(f"codes must be in [0, {self.num_partitions})")
        c, _, w = self._device
        out = []
        for start in range(0, len(codes), COMPRESS_BATCH):
            k, r = codes[start : start + COMPRESS_BATCH], residuals[start : start + COMPRESS_BATCH]
            size = COMPRESS_BATCH if len(codes) > COMPRESS_BATCH else _pow2(len(k))
            v = decompress(_pad_to(k, size), _pad_to(r, size), c, w, nbits=self.nbits)
            out.append(np.asarray(v)[: len(k)])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _batches(x: np.ndarray, size: int):
    for start in range(0, len(x), size):
        yield x[start : start + size]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pad_to(x: np.ndarray, rows: int) -> np.ndarray:
    if len(x) == rows:
        return x
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)])
