"""A BERT encoder in Flax linen, numerically matching transformers' `BertModel` (last hidden state).

Sub-module names follow the PyTorch parameter names (`embeddings`, `encoder/layer/attention/self/query`,
...), so `convert.py` maps weights by rule. The layers are an `nn.scan` (parameters stacked on a leading
`layers` axis): one traced layer keeps compile time flat in depth. Every parameter carries logical axis
names (`vocab`, `embed`, `heads`, `mlp`, `layers`) for sharding rules.

Numerics follow the reference: token_type ids all 0, positions 0..L-1, additive key mask
`(1 - mask) * finfo.min`, exact-erf GELU, two-pass LayerNorm with eps from the config.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from colbert_jax.modeling.invariant import active, padded

__all__ = ["BertConfig", "BertModel"]

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The backbone's shape, as in a Hugging Face BERT `config.json`."""

    model_types: ClassVar[tuple[str, ...]] = ("bert",)
    torch_prefix: ClassVar[str] = "bert"  # the backbone's attribute in colbert-ai's HF_ColBERT (base_model_prefix)
    # the int8 query encoder gives the same bits at every batch size (`modeling/invariant.py`): "auto" may use it
    int8_batch_invariant: ClassVar[bool] = True

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> BertConfig:
        model_type = d.get("model_type", cls.model_types[0])
        if model_type not in cls.model_types:
            raise ValueError(f"{source}: model_type {model_type!r} is not a {cls.__name__}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: only absolute position embeddings are supported")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["HF_ColBERT"],
            "model_type": self.model_types[0],
            "position_embedding_type": "absolute",
            "torch_dtype": "float32",
            **dataclasses.asdict(self),
        }

    @property
    def max_length(self) -> int:
        """Longest input the position embeddings allow."""
        return self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _init(config: BertConfig, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _dense(config: BertConfig, features: int, names, dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_init(config, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]),
        name=name,
    )


def _layer_norm(config: BertConfig, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,  # two-pass variance, as torch computes it
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name="LayerNorm",
    )


class _Embeddings(nn.Module):
    config: BertConfig
    dtype: Any

    @nn.compact
    def __call__(self, input_ids, deterministic: bool):
        cfg = self.config
        seq_len = input_ids.shape[1]

        def table(n, names, name):
            return nn.Embed(n, cfg.hidden_size, param_dtype=jnp.float32, embedding_init=_init(cfg, names), name=name)

        x = table(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        x = x + table(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(jnp.arange(seq_len))[None]
        x = x + table(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(jnp.zeros_like(input_ids))
        x = padded(_layer_norm(cfg, self.dtype), x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class _SelfAttention(nn.Module):
    config: BertConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        cfg = self.config
        batch, length, _ = x.shape

        def heads(name):
            h = _dense(cfg, cfg.hidden_size, ("embed", "heads"), self.dtype, name)(x)
            return h.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)

        def attend(q, k, v, bias):
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
            scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim)) + bias
            probs = jax.nn.softmax(scores, axis=-1)
            probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
            return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)

        def attend_merged(q, k, v, bias):
            # the same products with batch and heads as one leading axis, which a single query does not make
            # size 1: XLA:CPU lays the einsums out alike at every batch size (the int8 query encoder's path)
            b, n, h, d = q.shape
            merged = lambda t: t.transpose(0, 2, 1, 3).reshape(b * h, n, d)  # noqa: E731
            scores = jnp.einsum("xqd,xkd->xqk", merged(q), merged(k), preferred_element_type=jnp.float32)
            scores = scores.reshape(b, h, n, n) / jnp.sqrt(jnp.float32(cfg.head_dim)) + bias
            probs = jax.nn.softmax(scores, axis=-1).reshape(b * h, n, n)
            ctx = jnp.einsum("xqk,xkd->xqd", probs.astype(self.dtype), merged(v))
            return ctx.reshape(b, h, n, d).transpose(0, 2, 1, 3)

        # bias: [batch, 1, 1, length]
        ctx = padded(attend_merged if active() else attend, heads("query"), heads("key"), heads("value"), bias)
        return ctx.reshape(batch, length, cfg.hidden_size)

    def qkv_attention(self) -> tuple[int, Callable]:
        """For the int8 encoder's native attention (`quantize.int8_dense`), which stands in for this module's
        call when its fused qkv params are packed: the number of heads, and this attention as a function of the
        fused projections (qkv [B, L, 3 * hidden] + bias, key_bias [B, L]), for programs lowered elsewhere."""
        return self.config.num_attention_heads, functools.partial(
            attention_from_qkv, heads=self.config.num_attention_heads
        )


