"""ColBERT training objective as pure functions (colbert-ai 0.2.22 `colbert/training/training.py` and
`ColBERT.forward` / `compute_ib_loss` in `colbert/modeling/colbert.py`).

- scores [b, nway]: MaxSim of each query (repeated nway times) with its nway passages, padded positions
  at -9999; with similarity="l2", sum_q max_d -||q - d||^2 over every position, padding included (a
  colbert-ai quirk kept for parity);
- without teacher scores: cross-entropy with the positive in column 0;
- with teacher scores (distillation): KL(batchmean) between log_softmax(alpha * teacher) and
  log_softmax(scores);
- in-batch negatives: each query against every passage of the micro-batch, its own negatives left out,
  cross-entropy with its positive (always dot-product MaxSim, as in colbert-ai).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from colbert_jax.scoring import maxsim

__all__ = ["pair_scores", "ce_loss", "distillation_loss", "in_batch_loss"]


def pair_scores(Q: jax.Array, D: jax.Array, D_mask: jax.Array, nway: int, similarity: str) -> jax.Array:
    """Q [b, Lq, dim], D [b * nway, Ld, dim] (query-major), D_mask [b * nway, Ld] -> scores [b, nway]."""
    Qr = jnp.repeat(Q, nway, axis=0)
    if similarity == "l2":
        sq = -((Qr[:, :, None, :] - D[:, None, :, :]) ** 2).sum(-1)  # [b*nway, Lq, Ld]
        scores = sq.max(axis=-1).sum(axis=-1)
    else:
        scores = maxsim(Qr, D, D_mask).sum(axis=-1)
    return scores.reshape(Q.shape[0], nway)


def ce_loss(scores: jax.Array) -> jax.Array:
    """Mean cross-entropy with label 0 (the positive)."""
    return -jax.nn.log_softmax(scores, axis=-1)[:, 0].mean()


def distillation_loss(scores: jax.Array, teacher: jax.Array, alpha: float) -> jax.Array:
    """KLDivLoss(log_softmax(scores), log_softmax(alpha * teacher), log_target=True, reduction='batchmean')."""
    t = jax.nn.log_softmax(alpha * teacher, axis=-1)
    s = jax.nn.log_softmax(scores, axis=-1)
    return (jnp.exp(t) * (t - s)).sum() / scores.shape[0]


def in_batch_loss(Q: jax.Array, D: jax.Array, D_mask: jax.Array, nway: int) -> jax.Array:
    """Cross-entropy of each query over all passages of the micro-batch minus its own negatives."""
    b, n = Q.shape[0], D.shape[0]
    precision = jax.lax.Precision.HIGHEST if D.dtype == jnp.float32 else None  # float32: no TensorFloat-32
    sim = jnp.einsum("qld,pkd->qpkl", Q, D, precision=precision, preferred_element_type=jnp.float32)  # [b, n, Ld, Lq]
    sim = jnp.where(D_mask[None, :, :, None], sim, -9999.0)
    scores = sim.max(axis=2).sum(axis=-1)  # [b, n]
    column = jnp.arange(n)[None, :]
    first = (jnp.arange(b) * nway)[:, None]
    own_negative = (column > first) & (column < first + nway)
    scores = jnp.where(own_negative, -jnp.inf, scores)
    return -jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), first, axis=1).mean()
