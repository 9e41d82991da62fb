"""ColBERT configuration: the reference's parameter names and defaults, validated.

Field names and defaults mirror colbert-ai 0.2.22 `colbert/infra/config/settings.py` for every setting
colbert-jax supports. A `ColBERTConfig` is immutable; `replace(**overrides)` makes a validated copy.
Files are JSON or YAML (by suffix). User-written files are strict: an unknown key or a bad value raises
`ConfigError` naming the key. Reference files (`artifact.metadata`, index `metadata.json`) are read with
`from_reference_dict`, which drops the reference's run settings it has no use for, like colbert-ai does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["ColBERTConfig", "ConfigError", "load_config_file"]


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid."""


# Reference settings that exist in colbert-ai but have no meaning here (runs, GPUs, rerankers).
# They are accepted and dropped when reading reference files, never when reading a user's config.
REFERENCE_ONLY_KEYS = frozenset(
    {
        "overwrite",
        "root",
        "experiment",
        "index_root",
        "name",
        "rank",
        "nranks",
        "amp",
        "gpus",
        "avoid_fork_if_possible",
        "total_visible_gpus",
        "save_every",
        "meta",
    }
)


class ColBERTConfig(BaseModel):
    """Settings of a ColBERT model, its index and its search, with colbert-ai's names and defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # Tokenizer settings: the marker ids reuse these vocabulary tokens.
    query_token_id: str = "[unused0]"
    doc_token_id: str = "[unused1]"
    query_token: str = "[Q]"
    doc_token: str = "[D]"

    # Resources.
    checkpoint: str | None = None
    triples: str | None = None
    collection: str | None = None
    queries: str | None = None
    index_name: str | None = None

    # Documents and queries.
    dim: int = Field(128, gt=0)
    doc_maxlen: int = Field(220, ge=4, le=512)
    mask_punctuation: bool = True
    query_maxlen: int = Field(32, ge=4, le=512)
    attend_to_mask_tokens: bool = False
    interaction: Literal["colbert"] = "colbert"

    # Training.
    similarity: Literal["cosine", "l2"] = "cosine"
    bsize: int = Field(32, gt=0)
    accumsteps: int = Field(1, gt=0)
    lr: float = Field(3e-6, gt=0)
    maxsteps: int = Field(500_000, gt=0)
    resume: bool = False
    warmup: int | None = Field(None, ge=0)
    warmup_bert: int | None = Field(None, ge=0)
    relu: Literal[False] = False
    nway: int = Field(2, ge=1)
    use_ib_negatives: bool = False
    reranker: Literal[False] = False
    distillation_alpha: float = 1.0
    ignore_scores: bool = False
    model_name: str | None = None

    # Indexing.
    index_path: str | None = None
    index_bsize: int = Field(64, gt=0)
    nbits: Literal[1, 2, 4, 8] = 1
    kmeans_niters: int = Field(4, gt=0)
    pool_factor: Literal[1] = 1
    clustering_mode: Literal["hierarchical"] = "hierarchical"
    protected_tokens: int = Field(0, ge=0)

    # Search (None: chosen from k as colbert-ai's searcher does).
    ncells: int | None = Field(None, gt=0)
    centroid_score_threshold: float | None = None
    ndocs: int | None = Field(None, gt=0)
    load_index_with_mmap: bool = False

    # colbert-jax only: dtype of the encoder's matmuls (parameters stay float32).
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # colbert-jax only: "int8" encodes queries with two-term int8 dense layers (`colbert_jax.modeling.quantize`),
    # "bf16" the float32 encoder with every dense product on bfloat16 operands (`native.dense_bf16`; CPUs, BERT
    # family), "int16" the same on int16 operands (`native.dense_int16`; closer to float32), "none" in float32
    # (colbert-ai's numbers). "auto" (the default): the fastest of those holding the quality bar (overlap@10 with
    # float32's rankings at least 0.99: not "bf16") on this CPU by its measured rates
    # (`native.query_products_by_speed()`): int8 where its products run on AMX tiles; else "int16" or int8 on
    # AVX-512 VNNI well above float32's rate, whichever costs least per weight; else float32 (other CPUs,
    # accelerators). int8 only for backbones whose int8 encoder is batch-invariant (BERT, RoBERTa, XLM-RoBERTa,
    # ELECTRA: a query's embedding is the same bits at every batch size and device count), "int16" only for the
    # BERT family's native float32 encoder.
    query_quantization: Literal["auto", "none", "int8", "bf16", "int16"] = "auto"

    def __init__(self, **data: Any):
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(_describe(e, "config")) from None

    @model_validator(mode="after")
    def _check_codec_dims(self) -> ColBERTConfig:
        if self.dim % (8 * self.nbits) != 0:
            raise ValueError(f"dim={self.dim} must be a multiple of 8*nbits={8 * self.nbits} for bit packing")
        return self

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> ColBERTConfig:
        """Builds a config from a dict; unknown keys and bad values raise `ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"{source}: config keys are names, got {bad[0]!r}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config: ", f"{source}: ", 1)) from None

    @classmethod
    def from_reference_dict(cls, data: dict[str, Any], *, source: str = "reference config") -> ColBERTConfig:
        """Reads a colbert-ai config dict (artifact.metadata, metadata.json, plan.json).

        Like the reference, a top-level "config" key is unwrapped and keys unknown to us are ignored,
        but values for keys we do know are still validated.
        """
        if "config" in data and isinstance(data["config"], dict):
            data = data["config"]
        known = {k: v for k, v in data.items() if k in cls.model_fields and v is not None}
        return cls.from_dict(known, source=source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ColBERTConfig:
        """Loads a strict config file (.json, .yaml or .yml)."""
        return cls.from_dict(load_config_file(path), source=str(path))

    def replace(self, **overrides: Any) -> ColBERTConfig:
        """Returns a validated copy with `overrides` applied (unknown keys raise `ConfigError`)."""
        return self.from_dict({**self.to_dict(), **overrides}, source="overrides")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as JSON or YAML (by suffix), atomically."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=4) + "\n"
        from colbert_jax import io  # (io loads TensorStore: not for every config import)

        io.write_text(path, text)

    def to_reference_dict(self) -> dict[str, Any]:
        """The config in colbert-ai's flat `artifact.metadata` form (our own extras left out)."""
        d = self.to_dict()
        d.pop("compute_dtype")
        d.pop("query_quantization")
        return d


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a JSON or YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(config)"
        if item["type"] == "extra_forbidden":
            hint = " (a colbert-ai run setting colbert-jax does not use)" if key in REFERENCE_ONLY_KEYS else ""
            lines.append(f"unknown config key '{key}'{hint}")
        else:
            lines.append(f"bad value for '{key}': {item['msg']} (got {item.get('input')!r})")
    return f"{source}: " + "; ".join(lines)
