"""The PyLate 1.6 / sentence-transformers checkpoint layout, read and written without torch.

A PyLate directory holds `modules.json` (a `Transformer` module, then one or more `Dense` modules),
the backbone as a Hugging Face model (`config.json`, `model.safetensors` with bare backbone names,
tokenizer files) at the Transformer's path, each `N_Dense/` with `config.json` (`in_features`,
`out_features`, `bias`, `activation_function`) and its `linear.weight` / `linear.bias`, plus
`config_sentence_transformers.json` (`query_prefix`, `document_prefix`, `query_length`,
`document_length`, `do_query_expansion`, `attend_to_expansion_tokens`, `skiplist_words`, similarity)
and `sentence_bert_config.json` (`do_lower_case`). Mirrors pylate 1.6.0 `pylate/models/colbert.py`.

Our model maps it as: prefixes -> `query_token_id` / `doc_token_id` (PyLate adds them as tokens, so they
are in the saved tokenizer), lengths -> `query_maxlen` / `doc_maxlen`, expansion attention ->
`attend_to_mask_tokens`, and one bias-free identity Dense -> colbert-ai's `linear`; any other stack of
Dense layers becomes the encoder's `head`.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from colbert_jax.tokenization import TextSettings

__all__ = ["NotColBERTError", "PylateCheckpoint", "PylateFormatError", "is_pylate_dir", "read_pylate", "write_pylate"]

MODULES = "modules.json"
ST_CONFIG = "config_sentence_transformers.json"
SBERT_CONFIG = "sentence_bert_config.json"
_ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}
_TORCH_ACTIVATIONS = {v: k for k, v in _ACTIVATIONS.items()}
_ARCHITECTURES = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "electra": "ElectraModel",
    "modernbert": "ModernBertModel",
}


class PylateFormatError(ValueError):
    """A PyLate directory that colbert-jax cannot represent faithfully."""


class NotColBERTError(PylateFormatError):
    """A sentence-transformers model that pools into one vector (no ColBERT head): a plain backbone to us."""


@dataclass
class PylateCheckpoint:
    backbone_dir: Path  # where config.json, the backbone weights and the tokenizer are
    head_state: dict[str, np.ndarray]  # `linear.weight`, or `dense_{i}.weight` / `.bias`
    head: tuple[tuple[int, bool, str], ...]  # () for colbert-ai's single bias-free `linear`
    config: dict[str, Any]  # ColBERTConfig keys
    text: TextSettings


def is_pylate_dir(directory: Path) -> bool:
    return (directory / MODULES).is_file()


def transformer_dir(directory: Path) -> Path:
    """Where a sentence-transformers directory keeps its Transformer module (usually the directory itself)."""
    modules = sorted(_json(directory / MODULES), key=lambda m: m.get("idx", 0))
    return directory / (modules[0].get("path", "") if modules else "")


def _json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PylateFormatError(f"{path}: {e}") from None


def _dense_weights(path: Path) -> dict[str, np.ndarray]:
    if (path / "model.safetensors").is_file():
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError, ValueError) as e:
            raise PylateFormatError(f"{path / 'model.safetensors'}: unreadable safetensors file: {e}") from None
    if (path / "pytorch_model.bin").is_file():
        from colbert_jax.torch_io import load_torch_file

        return load_torch_file(path / "pytorch_model.bin")
    raise PylateFormatError(f"{path}: no model.safetensors or pytorch_model.bin")


def read_pylate(directory: Path) -> PylateCheckpoint:
    """Reads a PyLate directory's module list, projection layers and settings (not the backbone weights)."""
    modules = sorted(_json(directory / MODULES), key=lambda m: m.get("idx", 0))
    if not modules or not str(modules[0].get("type", "")).endswith("models.Transformer"):
        raise PylateFormatError(f"{directory / MODULES}: the first module must be a sentence-transformers Transformer")
    backbone_dir = directory / modules[0].get("path", "")
    layers: list[tuple[int, int, bool, str, dict[str, np.ndarray]]] = []
    if any(str(m.get("type", "")).endswith("Pooling") for m in modules):
        raise NotColBERTError(f"{directory}: a sentence-transformers model with pooling, not a ColBERT model")
    for module in modules[1:]:
        kind = str(module.get("type", ""))
        if not kind.endswith("Dense"):
            raise PylateFormatError(
                f"{directory / MODULES}: module {kind!r} is not supported (a ColBERT model is a Transformer "
                "followed by Dense layers)"
            )
        path = directory / module["path"]
        cfg = _json(path / "config.json")
        activation = _ACTIVATIONS.get(cfg.get("activation_function", "torch.nn.modules.linear.Identity"))
        if activation is None:
            raise PylateFormatError(
                f"{path / 'config.json'}: activation {cfg['activation_function']!r} is not supported; "
                f"supported: {sorted(_ACTIVATIONS)}"
            )
        if cfg.get("use_residual"):
            raise PylateFormatError(f"{path / 'config.json'}: use_residual Dense layers are not supported")
        weights = _dense_weights(path)
        layers.append(
            (int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg.get("bias", True)), activation, weights)
        )
    if not layers:
        raise PylateFormatError(f"{directory}: no Dense projection module (a plain sentence-transformers model?)")

    if len(layers) == 1 and not layers[0][2] and layers[0][3] == "identity":
        head: tuple[tuple[int, bool, str], ...] = ()
        head_state = {"linear.weight": np.asarray(layers[0][4]["linear.weight"], np.float32)}
    else:
        head = tuple((out, bias, act) for _, out, bias, act, _ in layers)
        head_state = {}
        for i, (_, _, bias, _, w) in enumerate(layers, start=1):
            head_state[f"dense_{i}.weight"] = np.asarray(w["linear.weight"], np.float32)
            if bias:
                head_state[f"dense_{i}.bias"] = np.asarray(w["linear.bias"], np.float32)

    st = _json(directory / ST_CONFIG) if (directory / ST_CONFIG).is_file() else {}
    if st.get("similarity_fn_name") not in (None, "MaxSim"):
        raise PylateFormatError(f"{directory / ST_CONFIG}: similarity {st['similarity_fn_name']!r} is not MaxSim")
    if st.get("default_prompt_name"):
        raise PylateFormatError(f"{directory / ST_CONFIG}: default prompts are not supported")
    if not st.get("do_query_expansion", True):
        raise PylateFormatError(f"{directory / ST_CONFIG}: do_query_expansion=false is not supported")
    prefixes = (st.get("query_prefix", "[Q] "), st.get("document_prefix", "[D] "))
    if "" in prefixes:
        raise PylateFormatError(f"{directory / ST_CONFIG}: empty query/document prefixes are not supported")
    sbert = _json(backbone_dir / SBERT_CONFIG) if (backbone_dir / SBERT_CONFIG).is_file() else {}
    config = {
        "dim": layers[-1][1],
        "query_maxlen": int(st.get("query_length", 32)),
        "doc_maxlen": int(st.get("document_length", 180)),
        "attend_to_mask_tokens": bool(st.get("attend_to_expansion_tokens", False)),
        "query_token_id": prefixes[0],
        "doc_token_id": prefixes[1],
    }
    words = st.get("skiplist_words")
    text = TextSettings(
        pylate=True,
        lowercase=bool(sbert.get("do_lower_case", False)),
        skiplist_words=tuple(words if words is not None else string.punctuation),
    )
    return PylateCheckpoint(backbone_dir, head_state, head, config, text)


