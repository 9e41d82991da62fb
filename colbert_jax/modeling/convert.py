"""PyTorch ColBERT state dicts <-> our Flax params, by rule, for every backbone.

Reference names (colbert-ai `HF_ColBERT`): `<prefix>.<backbone tensors>` and `linear.weight` [dim, hidden],
where `<prefix>` is the backbone's `base_model_prefix` (`bert`, `roberta`, `electra`, `model`). Our Flax
tree uses the same module names, so:
- `<module>.weight` of a Linear -> `<module>/kernel`, transposed; of a LayerNorm -> `scale`; of an
  Embedding -> `embedding` (which one is read off the expected tree); `.bias` -> `bias`;
- per-layer tensors `<prefix>.encoder.layer.{i}.<rest>` (BERT-like) or `<prefix>.layers.{i}.<rest>`
  (ModernBERT) are stacked on a leading axis under `<prefix>/encoder/layer/<rest>` or `<prefix>/layers/<rest>`;
- a bare backbone's names (`embeddings.*`, `encoder.*`, `layers.*`, ...; a Hub or sentence-transformers
  model) get the prefix; pretraining heads (`cls.*`, `lm_head.*`, `head.*`, ...) are ignored.
The pooler is not part of the forward pass; it is carried through import/export untouched ("extras").
ModernBERT's layer 0 has no `attn_norm`: import fills our unused slot with identity values, export drops it.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import traverse_util

__all__ = ["state_dict_to_params", "params_to_state_dict", "CheckpointFormatError"]

_LAYER = re.compile(r"^(?P<prefix>\w+)\.(?P<container>encoder\.layer|layers)\.(?P<i>\d+)\.(?P<rest>.+)$")
_STACKED = re.compile(r"^\w+/(encoder/layer|layers)/")
_BARE_ROOTS = ("embeddings.", "encoder.", "pooler.", "layers.", "final_norm.", "embeddings_project.")
_HEADS = ("cls.", "lm_head.", "head.", "decoder.", "discriminator_predictions.", "generator_predictions.")
_NO_FIRST_LAYER = "/layers/attn_norm/"  # ModernBERT's layer 0 uses nn.Identity here


class CheckpointFormatError(ValueError):
    """A checkpoint's tensors do not fit the model its config describes."""


def _prefix(expected: dict) -> str:
    return next(k.split("/")[0] for k in expected if _STACKED.match(k))


def _canonical_key(key: str, prefix: str) -> str | None:
    """Maps a stored name to the `<prefix>.` / `linear.` scheme; None for tensors to ignore."""
    key = key.removeprefix("module.")  # DistributedDataParallel checkpoints
    key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
    if key.startswith(_BARE_ROOTS):
        key = f"{prefix}.{key}"
    if key.startswith(_HEADS) or key.endswith(("position_ids", "token_type_ids")):
        return None
    return key


def _leaf_name(module_path: str, param: str, expected: dict) -> tuple[str, bool]:
    """(flax leaf name, transpose?) for a torch parameter of the module at `module_path`."""
    if param == "bias":
        return "bias", False
    for leaf in ("kernel", "scale", "embedding"):
        if f"{module_path}/{leaf}" in expected:
            return leaf, leaf == "kernel"
    return param, False  # not in our tree: reported as unexpected


def state_dict_to_params(state: dict[str, np.ndarray], abstract_params) -> tuple[dict, dict[str, np.ndarray]]:
    """Converts a PyTorch ColBERT state dict to our params tree.

    Args:
      state: tensor name -> array, as stored (float32/float16/bfloat16 are cast to float32).
      abstract_params: the expected tree (e.g. from `jax.eval_shape(module.init, ...)`), used to pick the
        backbone prefix, to check every shape and to report missing or unexpected tensors by name.
    Returns:
      (params, extras): params as numpy float32 arrays; extras are stored tensors outside the forward
      pass (the pooler), kept so that export writes them back.
    """
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_params, sep="/").items()}
    prefix = _prefix(expected)
    n_layers = next(s[0] for k, s in expected.items() if _STACKED.match(k))
    flat: dict[str, np.ndarray] = {}
    layered: dict[str, dict[int, np.ndarray]] = {}
    extras: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}

    for raw_key, value in state.items():
        key = _canonical_key(raw_key, prefix)
        if key is None:
            continue
        if key.startswith(f"{prefix}.pooler."):
            extras[key] = np.asarray(value)
            continue
        value = np.asarray(value, dtype=np.float32)
        m = _LAYER.match(key)
        if m:
            *modules, param = m.group("rest").split(".")
            module_path = "/".join([m.group("prefix"), *m.group("container").split("."), *modules])
            name, transpose = _leaf_name(module_path, param, expected)
            layered.setdefault(f"{module_path}/{name}", {})[int(m.group("i"))] = value.T if transpose else value
            origin[f"{module_path}/{name}"] = raw_key
        else:
            *modules, param = key.split(".")
            module_path = "/".join(modules)
            name, transpose = _leaf_name(module_path, param, expected)
            flat[f"{module_path}/{name}"] = value.T if transpose else value
            origin[f"{module_path}/{name}"] = raw_key

    for path in expected:
        if _NO_FIRST_LAYER in path and 0 not in layered.get(path, {}):
            width = expected[path][-1]
            layered.setdefault(path, {})[0] = np.full(width, 1.0 if path.endswith("scale") else 0.0, np.float32)
            origin.setdefault(path, _torch_name(path).replace("{i}", "0"))
    for path, per_layer in layered.items():
        if sorted(per_layer) != list(range(n_layers)):
            missing = sorted(set(range(n_layers)) - set(per_layer))
            if not missing:  # more layers than the config says
                raise CheckpointFormatError(
                    f"checkpoint has layers {sorted(per_layer)} of {origin[path]}, its config.json says "
                    f"{n_layers} (num_hidden_layers): the config is not the weights'"
                )
            names = [_LAYER.sub(rf"\g<prefix>.\g<container>.{i}.\g<rest>", origin[path]) for i in missing]
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
            stacked = _STACKED.match(path) is not None
            got = flat[path].shape[::-1] if path.endswith("kernel") and not stacked else flat[path].shape
            want = tuple(shape)[::-1] if path.endswith("kernel") and not stacked else tuple(shape)
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
        m = _STACKED.match(path)
        if m:
            head = path[: m.end()].rstrip("/").replace("/", ".")
            rest = ".".join(path[m.end() :].split("/")[:-1])
            first = 1 if _NO_FIRST_LAYER in path else 0
            for i in range(first, value.shape[0]):
                v = value[i].T if transpose else value[i]
                out[f"{head}.{i}.{rest}.{param}"] = np.ascontiguousarray(v)
        else:
            out[".".join(modules) + "." + param] = np.ascontiguousarray(value.T if transpose else value)
    for k, v in (extras or {}).items():
        out[k] = np.ascontiguousarray(v)
    return out


def _torch_name(path: str) -> str:
    *modules, leaf = path.split("/")
    name = ".".join(modules)
    name = re.sub(r"^(\w+)\.(encoder\.layer|layers)\.", r"\1.\2.{i}.", name)
    return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"
