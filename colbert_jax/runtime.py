"""Process-wide JAX settings colbert-jax relies on."""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["enable_compilation_cache"]


def enable_compilation_cache() -> None:
    """Persist compiled programs under $COLBERT_JAX_CACHE/xla (unless the user configured a cache).

    Search and encoding compile one program per padding bucket; on disk, a later process loads them in
    milliseconds instead of compiling again. JAX fixes the cache at its first compilation, so entry points
    call this before anything is compiled.
    """
    if jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    from colbert_jax.default_model import cache_dir

    path = Path(cache_dir()) / "xla"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
