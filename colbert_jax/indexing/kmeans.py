"""Choosing and training the centroids, by colbert-ai 0.2.22's formulas (`collection_indexer.py`).

- sample `min(1 + int(16 * sqrt(120 * N)), N)` passages with Python's `random.sample(range(N), n)`
  seeded 12345 (the reference's launcher seed: the same pids are drawn);
- `num_partitions = 2 ** floor(log2(16 * sqrt(estimated embeddings)))`;
- k-means with faiss (GPU when faiss has GPUs), seed 123, on all but a held-out 5% (at most 50,000) of the
  shuffled sample embeddings; centroids are then L2-normalised.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np

__all__ = ["sample_size", "sample_passages", "num_partitions", "split_heldout", "train_centroids"]

SAMPLE_SEED = 12345
KMEANS_SEED = 123


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
    train: np.ndarray, k: int, niters: int, *, seed: int = KMEANS_SEED, verbose: bool = False
) -> np.ndarray:
    """faiss k-means -> L2-normalised float32 centroids [k, dim]."""
    # libgomp's busy-waiting halves faiss' speed on small machines; must be set before faiss loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss

    train = np.ascontiguousarray(train, dtype=np.float32)
    if len(train) < k:
        raise ValueError(f"k-means needs at least {k} training embeddings, got {len(train)}")
    use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(train.shape[1], k, niter=niters, gpu=use_gpu, seed=seed, verbose=verbose)
    kmeans.train(train)
    c = np.asarray(kmeans.centroids, np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
