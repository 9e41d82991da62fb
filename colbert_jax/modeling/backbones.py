"""The backbone registry: `config.json`'s `model_type` -> our config class and Flax module.

As colbert-ai's `HF_ColBERT` class factory, the backbone is chosen by `model_type`, and its parameters
live under the backbone's `base_model_prefix` (`bert`, `roberta`, `electra`, `model`), which our
Flax tree mirrors. Configs that need remote code (`auto_map`) are refused: we cannot run their code.
"""

from __future__ import annotations

from typing import Any

from colbert_jax.modeling.bert import BertConfig, BertModel
from colbert_jax.modeling.electra import ElectraConfig, ElectraModel
from colbert_jax.modeling.modernbert import ModernBertConfig, ModernBertModel
from colbert_jax.modeling.roberta import RobertaConfig, RobertaModel

__all__ = ["BackboneConfig", "SUPPORTED_MODEL_TYPES", "backbone_config_from_hf", "backbone_module"]

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


def backbone_module(config: BackboneConfig, dtype, remat: bool = False):
    """The Flax module for `config`, named by the reference's attribute (`config.torch_prefix`)."""
    return _MODULES[type(config)](config, dtype, remat, name=config.torch_prefix)
