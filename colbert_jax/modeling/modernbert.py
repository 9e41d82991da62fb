"""A ModernBERT encoder in Flax linen, numerically matching transformers' `ModernBertModel` (last hidden
state, the padded "sdpa"/"eager" path that colbert-ai 0.2.22 and PyLate run on CPU).

Pre-norm layers: `x + attn(attn_norm(x))`, then `x + mlp(mlp_norm(x))`; layer 0 has no `attn_norm`
(the embeddings are already normalised). Attention is a fused `Wqkv` with rotary position embeddings;
every `global_attn_every_n_layers`-th layer (from layer 0) attends globally with `global_rope_theta`,
the others within `local_attention // 2` positions either side with `local_rope_theta`. The MLP is a
GLU: `Wo(act(a) * g)` with `a, g = split(Wi(x))`. Biases and norm biases only where the config says.

The layers are an `nn.scan`, so every layer has the same parameters; per-layer differences (global or
local, whether `attn_norm` applies) are scanned flags. Layer 0's `attn_norm` therefore exists in our
tree as an unused identity-initialised slot that import fills and export drops (`convert.py`).

Logical axes for sharding: the attention output `Wo`'s input axis is `heads` and the GLU's units `mlp`, as in
BERT. `Wqkv`'s fused output axis is `qkv`, which the default rules replicate: a contiguous split of it
would cut across the query/key/value blocks rather than between heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from colbert_jax.modeling.bert import _ACTIVATIONS

__all__ = ["ModernBertConfig", "ModernBertModel"]


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    """A Hugging Face ModernBERT `config.json` (the fields the forward pass uses)."""

    model_types: ClassVar[tuple[str, ...]] = ("modernbert",)
    torch_prefix: ClassVar[str] = "model"
    # its int8 query embeddings still depend on the batch size (at batch sizes 1-4): "auto" keeps it float32
    int8_batch_invariant: ClassVar[bool] = False

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int = 50283
    eos_token_id: int = 50282
    bos_token_id: int = 50281
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    global_rope_theta: float = 160000.0
    local_rope_theta: float | None = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    # A query position whose window holds no attended key (a [MASK] expansion token far from the text) gets
    # uniform attention over all keys under transformers 4.x (additive finfo.min mask, colbert-ai 0.2.22) but
    # none at all under transformers 5 with torch >= 2.5 (boolean mask, safe softmax: PyLate 1.6).
    masked_rows_attend_nothing: bool = dataclasses.field(default=False, compare=True)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported hidden_activation {self.hidden_activation!r}; supported: {sorted(_ACTIVATIONS)}"
            )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> ModernBertConfig:
        """Reads a transformers 4.x config or a 5.x one (`rope_parameters` per attention type)."""
        d = dict(d)
        rope = d.get("rope_parameters")
        if isinstance(rope, dict):
            if "full_attention" in rope:  # transformers 5: {"full_attention": {...}, "sliding_attention": {...}}
                d.setdefault("global_rope_theta", rope["full_attention"].get("rope_theta"))
                d.setdefault("local_rope_theta", rope.get("sliding_attention", {}).get("rope_theta"))
            for kind in ("full_attention", "sliding_attention"):
                rtype = rope.get(kind, {}).get("rope_type", "default")
                if rtype != "default":
                    raise ValueError(f"{source}: rope_type {rtype!r} is not supported (only the default RoPE)")
        if d.get("rope_scaling"):
            raise ValueError(f"{source}: rope_scaling is not supported")
        if "sliding_window" in d and "local_attention" not in d and d["sliding_window"] is not None:
            d["local_attention"] = 2 * int(d["sliding_window"])
        layer_types = d.get("layer_types")
        names = {f.name for f in dataclasses.fields(cls)} - {"masked_rows_attend_nothing"}
        try:
            config = cls(**{k: v for k, v in d.items() if k in names and v is not None})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
        if layer_types is not None:
            expected = ["full_attention" if g else "sliding_attention" for g in config.global_layers]
            if list(layer_types) != expected:
                raise ValueError(
                    f"{source}: layer_types {layer_types} is not every {config.global_attn_every_n_layers}-th "
                    "layer global, which is the only pattern supported"
                )
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        del fields["masked_rows_attend_nothing"]  # a property of the runtime, not of the checkpoint
        return {"architectures": ["HF_ColBERT"], "model_type": "modernbert", **fields}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    @property
    def global_layers(self) -> tuple[bool, ...]:
        return tuple(i % self.global_attn_every_n_layers == 0 for i in range(self.num_hidden_layers))


def _rope(theta: float, head_dim: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [length, head_dim] in float32, the two halves repeated (transformers' default RoPE)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _init(config: ModernBertConfig, names):
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _dense(config, features, names, use_bias, dtype, name):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_init(config, names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[-1:]),
        name=name,
    )


def _norm(config: ModernBertConfig, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.norm_eps,
        use_bias=config.norm_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class _Attention(nn.Module):
    config: ModernBertConfig
    dtype: Any
    deterministic: bool

    @nn.compact
    def __call__(self, h, bias, cos, sin):
        cfg = self.config
        batch, length, _ = h.shape
        qkv = _dense(cfg, 3 * cfg.hidden_size, ("embed", "qkv"), cfg.attention_bias, self.dtype, "Wqkv")(h)
        qkv = qkv.reshape(batch, length, 3, cfg.num_attention_heads, cfg.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = _rotate(q, cos, sin).astype(self.dtype), _rotate(k, cos, sin).astype(self.dtype)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim)) + bias
        probs = jax.nn.softmax(scores, axis=-1)
        if cfg.masked_rows_attend_nothing:
            probs = jnp.where(jnp.any(bias == 0, axis=-1, keepdims=True), probs, 0.0)
        probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=self.deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v).reshape(batch, length, cfg.hidden_size)
        out = _dense(cfg, cfg.hidden_size, ("heads", "embed"), cfg.attention_bias, self.dtype, "Wo")(ctx)
        return nn.Dropout(cfg.attention_dropout)(out, deterministic=self.deterministic)


class _MLP(nn.Module):
    config: ModernBertConfig
    dtype: Any
    deterministic: bool

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        wi = _dense(cfg, 2 * cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias, self.dtype, "Wi")
        a, g = jnp.split(wi(h), 2, axis=-1)
        h = nn.Dropout(cfg.mlp_dropout)(_ACTIVATIONS[cfg.hidden_activation](a) * g, deterministic=self.deterministic)
        return _dense(cfg, cfg.hidden_size, ("mlp", "embed"), cfg.mlp_bias, self.dtype, "Wo")(h)


class _Layer(nn.Module):
    config: ModernBertConfig
    dtype: Any
    deterministic: bool

    @nn.compact
    def __call__(self, x, global_bias, local_bias, global_rope, local_rope, is_global, has_attn_norm):
        cfg = self.config
        h = jnp.where(has_attn_norm, _norm(cfg, self.dtype, "attn_norm")(x), x)
        bias = jnp.where(is_global, global_bias, local_bias)
        cos = jnp.where(is_global, global_rope[0], local_rope[0])[None, :, None, :]
        sin = jnp.where(is_global, global_rope[1], local_rope[1])[None, :, None, :]
        x = x + _Attention(cfg, self.dtype, self.deterministic, name="attn")(h, bias, cos, sin)
        x = x + _MLP(cfg, self.dtype, self.deterministic, name="mlp")(_norm(cfg, self.dtype, "mlp_norm")(x))
        return x, None


class ModernBertModel(nn.Module):
    """`(input_ids [B, L] int, attention_mask [B, L]) -> last hidden state [B, L, hidden]`."""

    config: ModernBertConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True):
        cfg = self.config
        length = input_ids.shape[1]
        x = _Embeddings(cfg, self.dtype, name="embeddings")(input_ids, deterministic)

        # Masks as transformers builds them: a sliding-window key outside the window is set to finfo.min
        # (not added to the padding mask), so no row sums two finfo.min values into -inf.
        minimum = jnp.finfo(jnp.float32).min
        keep = attention_mask[:, None, None, :].astype(bool)
        global_bias = jnp.where(keep, 0.0, minimum).astype(jnp.float32)
        pos = jnp.arange(length)
        window = jnp.abs(pos[:, None] - pos[None, :]) <= cfg.local_attention // 2
        local_bias = jnp.where(window[None, None], global_bias, minimum)
        global_rope = _rope(cfg.global_rope_theta, cfg.head_dim, length)
        local_theta = cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.global_rope_theta
        local_rope = _rope(local_theta, cfg.head_dim, length)
        is_global = jnp.array(cfg.global_layers)
        has_attn_norm = jnp.arange(cfg.num_hidden_layers) > 0

        layer_cls = nn.remat(_Layer) if self.remat else _Layer
        layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
            length=cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = layers(cfg, self.dtype, deterministic, name="layers")(
            x, global_bias, local_bias, global_rope, local_rope, is_global, has_attn_norm
        )
        return _norm(cfg, self.dtype, "final_norm")(x)


class _Embeddings(nn.Module):
    config: ModernBertConfig
    dtype: Any

    @nn.compact
    def __call__(self, input_ids, deterministic: bool):
        cfg = self.config
        x = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            param_dtype=jnp.float32,
            embedding_init=_init(cfg, ("vocab", "embed")),
            name="tok_embeddings",
        )(input_ids)
        x = _norm(cfg, self.dtype, "norm")(x)
        return nn.Dropout(cfg.embedding_dropout)(x, deterministic=deterministic)
