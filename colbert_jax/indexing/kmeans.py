"""Choosing and training the centroids, by colbert-ai 0.2.22's formulas (`collection_indexer.py`).

- sample `min(1 + int(16 * sqrt(120 * N)), N)` passages with Python's `random.sample(range(N), n)`
  seeded 12345 (the reference's launcher seed: the same pids are drawn);
- `num_partitions = 2 ** floor(log2(16 * sqrt(estimated embeddings)))`;
- k-means with faiss (GPU when faiss has GPUs), seed 123, on all but a held-out 5% (at most 50,000) of the
  shuffled sample embeddings; centroids are then L2-normalised.

faiss runs when it imports, else a JAX Lloyd's k-means on JAX's default backend (for images without faiss,
e.g. CUDA 13); `COLBERT_JAX_KMEANS=faiss|jax|auto` forces one. On CPU the JAX k-means is the same bits run to
run; on GPU its sums are scatter-adds, which XLA runs with atomics (the order of additions varies) unless
`XLA_FLAGS=--xla_gpu_deterministic_ops=true`.
"""

from __future__ import annotations

import logging
import math
import os
import random
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["sample_size", "sample_passages", "num_partitions", "split_heldout", "train_centroids"]

SAMPLE_SEED = 12345
KMEANS_SEED = 123
KMEANS_ENV = "COLBERT_JAX_KMEANS"
IMPLEMENTATIONS = ("faiss", "jax", "auto")
MAX_POINTS_PER_CENTROID = 256  # faiss.Kmeans' default subsampling

_log = logging.getLogger(__name__)
_fallback_logged = False


def sample_size(num_passages: int) -> int:
    return min(1 + int(16 * math.sqrt(120 * num_passages)), num_passages)


