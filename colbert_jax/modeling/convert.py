"""PyTorch ColBERT state dicts <-> our Flax params, by rule.

Reference names (colbert-ai `HF_ColBERT`): `bert.embeddings.*`, `bert.encoder.layer.{i}.*`,
`bert.pooler.*` (unused), `linear.weight` [dim, hidden]. Our Flax tree uses the same module names, so:
- `<module>.weight` of a Linear -> `<module>/kernel`, transposed; of a LayerNorm -> `scale`;
  of an Embedding -> `embedding`; `.bias` -> `bias`;
- per-layer tensors `encoder.layer.{i}.<rest>` are stacked on a leading axis under `encoder/layer/<rest>`.
The pooler is not part of the forward pass; it is carried through import/export untouched ("extras").
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import traverse_util

__all__ = ["state_dict_to_params", "params_to_state_dict", "CheckpointFormatError"]

_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.+)$")


class CheckpointFormatError(ValueError):
    """A checkpoint's tensors do not fit the model its config describes."""


def _canonical_key(key: str) -> str | None:
    """Maps a stored name to the `bert.` / `linear.` scheme; None for tensors to ignore."""
    key = key.removeprefix("module.")  # DistributedDataParallel checkpoints
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith(("embeddings.", "encoder.", "pooler.")):  # a plain BertModel (e.g. MiniLM)
        key = "bert." + key
    if key.startswith("cls.") or key.endswith("position_ids") or key.endswith("token_type_ids"):
        return None
    return key


def _leaf_name(module: str, param: str) -> tuple[str, bool]:
    """(flax leaf name, transpose?) for a torch parameter of `module`."""
    if param == "bias":
        return "bias", False
    if module == "LayerNorm":
        return "scale", False
    if module.endswith("_embeddings"):
        return "embedding", False
    return "kernel", True


def state_dict_to_params(state: dict[str, np.ndarray], abstract_params) -> tuple[dict, dict[str, np.ndarray]]:
    """Converts a PyTorch ColBERT state dict to our params tree.

    Args:
      state: tensor name -> array, as stored (float32/float16/bfloat16 are cast to float32).
      abstract_params: the expected tree (e.g. from `jax.eval_shape(module.init, ...)`), used to check
        every shape and to report missing or unexpected tensors by name.
    Returns:
      (params, extras): params as numpy float32 arrays; extras are stored tensors outside the forward
      pass (the pooler), kept so that export writes them back.
    """
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_params, sep="/").items()}
    n_layers = next(s[0] for k, s in expected.items() if "/encoder/layer/" in k)
    flat: dict[str, np.ndarray] = {}
    layered: dict[str, dict[int, np.ndarray]] = {}
    extras: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}

    for raw_key, value in state.items():
        key = _canonical_key(raw_key)
        if key is None:
            continue
        if key.startswith("bert.pooler."):
            extras[key] = np.asarray(value)
            continue
        value = np.asarray(value, dtype=np.float32)
        *modules, param = key.split(".")
        name, transpose = _leaf_name(modules[-1], param)
        value = value.T if transpose else value
        m = _LAYER.match(key)
        if m:
            path = "bert/encoder/layer/" + "/".join(m.group(2).split(".")[:-1]) + "/" + name
            layered.setdefault(path, {})[int(m.group(1))] = value
        else:
            path = "/".join(modules) + "/" + name
            flat[path] = value
        origin[path] = raw_key

    for path, per_layer in layered.items():
        if sorted(per_layer) != list(range(n_layers)):
            missing = sorted(set(range(n_layers)) - set(per_layer))
            names = [_LAYER.sub(rf"bert.encoder.layer.{i}.\2", origin[path]) for i in missing] or ["-"]
            raise CheckpointFormatError(
                f"checkpoint is missing tensor(s) {', '.join(names)}: expected layers 0..{n_layers - 1}, "
                f"found {sorted(per_layer)}"
            )
        flat[path] = np.stack([per_layer[i] for i in range(n_layers)])

    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    if missing:
        raise CheckpointFormatError(f"checkpoint is missing tensors for: {', '.join(_torch_name(p) for p in missing)}")
    if unexpected:
        raise CheckpointFormatError(f"checkpoint has unexpected tensors: {', '.join(origin[p] for p in unexpected)}")
    for path, shape in expected.items():
        if flat[path].shape != tuple(shape):
            got = flat[path].shape[::-1] if path.endswith("kernel") and "layer" not in path else flat[path].shape
            want = tuple(shape)[::-1] if path.endswith("kernel") and "layer" not in path else tuple(shape)
            what = "wrong projection shape" if path == "linear/kernel" else "wrong shape"
            raise CheckpointFormatError(
                f"{what}: tensor {origin[path]!r} has shape {tuple(got)}, the config expects {want}"
            )
    return traverse_util.unflatten_dict(flat, sep="/"), extras


def params_to_state_dict(params, extras: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Inverse of `state_dict_to_params`: our params -> PyTorch ColBERT tensor names (float32, contiguous)."""
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(jax.device_get(params), sep="/").items():
        value = np.asarray(value, dtype=np.float32)
        *modules, leaf = path.split("/")
        param = "bias" if leaf == "bias" else "weight"
        transpose = leaf == "kernel"
        if path.startswith("bert/encoder/layer/"):
            rest = ".".join(modules[3:])
            for i in range(value.shape[0]):
                v = value[i].T if transpose else value[i]
                out[f"bert.encoder.layer.{i}.{rest}.{param}"] = np.ascontiguousarray(v)
        else:
            out[".".join(modules) + "." + param] = np.ascontiguousarray(value.T if transpose else value)
    for k, v in (extras or {}).items():
        out[k] = np.ascontiguousarray(v)
    return out


def _torch_name(path: str) -> str:
    *modules, leaf = path.split("/")
    name = ".".join(modules).replace("encoder.layer", "encoder.layer.{i}")
    return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"