def _token_for(hf, name: str, token_id: int) -> str:
    """A token string whose vocabulary lookup gives `token_id`: `name` itself when it does (colbert-ai's
    `[unused0]`, PyLate's `[Q] `), else the vocabulary's own spelling (e.g. `<unk>` for a missing marker)."""
    return name if hf.get_vocab().get(name) == token_id else hf.convert_ids_to_tokens(token_id)


def write_pylate(out: Path, *, backbone_hf_config: dict, tensors: dict[str, np.ndarray], prefix: str, model) -> None:
    """Writes a PyLate directory for `model` (a `ColBERTModel`) into the empty directory `out`.

    `tensors` are `params_to_state_dict`'s names (`<prefix>.*`, `linear.weight` or `dense_{i}.*`).
    Marker and skiplist ids are written as the tokens PyLate looks up, so PyLate reproduces our ids.
    """
    from safetensors.numpy import save_file

    hf = model.hf_tokenizer
    config = model.config
    hf_config = {**backbone_hf_config, "architectures": [_ARCHITECTURES[backbone_hf_config["model_type"]]]}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    backbone = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
    save_file(backbone, str(out / "model.safetensors"), metadata={"format": "pt"})

    if "linear.weight" in tensors:
        layers = [({"linear.weight": tensors["linear.weight"]}, False, "identity")]
    else:
        layers = []
        for i, (_, bias, activation) in enumerate(model.head, start=1):
            w = {"linear.weight": tensors[f"dense_{i}.weight"]}
            if bias:
                w["linear.bias"] = tensors[f"dense_{i}.bias"]
            layers.append((w, bias, activation))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    for i, (weights, bias, activation) in enumerate(layers, start=1):
        path = out / f"{i}_Dense"
        path.mkdir()
        out_features, in_features = weights["linear.weight"].shape
        dense = {
            "in_features": int(in_features),
            "out_features": int(out_features),
            "bias": bias,
            "activation_function": _TORCH_ACTIVATIONS[activation],
            "use_residual": False,
        }
        (path / "config.json").write_text(json.dumps(dense, indent=4) + "\n")
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        modules.append({"idx": i, "name": str(i), "path": f"{i}_Dense", "type": "pylate.models.Dense.Dense"})
    (out / MODULES).write_text(json.dumps(modules, indent=2) + "\n")

    q, d = model.query_tokenizer, model.doc_tokenizer
    if not config.mask_punctuation:  # PyLate's way to mask nothing (our layout's setting has no key here)
        skiplist = []
    elif model.text.skiplist_words is not None:
        skiplist = list(model.text.skiplist_words)
    else:  # our ids as the tokens whose vocabulary lookup gives them back
        skiplist = [hf.convert_ids_to_tokens(int(i)) for i in d.skiplist]
    st = {
        "model_type": "ColBERT",
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "MaxSim",
        "query_prefix": _token_for(hf, config.query_token_id, q.query_marker_id),
        "document_prefix": _token_for(hf, config.doc_token_id, d.doc_marker_id),
        "query_length": config.query_maxlen,
        "document_length": config.doc_maxlen,
        "attend_to_expansion_tokens": config.attend_to_mask_tokens,
        "skiplist_words": skiplist,
        "do_query_expansion": True,
        "exported_by": "colbert-jax",
    }
    (out / ST_CONFIG).write_text(json.dumps(st, indent=2) + "\n")
    sbert = {"max_seq_length": max(config.doc_maxlen, config.query_maxlen), "do_lower_case": model.text.lowercase}
    (out / SBERT_CONFIG).write_text(json.dumps(sbert, indent=4) + "\n")
