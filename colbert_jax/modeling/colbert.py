"""ColBERT: backbone (BERT, RoBERTa, ELECTRA, ModernBERT) -> bias-free projection -> token mask -> L2 norm.

Pure functions of explicit arrays, mirroring colbert-ai 0.2.22 `colbert/modeling/colbert.py`:
- queries keep every position whose id is not [PAD] (after [MASK] augmentation that is all of them);
- documents keep positions that are neither [PAD] nor a punctuation id (computed from the ids, not from
  the attention mask); masked rows become zero vectors;
- normalisation is `x / max(||x||, 1e-12)`, so a zero row stays zero.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from colbert_jax.modeling.backbones import BackboneConfig, backbone_module
from colbert_jax.modeling.invariant import padded

__all__ = ["ColBERTEncoder", "HEAD_ACTIVATIONS", "l2_normalize", "embed_queries", "embed_docs", "logical_axes"]


HEAD_ACTIVATIONS = {
    "identity": lambda x: x,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "sigmoid": jax.nn.sigmoid,
}


class ColBERTEncoder(nn.Module):
    """`(input_ids, attention_mask) -> projected token vectors [B, L, dim]` (float32, not normalised).

    The projection is colbert-ai's bias-free `linear` unless `head` lists PyLate-style dense layers
    `(out_features, bias, activation)`, applied in order as `dense_1`, `dense_2`, ... (the last gives `dim`).
    """

    bert_config: BackboneConfig  # any backbone's config; the name predates the other backbones
    dim: int
    dtype: Any = jnp.float32
    remat: bool = False
    head: tuple[tuple[int, bool, str], ...] = ()
    unstacked: bool = False  # the backbone's layers as one module each (`backbones.unstacked_params`)

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        # float32 means float32 everywhere: GPUs would otherwise run these products in TensorFloat-32 (a 10-bit
        # mantissa), far outside colbert-ai parity. CPUs compute float32 products either way.
        exact = jnp.dtype(self.dtype) == jnp.float32
        with jax.default_matmul_precision("highest") if exact else contextlib.nullcontext():
            return self._encode(input_ids, attention_mask, deterministic)

    def _encode(self, input_ids, attention_mask, deterministic: bool):
        backbone = backbone_module(self.bert_config, self.dtype, self.remat, self.unstacked)
        h = backbone(input_ids, attention_mask, deterministic)
        layers = self.head or ((self.dim, False, "identity"),)
        for i, (features, bias, activation) in enumerate(layers, start=1):
            dense = nn.Dense(
                features,
                use_bias=bias,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(self.bert_config.initializer_range),
                    ("embed", "proj") if i == 1 else (None, "proj"),
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("proj",)),
                name=f"dense_{i}" if self.head else "linear",
            )
            # float32: XLA:CPU's dot takes another kernel for one query's rows than for two or more
            h = padded(lambda x, d=dense, a=activation: HEAD_ACTIVATIONS[a](d(x)), h, min_rows=2)
        return h.astype(jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize semantics: divide by max(norm, eps).

    Written as sqrt(max(sum x^2, eps^2)) - the same value - so that the gradient at a zero row (masked
    positions) is 0 rather than 0 * NaN from differentiating the norm at 0.
    """
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def embed_queries(
    module: ColBERTEncoder,
    params,
    ids: jax.Array,
    mask: jax.Array,
    *,
    pad_id: int,
    deterministic: bool = True,
    rngs=None,
) -> jax.Array:
    """Query embeddings [B, Lq, dim], L2-normalised (rows with id == pad are zero)."""
    q = module.apply({"params": params}, ids, mask, deterministic, rngs=rngs)
    keep = (ids != pad_id)[..., None]
    return padded(l2_normalize, q * keep)


def embed_docs(
    module: ColBERTEncoder,
    params,
    ids: jax.Array,
    mask: jax.Array,
    skiplist: jax.Array,
    *,
    pad_id: int,
    deterministic: bool = True,
    rngs=None,
) -> tuple[jax.Array, jax.Array]:
    """Document embeddings [B, Ld, dim] (masked rows zero) and their keep-mask [B, Ld] bool."""
    d = module.apply({"params": params}, ids, mask, deterministic, rngs=rngs)
    keep = (ids != pad_id) & ~jnp.isin(ids, skiplist)
    return l2_normalize(d * keep[..., None]), keep


def logical_axes(module: ColBERTEncoder, seq_len: int = 8):
    """The params pytree's logical axis names (PartitionSpecs over `vocab`, `embed`, `heads`, ...)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids))
    return nn.get_partition_spec(abstract)["params"]
