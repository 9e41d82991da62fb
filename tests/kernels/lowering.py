"""Lowering a function for another platform from this (CPU) machine: `jax.export` runs JAX's whole lowering
for the target, Pallas's lowering to Triton IR included; only the compilation to machine code is left to
the device. Export refuses to serialize Triton custom calls (no compatibility guarantee) unless that
safety check is disabled, which is all the check is for here."""

from __future__ import annotations

from collections.abc import Callable

import jax

from pallas_kernels import BLOCK_SIZES

TRITON_CALL = "__gpu$xla.gpu.triton"


def structs(tree):
    """Arrays (or anything with shape and dtype) -> ShapeDtypeStructs, keeping shardings when present."""

    def one(a):
        sharding = getattr(a, "sharding", None)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def describe(tree) -> str:
    return ", ".join(f"{s.dtype}{list(s.shape)}" for s in jax.tree.leaves(tree))


def lower(fn: Callable, *args, platform: str, name: str) -> str:
    """StableHLO text of `fn(*args)` lowered for `platform`; an AssertionError naming `name` and the shapes
    if it does not lower. `fn` may be jitted already (its static arguments bound)."""
    args = structs(args)
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    try:
        exported = jax.export.export(
            jitted, platforms=[platform], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
        )(*args)
    except Exception as e:
        where = f"{name} does not lower for {platform} at ({describe(args)})"
        raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e
    return exported.mlir_module()


def assert_triton_kernel(text: str, kernel: str, platform: str = "cuda") -> None:
    """The lowered module calls the named Pallas kernel through Triton with the table's launch parameters."""
    assert TRITON_CALL in text, f"no Triton call in the {platform} lowering of {kernel}"
    assert f'name = "{kernel}"' in text, f"{kernel} is not in the {platform} lowering"
    blocks = BLOCK_SIZES[platform]
    assert f"num_warps = {blocks.num_warps} : i32" in text
    assert f"num_stages = {blocks.num_stages} : i32" in text
