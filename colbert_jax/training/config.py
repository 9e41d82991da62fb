"""Training configuration: a YAML file with two sections, validated strictly.

    colbert:   ColBERTConfig keys, with colbert-ai's names (checkpoint, triples, queries, collection, bsize,
               accumsteps, lr, maxsteps, warmup, nway, use_ib_negatives, distillation_alpha, ...)
    train:     settings of a colbert-jax run (seed, mesh, checkpointing, optimizer details, logging)

Command-line overrides are `key=value` pairs (`--set lr=1e-5 train.seed=1`): a bare key is looked up in
both sections (it must belong to exactly one), values are parsed as YAML scalars. An unknown key, section
or bad value is a `ConfigError` naming it. `checkpoint: default` means the packaged MiniLM model.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from colbert_jax import io
from colbert_jax.config import ColBERTConfig, ConfigError, _describe, load_config_file

__all__ = ["TrainConfig", "TrainSettings", "MeshSettings", "DEFAULT_LOGICAL_AXIS_RULES"]

# Logical parameter axes (colbert_jax/modeling) -> mesh axes. Attention heads and MLP units are split
# over `model` (tensor parallelism); the batch over `data`; embeddings and LayerNorms are replicated.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", "data"),
    ("heads", "model"),
    ("mlp", "model"),
    ("vocab", None),
    ("embed", None),
    ("proj", None),
    ("layers", None),
)


class MeshSettings(BaseModel):
    """Device mesh shape; -1 for `data` takes every device left over by `model`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    data: int = Field(-1, ge=-1)
    model: int = Field(1, ge=1)


class TrainSettings(BaseModel):
    """colbert-jax run settings (colbert-ai has no equivalent, or fixes them in code)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seed: int = 12345  # colbert-ai's training seed
    shuffle: bool = True  # colbert-ai reads examples in file order; we shuffle (seeded) unless told not to
    epochs: int = Field(1, ge=1)  # passes over the examples (colbert-ai: one; training stops when they run out)
    mesh: MeshSettings = MeshSettings()
    logical_axis_rules: tuple[tuple[str, str | None], ...] = DEFAULT_LOGICAL_AXIS_RULES
    dropout: bool = True  # colbert-ai trains with BERT's dropout on
    remat: bool = False  # recompute layer activations in the backward pass (less memory)
    max_grad_norm: float = Field(2.0, gt=0)  # colbert-ai's clip_grad_norm_
    weight_decay: float = Field(0.01, ge=0)  # torch AdamW's default, which colbert-ai uses
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    save_every: int | None = Field(500, gt=0)  # Orbax checkpoint every N steps (and at the end)
    keep_checkpoints: int = Field(3, gt=0)
    log_every: int = Field(1, gt=0)
    export: bool = True  # write the final model in the PyTorch ColBERTv2 layout to <out>/export
    peak_flops_per_device: float | None = Field(None, gt=0)  # for MFU; known GPUs are looked up
    tensorboard: bool = True  # also log to <out>/tensorboard when tensorboardX is installed


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    colbert: ColBERTConfig = ColBERTConfig()
    train: TrainSettings = TrainSettings()

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping with sections 'colbert' and 'train'")
        unknown = sorted(set(data) - {"colbert", "train"})
        if unknown:
            raise ConfigError(
                f"{source}: unknown section(s) {', '.join(map(repr, unknown))} (expected 'colbert' and 'train')"
            )
        colbert = ColBERTConfig.from_dict(data.get("colbert") or {}, source=f"{source} [colbert]")
        try:
            train = TrainSettings(**(data.get("train") or {}))
        except ValidationError as e:
            raise ConfigError(_describe(e, f"{source} [train]")) from None
        return cls(colbert=colbert, train=train)

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: list[str] | None = None) -> TrainConfig:
        """Loads a YAML/JSON config and applies `key=value` overrides."""
        data = load_config_file(path)
        data = {section: dict(values or {}) for section, values in data.items()}
        config = cls.from_dict(data, source=str(path))  # the file's own errors name the file
        for pair in overrides or []:  # and an override's errors name the override
            apply_override(data, pair)
            config = cls.from_dict(data, source=f"--set {pair}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return {"colbert": self.colbert.to_dict(), "train": self.train.model_dump(mode="json")}

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as YAML, atomically."""
        io.write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def apply_override(data: dict[str, dict], pair: str) -> None:
    """Applies one `key=value` override to the raw sections (a bare key must belong to one section)."""
    if "=" not in pair:
        raise ConfigError(f"override {pair!r} must look like key=value")
    key, raw = pair.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {pair!r}: the value is not a YAML scalar ({type(e).__name__})") from None
    if "." in key:
        section, name = key.split(".", 1)
        if section not in ("colbert", "train"):
            raise ConfigError(f"override {pair!r}: unknown section {section!r} (expected colbert or train)")
        if "." in name:  # nested train settings, e.g. train.mesh.model=2
            outer, inner = name.split(".", 1)
            data.setdefault(section, {}).setdefault(outer, {})[inner] = value
        else:
            data.setdefault(section, {})[name] = value
        return
    in_colbert = key in ColBERTConfig.model_fields
    in_train = key in TrainSettings.model_fields
    if in_colbert and in_train:
        raise ConfigError(f"override {pair!r}: {key!r} is ambiguous; write colbert.{key} or train.{key}")
    if not (in_colbert or in_train):
        raise ConfigError(f"override {pair!r}: unknown config key {key!r}")
    data.setdefault("colbert" if in_colbert else "train", {})[key] = value
