"""RoBERTa and XLM-RoBERTa encoders in Flax linen, numerically matching transformers' `RobertaModel` /
`XLMRobertaModel` (last hidden state; transformers 4.57, as colbert-ai 0.2.22 runs it).

The layers are BERT's (`bert.py`); only the embeddings differ: position ids count non-padding tokens
from `pad_token_id + 1` and padding tokens get position `pad_token_id` (fairseq's `make_positions`), so
they depend on the ids, not on the attention mask. Both model types share this module; the config keeps
which one it is so that export writes it back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from colbert_jax.modeling.bert import BertConfig, _Encoder, _init, _key_bias, _layer_norm
from colbert_jax.modeling.invariant import padded

__all__ = ["RobertaConfig", "RobertaModel"]


@dataclasses.dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """A Hugging Face RoBERTa / XLM-RoBERTa `config.json` (the fields the forward pass uses)."""

    model_types: ClassVar[tuple[str, ...]] = ("roberta", "xlm-roberta")
    torch_prefix: ClassVar[str] = "roberta"

    model_type: str = "roberta"
    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    @property
    def max_length(self) -> int:
        """Longest input: positions start after the padding index."""
        return self.max_position_embeddings - self.pad_token_id - 1


class _Embeddings(nn.Module):
    config: RobertaConfig
    dtype: Any

    @nn.compact
    def __call__(self, input_ids, deterministic: bool):
        cfg = self.config

        def table(n, names, name):
            return nn.Embed(n, cfg.hidden_size, param_dtype=jnp.float32, embedding_init=_init(cfg, names), name=name)

        not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
        positions = jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
        x = table(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        x = x + table(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(jnp.zeros_like(input_ids))
        x = x + table(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(positions)
        x = padded(_layer_norm(cfg, self.dtype), x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class RobertaModel(nn.Module):
    """`(input_ids [B, L] int, attention_mask [B, L]) -> last hidden state [B, L, hidden]`."""

    config: RobertaConfig
    dtype: Any = jnp.float32
    remat: bool = False
    unstacked: bool = False  # one module per layer (`bert._Encoder`)

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        x = _Embeddings(self.config, self.dtype, name="embeddings")(input_ids, deterministic)
        bias = _key_bias(attention_mask)
        encoder = _Encoder(self.config, self.dtype, deterministic, self.remat, self.unstacked, name="encoder")
        return encoder(x, bias)
