"""Import and export of PyTorch ColBERTv2 checkpoints (the Hugging Face directory layout).

Two layouts, both with `config.json` (the BERT backbone) and the tokenizer files:
- "torch", as colbert-ai 0.2.22 `BaseColBERT.save` writes it: `model.safetensors` or `pytorch_model.bin`
  (tensors `bert.*` and `linear.weight` [dim, hidden]) and `artifact.metadata` (the ColBERT config).
  `pytorch_model.bin` is read with our restricted unpickler (`torch_io.py`): no torch, no pickled code.
- "jax", ours: `params.safetensors` (our Flax tree, keys like `bert/encoder/layer/.../kernel`, layers
  stacked) and `colbert_config.json` (the full `ColBERTConfig`, with our own keys).
As in the reference, the checkpoint's own settings apply, and caller overrides win over them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from colbert_jax import io
from colbert_jax.config import ColBERTConfig
from colbert_jax.model import ColBERTModel
from colbert_jax.modeling import pylate_layout
from colbert_jax.modeling.backbones import backbone_config_from_hf
from colbert_jax.modeling.colbert import ColBERTEncoder
from colbert_jax.modeling.convert import CheckpointFormatError, params_to_state_dict, state_dict_to_params
from colbert_jax.tokenization import TextSettings, load_hf_tokenizer
from colbert_jax.torch_io import TorchFileError, load_torch_file

__all__ = [
    "load_checkpoint",
    "save_checkpoint",
    "resolve_checkpoint",
    "is_own_checkpoint",
    "CheckpointError",
    "CheckpointFormatError",
]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
JAX_PARAMS = "params.safetensors"
JAX_CONFIG = "colbert_config.json"
JAX_SETTINGS = "model_settings.json"  # the projection head and text conventions, when not colbert-ai's
FORMATS = ("torch", "jax", "pylate")
_TEXT_META = "colbert_jax_text"
_EXTRAS = "extras/"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
)


logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be found or read."""


_HUB_PATTERNS = [
    "*.json",  # fnmatch: also N_Dense/config.json
    "*.safetensors",
    "pytorch_model.bin",
    "*/pytorch_model.bin",
    "*.txt",
    "*.model",
    "artifact.metadata",
]


def _hub_cache_dir() -> str | None:
    """The Hugging Face cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a Hugging Face Hub repo id resolved through huggingface_hub's cache.

    With `HF_HUB_OFFLINE=1` only the cache is used (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    `~/.cache/huggingface/hub`): a name missing there is an error, and nothing touches the network.
    """
    path = Path(path_or_name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"checkpoint must be a directory, got a file: {path}")
        return path.absolute()  # recorded in indexes and configs: must hold from any working directory
    name = str(path_or_name)
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(f"checkpoint directory not found: {path}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=name, allow_patterns=_HUB_PATTERNS, cache_dir=_hub_cache_dir(), local_files_only=offline
        )
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        why = (
            "HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache"
            if offline
            else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        raise CheckpointError(
            f"checkpoint {name!r} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({why}). Offline? Copy the checkpoint directory to this machine and pass its path."
        ) from None
    return Path(local).absolute()


def _read_state_dict(directory: Path) -> dict[str, np.ndarray]:
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".safetensors"):
            return _load_safetensors(path)
        try:
            state = load_torch_file(path)
        except TorchFileError as e:
            raise CheckpointError(str(e)) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
            raise CheckpointError(f"{path}: expected a state dict of tensors")
        return state
    raise CheckpointError(f"{directory}: no weight file ({' or '.join(WEIGHT_FILES)})")


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors; a truncated or damaged file is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name} (not a complete checkpoint)") from None


def _has_projection(state: dict[str, np.ndarray]) -> bool:
    return any(k == "linear.weight" or k.endswith(".linear.weight") for k in state)