def sample_passages(num_passages: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """Positions of the passages encoded for k-means, sorted."""
    picked = random.Random(seed).sample(range(num_passages), sample_size(num_passages))
    return np.sort(np.asarray(picked, np.int64))


def num_partitions(num_embeddings_est: float, num_train: int | None = None) -> int:
    """2^floor(log2(16 sqrt(n))); capped at the largest power of two <= the training points (faiss needs
    at least as many points as centroids, which only tiny collections run into)."""
    p = int(2 ** math.floor(math.log2(16 * math.sqrt(max(num_embeddings_est, 1.0)))))
    if num_train is not None:
        p = min(p, 1 << max(0, int(math.floor(math.log2(max(num_train, 1))))))
    return max(p, 1)


def split_heldout(sample: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffles the sample and splits off int(min(5%, 50,000)) held-out rows: (train, heldout)."""
    perm = np.random.default_rng(seed).permutation(len(sample))
    heldout_size = int(min(0.05 * len(sample), 50_000))
    shuffled = sample[perm]
    return shuffled[: len(sample) - heldout_size], shuffled[len(sample) - heldout_size :]


def train_centroids(
    train: np.ndarray,
    k: int,
    niters: int,
    *,
    seed: int = KMEANS_SEED,
    verbose: bool = False,
    implementation: str = "auto",
) -> np.ndarray:
    """k-means -> L2-normalised float32 centroids [k, dim]. `implementation`: "faiss", "jax" or "auto" (the
    COLBERT_JAX_KMEANS variable if set, else faiss when it imports, else JAX)."""
    train = np.ascontiguousarray(train, dtype=np.float32)
    if len(train) < k:
        raise ValueError(f"k-means needs at least {k} training embeddings, got {len(train)}")
    if _resolve(implementation) == "jax":
        c = _kmeans_jax(train, k, niters, seed)
    else:
        c = _kmeans_faiss(train, k, niters, seed, verbose)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def _resolve(implementation: str) -> str:
    global _fallback_logged
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"k-means implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        implementation = os.environ.get(KMEANS_ENV, "").strip().lower() or "auto"
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"{KMEANS_ENV} must be one of {IMPLEMENTATIONS}, got {os.environ[KMEANS_ENV]!r}")
    if implementation == "jax":
        return "jax"
    # libgomp's busy-waiting halves faiss' speed on small machines; must be set before faiss loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        if implementation == "faiss":
            raise ImportError(
                f"faiss k-means was requested but faiss does not import ({e}); `pip install faiss-cpu`, "
                f'or use implementation="jax" ({KMEANS_ENV}=jax)'
            ) from e
        if not _fallback_logged:
            _fallback_logged = True
            _log.info("faiss is not installed: k-means runs in JAX on %s", jax.default_backend())
        return "jax"
    return "faiss"


def _kmeans_faiss(train: np.ndarray, k: int, niters: int, seed: int, verbose: bool) -> np.ndarray:
    import faiss

    use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(train.shape[1], k, niter=niters, gpu=use_gpu, seed=seed, verbose=verbose)
    kmeans.train(train)
    return np.asarray(kmeans.centroids, np.float32)


def _kmeans_jax(train: np.ndarray, k: int, niters: int, seed: int) -> np.ndarray:
    """faiss.Kmeans' defaults (subsample to 256 points per centroid, k distinct training points as the
    start) with Lloyd's iterations in JAX. Unnormalised float32 centroids [k, dim]."""
    rng = np.random.default_rng(seed)
    if len(train) > MAX_POINTS_PER_CENTROID * k:
        train = train[rng.permutation(len(train))[: MAX_POINTS_PER_CENTROID * k]]
    n, dim = train.shape
    init = train[rng.choice(n, k, replace=False)]
    # Scores per chunk stay near 2^24 floats; the padded length is a power of two of chunks, so the number of
    # compiled shapes grows with log(n), and the loop only visits the chunks that hold real rows.
    chunk = min(max(1 << (max((1 << 24) // k, 1).bit_length() - 1), 256), 1 << (n - 1).bit_length())
    nchunks = -(-n // chunk)
    padded = np.zeros((chunk << (nchunks - 1).bit_length(), dim), np.float32)
    padded[:n] = train
    c = _lloyd(jnp.asarray(padded), jnp.asarray(init), n, niters, seed, chunk=chunk)
    return np.asarray(c, np.float32)


@partial(jax.jit, static_argnames="chunk")
def _lloyd(x: jax.Array, c: jax.Array, n: int, niters: int, seed: int, *, chunk: int) -> jax.Array:
    """`niters` Lloyd iterations over the first `n` rows of `x` [padded n, dim] from centroids `c` [k, dim]."""
    k, dim = c.shape
    nchunks = (n + chunk - 1) // chunk
    key = jax.random.key(seed)

    def assign(c: jax.Array) -> tuple[jax.Array, jax.Array]:
        half_norms = 0.5 * jnp.sum(c * c, axis=1)

        def body(i, acc):
            sums, counts = acc
            valid = i * chunk + jnp.arange(chunk) < n
            xc = jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk)
            scores = jnp.dot(xc, c.T, precision=jax.lax.Precision.HIGHEST) - half_norms
            # The first maximum, as argmax would give; XLA:CPU's argmax reduction is 2x slower than these two.
            best = jnp.max(scores, axis=1, keepdims=True)
            a = jnp.min(jnp.where(scores == best, jnp.arange(k, dtype=jnp.int32), k), axis=1)
            a = jnp.where(valid, a, k)  # segment_sum drops ids >= k: the padding
            sums = sums + jax.ops.segment_sum(xc, a, k)
            counts = counts + jax.ops.segment_sum(jnp.ones(chunk, jnp.int32), a, k)
            return sums, counts

        return jax.lax.fori_loop(0, nchunks, body, (jnp.zeros((k, dim), jnp.float32), jnp.zeros(k, jnp.int32)))

    def step(it, c):
        sums, counts = assign(c)
        means = sums / jnp.maximum(counts, 1)[:, None].astype(jnp.float32)
        empty = counts == 0

        def reseed(means: jax.Array) -> jax.Array:
            # Splits clusters as faiss does: the j-th empty one restarts at the j-th most populous one's
            # centroid, nudged at random so the two divide its points. (Restarting at the points farthest from
            # their centroids, scikit-learn's way, captured fewer piles of duplicate points.)
            nonempty = jnp.maximum(k - jnp.sum(empty), 1)
            donor = jnp.argsort(-counts)[(jnp.cumsum(empty) - 1) % nonempty]
            base = means[donor]
            noise = jax.random.normal(jax.random.fold_in(key, it), (k, dim), jnp.float32)
            scale = 1e-4 * jnp.linalg.norm(base, axis=1, keepdims=True) / jnp.sqrt(jnp.float32(dim))
            return jnp.where(empty[:, None], base + scale * noise, means)

        return jax.lax.cond(jnp.any(empty), reseed, lambda m: m, means)

    return jax.lax.fori_loop(0, niters, step, c.astype(jnp.float32))
