"""What every kernel shares: the block-size table per backend, per-platform staging, and the choice between
the Pallas kernel and its `jnp` twin.

A kernel's Pallas path is staged with `jax.lax.platform_dependent`, one branch per entry of `BLOCK_SIZES`:
the platform is the one the program is lowered for, not the process's default backend. So a program built
on a CPU machine and exported for `cuda` contains the Triton kernels (compiled later, on the GPU), and the
same program run on CPU interprets them. Lowering the Pallas path for a platform without an entry (TPU:
Pallas TPU kernels need a real TPU to lower, and these kernels are written for Triton) is an error.

`implementation="auto"` picks Pallas on GPU and `jnp` elsewhere. On GPU it first compiles the kernel alone
at the call's shapes (once per shape); if that lowering or compilation fails, it logs the error once per
kernel and uses the `jnp` twin. `implementation="pallas"`, or `COLBERT_JAX_STRICT_KERNELS=1` with "auto",
never falls back: the error propagates.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable

import jax

__all__ = [
    "BlockSizes",
    "BLOCK_SIZES",
    "IMPLEMENTATIONS",
    "STRICT_ENV",
    "compiler_params",
    "per_platform",
    "pow2",
    "resolve",
]

logger = logging.getLogger("pallas_kernels")

IMPLEMENTATIONS = ("auto", "pallas", "jnp")
STRICT_ENV = "COLBERT_JAX_STRICT_KERNELS"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Per-backend tiling. Triton needs power-of-two block sizes and dot operands of at least 16 in every
    dimension; the wrappers pad the arrays to fit these blocks and slice the results.

    decompress_rows: embeddings per decompression program (at dim <= 128; proportionally fewer above).
    maxsim_docs: documents per MaxSim program (the query block stays resident for all of them).
    maxsim_rows: embedding rows decompressed and scored at once inside a MaxSim program (one tile), at dim
      and query length <= 128; proportionally fewer above.
    interaction_docs: documents per centroid-interaction program.
    num_warps, num_stages: Triton launch parameters (None: interpret mode, no compiler).
    """

    decompress_rows: int
    maxsim_docs: int
    maxsim_rows: int
    interaction_docs: int
    num_warps: int | None = None
    num_stages: int | None = None


_TRITON = BlockSizes(decompress_rows=64, maxsim_docs=16, maxsim_rows=64, interaction_docs=4, num_warps=4, num_stages=2)

# One entry per platform the Pallas path lowers for. CPU runs the kernels in interpret mode, where each grid
# step costs about a millisecond whatever its size: large blocks, few steps.
BLOCK_SIZES: dict[str, BlockSizes] = {
    "cuda": _TRITON,
    "rocm": _TRITON,
    "cpu": BlockSizes(decompress_rows=1024, maxsim_docs=64, maxsim_rows=1024, interaction_docs=64),
}

# Triton's smallest dot operand dimension.
MIN_DOT = 16


def pow2(n: int, at_least: int = 1) -> int:
    """The smallest power of two >= max(n, at_least)."""
    n = max(int(n), at_least, 1)
    return 1 << (n - 1).bit_length()


def compiler_params(platform: str):
    """Triton compiler parameters for a GPU platform, None for interpret mode. (Without them, Pallas on CUDA
    takes the Mosaic GPU path, which these kernels are not written for.)"""
    blocks = BLOCK_SIZES[platform]
    if blocks.num_warps is None:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def per_platform(pallas_fn: Callable, *args):
    """Stages `pallas_fn(platform, *args)` for every platform in `BLOCK_SIZES`; the lowering platform picks."""
    branches = {platform: functools.partial(pallas_fn, platform) for platform in BLOCK_SIZES}
    return jax.lax.platform_dependent(*args, **branches)


def _backend() -> str:
    return jax.default_backend()


def _strict() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


_warned: set[str] = set()


@functools.cache
def _compile_error(pallas_fn: Callable, structs: tuple, statics: tuple) -> Exception | None:
    """Lowers and compiles the Pallas path alone for the default backend: its error, or None (cached per
    shape, failures included)."""
    try:
        jax.jit(functools.partial(pallas_fn, **dict(statics))).lower(*structs).compile()
    except Exception as e:  # noqa: BLE001 - only lowering and compilation run here; any failure means no kernel
        return e
    return None


def resolve(kernel: str, implementation: str, pallas_fn: Callable, args: tuple, statics: dict) -> str:
    """The implementation, "pallas" or "jnp", for one call of `kernel` (see the module docstring).

    `pallas_fn(*args, **statics)` is the kernel's Pallas path; "auto" on GPU compiles it at the shapes of
    `args` before choosing it.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{kernel}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    backend = _backend()
    if implementation == "pallas":
        if backend == "tpu":
            raise ValueError(f"{kernel}: the Pallas kernels are Triton (GPU) kernels; on TPU use implementation='jnp'")
        return "pallas"
    if implementation == "jnp" or backend != "gpu":
        return "jnp"
    if _strict():
        return "pallas"
    structs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args)
    error = _compile_error(pallas_fn, structs, tuple(sorted(statics.items())))
    if error is None:
        return "pallas"
    if kernel not in _warned:
        _warned.add(kernel)
        shapes = ", ".join(f"{s.dtype}{list(s.shape)}" for s in structs)
        logger.warning(
            "pallas_kernels.%s: the Pallas kernel failed to compile at (%s) %s (%s: %s); using the jnp "
            "implementation (set %s=1 to raise instead)",
            kernel,
            shapes,
            statics,
            type(error).__name__,
            error,
            STRICT_ENV,
        )
    return "jnp"
