"""Process-wide JAX settings colbert-jax relies on."""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["enable_compilation_cache", "disable_compilation_cache"]

_OFF = ("0", "off", "false", "no")
_disabled = False


def disable_compilation_cache() -> None:
    """Keeps this process from turning on the on-disk compilation cache (`enable_compilation_cache` does
    nothing afterwards); processes it starts are not affected. `COLBERT_JAX_COMPILATION_CACHE=0` does the same
    for every process that inherits the environment."""
    global _disabled
    _disabled = True


def enable_compilation_cache() -> None:
    """Persist compiled programs under $COLBERT_JAX_CACHE/xla (unless the user configured a cache, or turned
    it off with `COLBERT_JAX_COMPILATION_CACHE=0` or `disable_compilation_cache`).

    Search and encoding compile one program per padding bucket; on disk, a later process loads them in
    milliseconds instead of compiling again. JAX fixes the cache at its first compilation, so entry points
    call this before anything is compiled.
    """
    if _disabled or os.environ.get("COLBERT_JAX_COMPILATION_CACHE", "1").strip().lower() in _OFF:
        return
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
