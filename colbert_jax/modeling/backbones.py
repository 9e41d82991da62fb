"""The backbone registry: `config.json`'s `model_type` -> our config class and Flax module.

As colbert-ai's `HF_ColBERT` class factory, the backbone is chosen by `model_type`, and its parameters
live under the backbone's `base_model_prefix` (`bert`, `roberta`, `electra`, `model`), which our
Flax tree mirrors. Configs that need remote code (`auto_map`) are refused: we cannot run their code.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from colbert_jax.modeling.bert import BertConfig, BertModel, unstack_layers
from colbert_jax.modeling.electra import ElectraConfig, ElectraModel
from colbert_jax.modeling.modernbert import ModernBertConfig, ModernBertModel
from colbert_jax.modeling.roberta import RobertaConfig, RobertaModel

__all__ = [
    "BackboneConfig",
    "SUPPORTED_MODEL_TYPES",
    "backbone_config_from_hf",
    "backbone_module",
    "supports_unstacked",
    "unstacked_params",
]

BackboneConfig = BertConfig | RobertaConfig | ElectraConfig | ModernBertConfig

_MODULES = {
    BertConfig: BertModel,
    RobertaConfig: RobertaModel,
    ElectraConfig: ElectraModel,
    ModernBertConfig: ModernBertModel,
}
_BY_TYPE = {t: cls for cls in _MODULES for t in cls.model_types}
SUPPORTED_MODEL_TYPES = tuple(_BY_TYPE)


def backbone_config_from_hf(d: dict[str, Any], *, source: str = "config.json") -> BackboneConfig:
    """Parses a Hugging Face `config.json` dict into the config of a supported backbone.

    Raises ValueError (naming `source` and the supported types) for anything else.
    """
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if d.get("auto_map"):
        raise ValueError(
            f"{source}: this model needs remote code (auto_map: {sorted(d['auto_map'])}), which colbert-jax "
            f"cannot run; supported: {supported}"
        )
    model_type = d.get("model_type", "bert")
    cls = _BY_TYPE.get(model_type)
    if cls is None:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {supported}")
    return cls.from_hf_dict(d, source=source)


def supports_unstacked(config: BackboneConfig) -> bool:
    """Whether the backbone can run with one module per layer (`bert._Encoder`; not ModernBERT)."""
    return "unstacked" in {f.name for f in dataclasses.fields(_MODULES[type(config)])}


def unstacked_params(config: BackboneConfig, params: dict) -> dict:
    """An encoder's parameters (the backbone under `config.torch_prefix`, the head beside it) in the layout of
    `backbone_module(..., unstacked=True)`."""
    return {**params, config.torch_prefix: unstack_layers(params[config.torch_prefix])}


def backbone_module(config: BackboneConfig, dtype, remat: bool = False, unstacked: bool = False):
    """The Flax module for `config`, named by the reference's attribute (`config.torch_prefix`); `unstacked`:
    one module per layer (inference; `supports_unstacked`)."""
    if not unstacked:
        return _MODULES[type(config)](config, dtype, remat, name=config.torch_prefix)
    if not supports_unstacked(config):
        raise ValueError(f"{type(config).__name__}: this backbone's layers cannot be unstacked")
    return _MODULES[type(config)](config, dtype, remat, unstacked=True, name=config.torch_prefix)