def load_checkpoint(
    path_or_name: str | os.PathLike,
    config: ColBERTConfig | None = None,
    *,
    init_projection: int | None = None,
    projection_seed: int = 0,
    **overrides,
) -> ColBERTModel:
    """Loads a ColBERT checkpoint (local directory or Hub repo id) into a `ColBERTModel`.

    The backbone is chosen by `config.json`'s `model_type` (`bert`, `roberta`, `xlm-roberta`, `electra`,
    `modernbert`). Config precedence, as in colbert-ai: defaults < the checkpoint's `artifact.metadata`
    < `config` (its explicitly set fields) < `overrides` (config keys, e.g. `doc_maxlen=180`).

    A directory without a ColBERT projection (`linear.weight`), such as a plain Hugging Face backbone, is
    an error unless `init_projection=dim` asks for a fresh one: then `linear.weight` [dim, hidden] is drawn
    from normal(0, initializer_range) by numpy's PCG64 with `projection_seed` (logged), and `dim` becomes
    the config's. `init_projection` is ignored when the checkpoint has a projection.
    """
    directory = resolve_checkpoint(path_or_name)
    pylate, backbone_dir = None, directory
    if pylate_layout.is_pylate_dir(directory):
        try:
            pylate = pylate_layout.read_pylate(directory)
            backbone_dir = pylate.backbone_dir
        except pylate_layout.NotColBERTError:  # e.g. all-MiniLM-L6-v2: its Transformer is a plain backbone
            backbone_dir = pylate_layout.transformer_dir(directory)
        except (pylate_layout.PylateFormatError, TorchFileError) as e:
            raise CheckpointError(str(e)) from None
    if not (backbone_dir / "config.json").is_file():
        raise CheckpointError(f"{backbone_dir}: missing config.json (the backbone's configuration)")
    try:
        bert_config = backbone_config_from_hf(
            _read_json(backbone_dir / "config.json"), source=str(backbone_dir / "config.json")
        )
    except ValueError as e:
        raise CheckpointError(str(e)) from None

    is_jax = (directory / JAX_PARAMS).is_file()
    state = None if is_jax else _read_state_dict(backbone_dir)
    if pylate:
        state = {**state, **pylate.head_state}
    fresh_projection = state is not None and pylate is None and not _has_projection(state)
    if fresh_projection and init_projection is None:
        raise CheckpointError(
            f"{directory}: no ColBERT projection (linear.weight) in the checkpoint: it looks like a plain "
            f"{bert_config.model_types[0]} backbone, not a ColBERT model. To start from it, ask for a fresh random "
            "projection: load_checkpoint(path, init_projection=128) (command line: --init-projection 128)."
        )

    head, text = (pylate.head, pylate.text) if pylate else ((), TextSettings())
    meta_path = directory / (JAX_CONFIG if is_jax else "artifact.metadata")
    if is_jax:
        base = ColBERTConfig.from_dict(_read_json(meta_path), source=str(meta_path))
        if (directory / JAX_SETTINGS).is_file():
            settings = _read_json(directory / JAX_SETTINGS)
            head = tuple(tuple(layer) for layer in settings.get("head", ()))
            text = TextSettings.from_dict(settings.get("text", {}))
    elif pylate:
        base = ColBERTConfig().replace(**pylate.config)
    elif meta_path.is_file():
        reference = _read_json(meta_path)
        base = ColBERTConfig.from_reference_dict(reference, source=str(meta_path))
        meta = reference.get("meta")
        if isinstance(meta, dict) and isinstance(meta.get(_TEXT_META), dict):
            text = TextSettings.from_dict(meta[_TEXT_META])
    else:
        base = ColBERTConfig()
    explicit = config.model_dump(exclude_unset=True) if config is not None else {}
    if fresh_projection:
        explicit["dim"] = init_projection
    colbert_config = base.replace(**{**explicit, **overrides, "checkpoint": str(directory)})
    if fresh_projection and colbert_config.dim != init_projection:
        raise CheckpointError(f"init_projection={init_projection} conflicts with dim={colbert_config.dim}")
    if text.pylate and hasattr(bert_config, "masked_rows_attend_nothing"):
        bert_config = dataclasses.replace(bert_config, masked_rows_attend_nothing=True)  # transformers 5's masking
    if head and head[-1][0] != colbert_config.dim:
        raise CheckpointError(f"{directory}: the projection layers give dim={head[-1][0]}, not {colbert_config.dim}")
    limit = bert_config.max_length
    if colbert_config.doc_maxlen > limit or colbert_config.query_maxlen > limit:
        raise CheckpointError(f"doc_maxlen/query_maxlen exceed the model's maximum input length ({limit})")

    module = ColBERTEncoder(bert_config, colbert_config.dim, head=head)
    abstract = abstract_params(module)
    if is_jax:
        params, extras = _read_jax_params(directory / JAX_PARAMS, abstract)
    else:
        if fresh_projection:
            shape = (colbert_config.dim, bert_config.hidden_size)
            rng = np.random.default_rng(projection_seed)
            projection = rng.normal(0.0, bert_config.initializer_range, shape).astype(np.float32)
            state = {**state, "linear.weight": projection}
            logger.warning(
                "%s has no ColBERT projection: initialised linear.weight %s from normal(0, %g) with seed %d "
                "(numpy PCG64), as init_projection asked",
                directory,
                shape,
                bert_config.initializer_range,
                projection_seed,
            )
        params, extras = state_dict_to_params(state, abstract)

    if not any((backbone_dir / f).is_file() for f in ("tokenizer_config.json", "vocab.txt", "tokenizer.json")):
        raise CheckpointError(f"{backbone_dir}: no tokenizer files (tokenizer.json, vocab.txt, tokenizer_config.json)")
    hf_tokenizer = load_hf_tokenizer(backbone_dir)
    if len(hf_tokenizer) > bert_config.vocab_size:
        raise CheckpointError(
            f"{backbone_dir}: tokenizer has {len(hf_tokenizer)} tokens but the model's vocab_size "
            f"is {bert_config.vocab_size}"
        )
    if pylate:
        for prefix in (colbert_config.query_token_id, colbert_config.doc_token_id):
            if hf_tokenizer.convert_tokens_to_ids(prefix) in (None, hf_tokenizer.unk_token_id) and (
                prefix != hf_tokenizer.unk_token
            ):
                raise CheckpointError(
                    f"{directory}: prefix {prefix!r} is not in the tokenizer (PyLate would add it with a "
                    "random embedding); save the model with PyLate first"
                )
    tokenizer_files = {f: (backbone_dir / f).read_bytes() for f in TOKENIZER_FILES if (backbone_dir / f).is_file()}
    return ColBERTModel(
        colbert_config,
        bert_config,
        params,
        hf_tokenizer,
        extras=extras,
        tokenizer_files=tokenizer_files,
        head=head,
        text=text,
    )


