"""An ELECTRA encoder (the discriminator) in Flax linen, numerically matching transformers' `ElectraModel`.

The layers are BERT's (`bert.py`). The embeddings have their own width `embedding_size`; when it differs
from `hidden_size`, a linear `embeddings_project` maps them to the hidden width before the first layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from colbert_jax.modeling.bert import BertConfig, _dense, _Encoder, _init, _key_bias
from colbert_jax.modeling.invariant import padded

__all__ = ["ElectraConfig", "ElectraModel"]


@dataclasses.dataclass(frozen=True)
class ElectraConfig(BertConfig):
    """A Hugging Face ELECTRA `config.json` (the fields the forward pass uses)."""

    model_types: ClassVar[tuple[str, ...]] = ("electra",)
    torch_prefix: ClassVar[str] = "electra"

    model_type: str = "electra"
    embedding_size: int = 768

    @property
    def projects_embeddings(self) -> bool:
        return self.embedding_size != self.hidden_size


class _Embeddings(nn.Module):
    config: ElectraConfig
    dtype: Any

    @nn.compact
    def __call__(self, input_ids, deterministic: bool):
        cfg = self.config
        seq_len = input_ids.shape[1]
        # The embedding width is not the model width: keep it off the `embed` sharding rule.
        names = "embed" if not cfg.projects_embeddings else None

        def table(n, row_name, name):
            return nn.Embed(
                n, cfg.embedding_size, param_dtype=jnp.float32, embedding_init=_init(cfg, (row_name, names)), name=name
            )

        x = table(cfg.vocab_size, "vocab", "word_embeddings")(input_ids)
        x = x + table(cfg.max_position_embeddings, None, "position_embeddings")(jnp.arange(seq_len))[None]
        x = x + table(cfg.type_vocab_size, None, "token_type_embeddings")(jnp.zeros_like(input_ids))
        norm = nn.LayerNorm(
            epsilon=cfg.layer_norm_eps,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            use_fast_variance=False,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (names,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names,)),
            name="LayerNorm",
        )
        x = padded(norm, x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class ElectraModel(nn.Module):
    """`(input_ids [B, L] int, attention_mask [B, L]) -> last hidden state [B, L, hidden]`."""

    config: ElectraConfig
    dtype: Any = jnp.float32
    remat: bool = False
    unstacked: bool = False  # one module per layer (`bert._Encoder`)

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        cfg = self.config
        x = _Embeddings(cfg, self.dtype, name="embeddings")(input_ids, deterministic)
        if cfg.projects_embeddings:
            x = _dense(cfg, cfg.hidden_size, (None, "embed"), self.dtype, "embeddings_project")(x)
        bias = _key_bias(attention_mask)
        encoder = _Encoder(cfg, self.dtype, deterministic, self.remat, self.unstacked, name="encoder")
        return encoder(x, bias)