def attention_from_qkv(qkv: jax.Array, key_bias: jax.Array, heads: int) -> jax.Array:
    """`_SelfAttention`'s output from its fused projections: qkv [B, L, 3 * H * D], key_bias [B, L] -> [B, L, H * D]
    (inference: no dropout)."""
    b, n, width = qkv.shape
    q, k, v = (t.reshape(b, n, heads, width // (3 * heads)) for t in jnp.split(qkv, 3, axis=-1))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(q.shape[-1])) + key_bias[:, None, None, :]
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, width // 3)


class _Output(nn.Module):
    """dense -> dropout -> residual add -> LayerNorm (BertSelfOutput and BertOutput)."""

    config: BertConfig
    dtype: Any
    in_names: tuple[str, str]

    @nn.compact
    def __call__(self, h, residual, deterministic: bool):
        cfg = self.config
        h = _dense(cfg, cfg.hidden_size, self.in_names, self.dtype, "dense")(h)
        h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
        return padded(_layer_norm(cfg, self.dtype), h + residual)


class _Attention(nn.Module):
    config: BertConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, bias, deterministic: bool):
        ctx = _SelfAttention(self.config, self.dtype, name="self")(x, bias, deterministic)
        return _Output(self.config, self.dtype, ("heads", "embed"), name="output")(ctx, x, deterministic)


class _Intermediate(nn.Module):
    config: BertConfig
    dtype: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        return _ACTIVATIONS[cfg.hidden_act](
            _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), self.dtype, "dense")(x)
        )

    def fused_activation(self) -> str | None:
        """The activation after this module's dense layer, where the int8 encoder's native kernels apply it
        (`quantize.int8_dense`, packed params): the exact GELU only."""
        return "gelu" if self.config.hidden_act == "gelu" else None


class _Layer(nn.Module):
    config: BertConfig
    dtype: Any
    deterministic: bool

    @nn.compact
    def __call__(self, x, bias):
        x = _Attention(self.config, self.dtype, name="attention")(x, bias, self.deterministic)
        h = _Intermediate(self.config, self.dtype, name="intermediate")(x)
        x = _Output(self.config, self.dtype, ("mlp", "embed"), name="output")(h, x, self.deterministic)
        return x, None


class _Encoder(nn.Module):
    """The layers: an `nn.scan` over parameters stacked on a leading axis (`layer`), or with `unstacked`, one
    module per layer (`layer_0`, `layer_1`, ...; `unstack_layers` converts the parameters). Inference on
    XLA:CPU takes the second: a scan step slices its layer's weights out of the stack, a copy of every
    weight on every call that costs as much as a small batch's products."""

    config: BertConfig
    dtype: Any
    deterministic: bool
    remat: bool = False
    unstacked: bool = False

    @nn.compact
    def __call__(self, x, bias):
        layer_cls = nn.remat(_Layer) if self.remat else _Layer
        if self.unstacked:
            for i in range(self.config.num_hidden_layers):
                x, _ = layer_cls(self.config, self.dtype, self.deterministic, name=f"layer_{i}")(x, bias)
            return x
        layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=nn.broadcast,
            length=self.config.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = layers(self.config, self.dtype, self.deterministic, name="layer")(x, bias)
        return x


def _key_bias(attention_mask):
    """Additive key mask as in transformers: 0 where attended, finfo.min elsewhere; [B, 1, 1, L]."""
    keep = attention_mask[:, None, None, :].astype(jnp.float32)
    return (1.0 - keep) * jnp.finfo(jnp.float32).min


class BertModel(nn.Module):
    """`(input_ids [B, L] int, attention_mask [B, L]) -> last hidden state [B, L, hidden]`."""

    config: BertConfig
    dtype: Any = jnp.float32
    remat: bool = False
    unstacked: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        x = _Embeddings(self.config, self.dtype, name="embeddings")(input_ids, deterministic)
        bias = _key_bias(attention_mask)
        encoder = _Encoder(self.config, self.dtype, deterministic, self.remat, self.unstacked, name="encoder")
        return encoder(x, bias)


def unstack_layers(backbone_params: dict) -> dict:
    """A BERT-family backbone's parameters with the stacked `encoder/layer` subtree split into `layer_0`,
    `layer_1`, ... (the layout of `_Encoder(unstacked=True)`); host arrays."""
    encoder = dict(backbone_params["encoder"])
    stacked = encoder.pop("layer")
    count = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(count):
        encoder[f"layer_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
    return {**backbone_params, "encoder": encoder}