def _read_jax_params(path: Path, abstract) -> tuple[dict, dict[str, np.ndarray]]:
    from flax import traverse_util

    flat = _load_safetensors(path)
    extras = {k[len(_EXTRAS) :]: v for k, v in flat.items() if k.startswith(_EXTRAS)}
    flat = {k: v for k, v in flat.items() if not k.startswith(_EXTRAS)}
    expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
    if set(flat) != set(expected):
        missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
        raise CheckpointFormatError(f"{path}: missing params {missing}, unexpected params {unexpected}")
    for k, shape in expected.items():
        if flat[k].shape != shape:
            raise CheckpointFormatError(f"{path}: param {k} has shape {flat[k].shape}, the config expects {shape}")
    return traverse_util.unflatten_dict(flat, sep="/"), extras


def abstract_params(module: ColBERTEncoder):
    """Shapes and dtypes of `module`'s params, without allocating them."""
    from flax.core import meta

    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids))["params"]
    return meta.unbox(shapes)


def is_own_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` is a checkpoint that colbert-jax wrote (either layout)."""
    directory = Path(directory)
    if (directory / JAX_PARAMS).is_file() and (directory / JAX_CONFIG).is_file():
        return True
    if pylate_layout.is_pylate_dir(directory):
        try:
            return json.loads((directory / pylate_layout.ST_CONFIG).read_text()).get("exported_by") == "colbert-jax"
        except (OSError, ValueError, AttributeError):
            return False
    try:
        meta = json.loads((directory / "artifact.metadata").read_text())
        return meta.get("meta", {}).get("exported_by") == "colbert-jax"
    except (OSError, ValueError, AttributeError):
        return False


def save_checkpoint(
    model: ColBERTModel, directory: str | os.PathLike, *, format: str = "torch", overwrite: bool = False
) -> Path:
    """Writes `model` as a checkpoint directory, atomically (temp dir + rename).

    format="torch" (default) is the PyTorch ColBERTv2 layout that colbert-ai (`Checkpoint(directory)`),
    PyLate and transformers load: `config.json`, `model.safetensors` (float32 `<backbone>.*`, `linear.weight`),
    `artifact.metadata`, tokenizer files. format="pylate" writes PyLate 1.6's sentence-transformers layout
    (`colbert_jax/modeling/pylate_layout.py`); format="jax" our own (see the module docstring).
    """
    from flax import traverse_util

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "torch" and model.head:
        raise CheckpointError(
            f"colbert-ai's layout has one bias-free projection; this model has {len(model.head)} projection "
            "layers (with biases or activations): save it as pylate or jax"
        )
    if format == "pylate" and model.config.similarity != "cosine":
        raise CheckpointError(
            f"PyLate scores by MaxSim of cosines only; this model has similarity={model.config.similarity!r}, "
            "which its layout cannot record: save it as torch or jax"
        )
    directory = Path(directory)
    io.check_target(directory, overwrite=overwrite, what="checkpoint written by colbert-jax", is_ours=is_own_checkpoint)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = io.work_dir(directory)
    try:
        config = model.config.replace(checkpoint=str(directory.resolve()))
        if format == "pylate":
            if not model.text.pylate:
                logger.warning(
                    "PyLate strips texts and looks its skiplist up by token: texts with leading or trailing "
                    "whitespace encode differently from this colbert-ai-style model"
                )
            tensors = params_to_state_dict(model.params, model.extras)
            pylate_layout.write_pylate(
                tmp,
                backbone_hf_config=model.bert_config.to_hf_dict(),
                tensors=tensors,
                prefix=model.bert_config.torch_prefix,
                model=model,
            )
        else:
            (tmp / "config.json").write_text(json.dumps(model.bert_config.to_hf_dict(), indent=2) + "\n")
        if format == "torch":
            if model.text.pylate:
                pads_with_mask = model.doc_tokenizer.pad_id == model.doc_tokenizer.mask_id
                logger.warning(
                    "colbert-ai reads none of this PyLate model's text conventions (stripping, lowercasing, "
                    "its skiplist by token)"
                    + (
                        ", and its tokenizer pads with [MASK]: colbert-ai zeroes the query expansion embeddings"
                        if pads_with_mask
                        else ""
                    )
                    + ": colbert-jax reloads it as it is, but colbert-ai encodes differently (format='pylate' "
                    "keeps it for PyLate)"
                )
            tensors = params_to_state_dict(model.params, model.extras)
            io.save_safetensors(tensors, tmp / "model.safetensors", {"format": "pt"})
            meta = config.to_reference_dict()
            meta["meta"] = {
                "version": "colbert-v0.4",
                "exported_by": "colbert-jax",
                "current_datetime": datetime.datetime.now().astimezone().isoformat(),
            }
            if model.text != TextSettings():
                meta["meta"][_TEXT_META] = model.text.to_dict()  # colbert-ai ignores it; we read it back
            (tmp / "artifact.metadata").write_text(json.dumps(meta, indent=4) + "\n")
        elif format == "jax":
            flat = {
                k: np.asarray(v, np.float32)
                for k, v in traverse_util.flatten_dict(jax.device_get(model.params), sep="/").items()
            }
            flat.update({_EXTRAS + k: np.ascontiguousarray(v) for k, v in model.extras.items()})
            io.save_safetensors(flat, tmp / JAX_PARAMS, {"format": "colbert-jax"})
            config.save(tmp / JAX_CONFIG)
            if model.head or model.text != TextSettings():
                settings = {"head": [list(layer) for layer in model.head], "text": model.text.to_dict()}
                (tmp / JAX_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
        if model.tokenizer_files:
            for name, data in model.tokenizer_files.items():
                (tmp / name).write_bytes(data)
        else:
            model.hf_tokenizer.save_pretrained(str(tmp))
        io.replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
