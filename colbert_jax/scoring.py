"""MaxSim late-interaction scoring (colbert-ai 0.2.22 `colbert_score`, GPU semantics).

For each query token, the best-matching document token (dot product of L2-normalised vectors); the
score is the sum over query tokens. Masked document positions take -9999 before the max, so an empty
document scores -9999 per query token, as in the reference's padded path. (The reference's CPU packed
path clamps each maximum at 0; we keep the mathematically clean GPU semantics everywhere.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["colbert_score", "maxsim"]

MASKED_SCORE = -9999.0


def maxsim(Q: jax.Array, D: jax.Array, D_mask: jax.Array | None = None) -> jax.Array:
    """Per-query-token maxima. Q [B|1, Lq, dim], D [B, Ld, dim], D_mask [B, Ld] -> [B, Lq] float32."""
    # float32 vectors score in float32 on accelerators too (not TensorFloat-32 or bfloat16 passes)
    precision = jax.lax.Precision.HIGHEST if D.dtype == jnp.float32 else None
    s = jnp.einsum("bqd,bkd->bkq", Q.astype(D.dtype), D, precision=precision, preferred_element_type=jnp.float32)
    if D_mask is not None:
        s = jnp.where(D_mask[:, :, None], s, MASKED_SCORE)
    return s.max(axis=1)


@jax.jit
def colbert_score(Q: jax.Array, D: jax.Array, D_mask: jax.Array | None = None) -> jax.Array:
    """ColBERT scores of documents against queries.

    Args:
      Q: [B, Lq, dim] or [1, Lq, dim] (one query broadcast against all documents).
      D: [B, Ld, dim] padded document embeddings.
      D_mask: [B, Ld] bool, True where a document token exists (None: all exist).
    Returns:
      [B] float32 scores.
    """
    if Q.ndim != 3 or D.ndim != 3:
        raise ValueError(f"Q and D must be 3-D [batch, tokens, dim], got {Q.shape} and {D.shape}")
    if Q.shape[0] not in (1, D.shape[0]):
        raise ValueError(f"Q batch {Q.shape[0]} must be 1 or equal D's batch {D.shape[0]}")
    if Q.shape[-1] != D.shape[-1]:
        raise ValueError(f"dimension mismatch: Q has dim {Q.shape[-1]}, D has dim {D.shape[-1]}")
    if D_mask is not None and D_mask.shape != D.shape[:2]:
        raise ValueError(f"D_mask shape {D_mask.shape} must be {D.shape[:2]}")
    if D_mask is not None:
        D_mask = D_mask.astype(bool)
    return maxsim(Q, D, D_mask).sum(axis=-1)
