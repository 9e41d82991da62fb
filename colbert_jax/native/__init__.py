"""Native CPU kernels: C++ called from inside XLA programs through the XLA FFI.

XLA:CPU lowers PLAID's centroid interaction (a gather of one row of centroid scores per candidate embedding,
then a running maximum per document) as materialised gathers and a scatter-max, at several times the memory
traffic of a plain loop, and its exact MaxSim over a few thousand rows as a loop of small ops whose fixed costs
outweigh the arithmetic. `plaid_cpu.cc` holds both as plain loops. On CPUs with AMX tiles two more run on the
tile unit: the int8 query encoder's dense layers (`dense_int8.cc`) and stage 1's centroid scores as three
bfloat16 products (`centroid_scores.cc`); that encoder's self-attention (`attention.cc`) and GELU (`gelu.cc`)
run beside its dense kernel, and beside XLA's or `dense_f32.cc`'s float32 products (the float32 query encoder on
AVX-512 CPUs: a query's small products split across threads, which XLA:CPU runs on one core). The sources are
compiled on first use with the machine's C++ compiler (`$CXX`, else `g++`) for this CPU (`-march=native`)
against jaxlib's FFI headers, cached under $COLBERT_JAX_CACHE/native (keyed by the source, compiler, flags,
jaxlib and CPU), and registered with XLA.

`COLBERT_JAX_NATIVE` chooses: unset or "auto" uses the kernel when it builds (else warns once and the jnp
path runs: the same numbers, slower); "0" never uses it; "1" requires it (a build failure is an error).
`COLBERT_JAX_NATIVE_ARCH` compiles for an older CPU type than this one instead of `native` (e.g. x86-64-v3: AVX2
and FMA, no AVX-512), and the kernels then take that type's paths even where this CPU has more
(`scripts/without_amx.py --avx2` runs a command as on such a CPU).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ENV",
    "NativeBuildError",
    "NativeKernelWarning",
    "enabled",
    "library",
    "centroid_interaction",
    "exact_maxsim",
    "MAXSIM_IMPLEMENTATIONS",
    "amx_available",
    "int8_vnni_available",
    "int8_products_fast",
    "int8_over_f32_rate",
    "bf16_over_f32_rate",
    "bf16_products_fast",
    "query_products_by_speed",
    "measured_rates",
    "full_width_fma",
    "top_k",
    "dense_bf16",
    "dense_bf16_vectorized",
    "pack_dense_bf16",
    "dense_int16",
    "dense_int16_vectorized",
    "dense_int16_reference",
    "pack_dense_int16",
    "int16_over_f32_rate",
    "int16_products_fast",
    "INT16_MAX_CODE",
    "int8_tiles",
    "pack_dense",
    "int8_dense",
    "amx_bf16_available",
    "split_centroids",
    "centroid_scores",
    "SCORES_IMPLEMENTATIONS",
    "attention",
    "gelu",
    "GELU_IMPLEMENTATIONS",
    "gelu_faster_than_xla",
    "F32_PANELS",
    "f32_panel",
    "pack_dense_f32",
    "dense_f32",
    "DENSE_F32_IMPLEMENTATIONS",
    "block_centroids",
    "scores_f32_vectorized",
    "centroid_scores_f32",
    "SCORES_F32_IMPLEMENTATIONS",
    "avx512_bf16_available",
    "block_centroids_bf16",
    "centroid_scores_bf16",
    "stage1_int8_available",
    "quantize_rows_int8",
    "block_centroids_int8",
    "centroid_scores_int8",
    "dense_f32_vectorized",
    "vector_bits",
]

logger = logging.getLogger("colbert_jax.native")

ENV = "COLBERT_JAX_NATIVE"
AMX_ENV = "COLBERT_JAX_AMX"
SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "plaid_cpu.cc",
        "dense_int8.cc",
        "centroid_scores.cc",
        "centroid_scores_f32.cc",
        "centroid_scores_bf16.cc",
        "centroid_scores_int8.cc",
        "attention.cc",
        "gelu.cc",
        "dense_f32.cc",
        "dense_bf16.cc",
        "dense_int16.cc",
        "rates.cc",
        "top_k.cc",
    )
)
HEADERS = tuple(
    Path(__file__).with_name(name)
    for name in ("amx.h", "bf16.h", "blocking.h", "centroid_tiles.h", "gelu.h", "tasks.h", "vnni.h", "xla_math.h")
)
ARCH_ENV = "COLBERT_JAX_NATIVE_ARCH"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
# GCC vectorises with 256-bit registers on AVX-512 CPUs unless told otherwise: the MaxSim loop is FMA-bound.
X86_FLAGS = ("-mprefer-vector-width=512",)
_TARGETS = {
    np.dtype(np.int32): "colbert_jax_centroid_interaction_s32",
    np.dtype(np.uint16): "colbert_jax_centroid_interaction_u16",
}
_MAXSIM_TARGETS = {
    np.dtype(np.int32): "colbert_jax_exact_maxsim_s32",
    np.dtype(np.uint16): "colbert_jax_exact_maxsim_u16",
}
_SYMBOLS = {
    "colbert_jax_centroid_interaction_s32": "ColbertJaxCentroidInteractionS32",
    "colbert_jax_centroid_interaction_u16": "ColbertJaxCentroidInteractionU16",
    "colbert_jax_exact_maxsim_s32": "ColbertJaxExactMaxSimS32",
    "colbert_jax_exact_maxsim_u16": "ColbertJaxExactMaxSimU16",
    "colbert_jax_top_k": "ColbertJaxTopK",
    "colbert_jax_int8_dense": "ColbertJaxInt8Dense",
    "colbert_jax_int8_dense_gelu": "ColbertJaxInt8DenseGelu",
    "colbert_jax_centroid_scores": "ColbertJaxCentroidScores",
    "colbert_jax_centroid_scores_f32": "ColbertJaxCentroidScoresF32",
    "colbert_jax_centroid_scores_bf16": "ColbertJaxCentroidScoresBf16",
    "colbert_jax_centroid_scores_int8": "ColbertJaxCentroidScoresInt8",
    "colbert_jax_attention": "ColbertJaxAttention",
    "colbert_jax_gelu": "ColbertJaxGelu",
    "colbert_jax_dense_f32": "ColbertJaxDenseF32",
    "colbert_jax_dense_f32_rows": "ColbertJaxDenseF32Rows",
    "colbert_jax_dense_bf16": "ColbertJaxDenseBf16",
    "colbert_jax_dense_bf16_gelu": "ColbertJaxDenseBf16Gelu",
    "colbert_jax_dense_bf16_gelu_rounded": "ColbertJaxDenseBf16GeluRounded",
    "colbert_jax_dense_bf16_rounded": "ColbertJaxDenseBf16Rounded",
    "colbert_jax_dense_bf16_rows": "ColbertJaxDenseBf16Rows",
    "colbert_jax_dense_int16": "ColbertJaxDenseInt16",
    "colbert_jax_dense_int16_gelu": "ColbertJaxDenseInt16Gelu",
    "colbert_jax_dense_int16_rows": "ColbertJaxDenseInt16Rows",
}
_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library, "error": why it is not there


class NativeBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded (and `COLBERT_JAX_NATIVE=1` requires them)."""


class NativeKernelWarning(UserWarning):
    """The native kernels are unavailable; the slower jnp path runs instead (same results)."""


def _mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes", "require"):
        return "require"
    return "auto"


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's flags (a shared cache must not serve another CPU's build)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _arch() -> str:
    """The CPU type the kernels are compiled for: `-march=native` unless `COLBERT_JAX_NATIVE_ARCH` names an older
    one (e.g. x86-64-v3: AVX2 and FMA without AVX-512), to run and measure that type's code paths on this CPU."""
    arch = os.environ.get(ARCH_ENV, "").strip() or "native"
    if not arch.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise NativeBuildError(f"{ARCH_ENV}={arch!r} is not a -march value")
    return arch


def _build() -> Path:
    """Compiles the kernels' sources into the cache (once per key) and returns the shared library's path."""
    from colbert_jax.default_model import cache_dir

    compiler = os.environ.get("CXX", "g++")
    exe = shutil.which(compiler)
    if exe is None:
        raise NativeBuildError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX, or {ENV}=0)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    include = jax.ffi.include_dir()
    flags = (*FLAGS, f"-march={_arch()}", *(X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else ()))
    key = hashlib.sha256(
        "\0".join(
            [
                *(p.read_text() for p in SOURCES + HEADERS),
                exe,
                *version,
                *flags,
                jax.__version__,
                _jaxlib_version(),
                _cpu_features(),
            ]
        ).encode()
    ).hexdigest()[:16]
    out_dir = cache_dir() / "native"
    path = out_dir / f"plaid_cpu-{key}.so"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}"
    cmd = [exe, *flags, "-I", include, *map(str, SOURCES), "-o", str(tmp)]
    logger.info("compiling the native CPU kernels: %s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise NativeBuildError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    os.replace(tmp, path)  # atomic: a concurrent process sees no file or the whole one
    return path


def _jaxlib_version() -> str:
    import jaxlib

    return getattr(jaxlib, "__version__", "")


def library() -> ctypes.CDLL | None:
    """The built, loaded and registered kernels; None when disabled or unavailable ("auto": warned once).
    Raises `NativeBuildError` when `COLBERT_JAX_NATIVE=1` and they cannot be built."""
    mode = _mode()
    if mode == "off":
        return None
    with _lock:
        if "lib" not in _state and "error" not in _state:
            try:
                lib = ctypes.CDLL(str(_build()))
                for target, symbol in _SYMBOLS.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                _state["lib"] = lib
            except (NativeBuildError, OSError, AttributeError, subprocess.SubprocessError) as e:
                _state["error"] = e
                if mode == "auto":
                    warnings.warn(
                        f"colbert-jax's native CPU kernels are unavailable, using the slower jnp path: {e}",
                        NativeKernelWarning,
                        stacklevel=3,
                    )
    if "error" in _state and mode == "require":
        err = _state["error"]
        raise err if isinstance(err, NativeBuildError) else NativeBuildError(str(err))
    return _state.get("lib")  # type: ignore[return-value]


def _why_not() -> str:
    return f"{ENV}=0" if _mode() == "off" else str(_state.get("error", "not built"))


def enabled() -> bool:
    """Whether CPU programs traced now call the native kernels (building them on first call)."""
    return library() is not None


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(x, k)`: the same values and indices, on the CPU by `top_k.cc` where the kernels are enabled
    and x is float32 (XLA:CPU's TopK ranks through a heap of index comparisons; PLAID's stages 3-5 rank a
    thousand or more candidates per query that way), elsewhere by `lax.top_k`. Ties go to the lower index and
    values order as XLA:CPU's do: -NaN < -inf < -0 < +0 < +inf < +NaN."""
    x = jnp.asarray(x)
    if x.dtype != jnp.float32 or x.ndim == 0 or not 0 < k <= x.shape[-1] or not enabled():
        return jax.lax.top_k(x, k)
    out = (
        jax.ShapeDtypeStruct((*x.shape[:-1], k), jnp.float32),
        jax.ShapeDtypeStruct((*x.shape[:-1], k), jnp.int32),
    )

    def cpu(x):
        values, indices = jax.ffi.ffi_call("colbert_jax_top_k", out, vmap_method="expand_dims")(x)
        return values, indices

    return jax.lax.platform_dependent(x, cpu=cpu, default=lambda x: tuple(jax.lax.top_k(x, k)))


def centroid_interaction(S: jax.Array, codes: jax.Array, threshold, starts: jax.Array, lens: jax.Array) -> jax.Array:
    """PLAID's centroid-interaction scores of documents, on the CPU (see `plaid_cpu.cc`).

    S [P, Lq] float32 or float16 centroid scores (read as they are: float16 from stage 1 on int8 operands);
    codes [R] int32 or uint16 (the index's rows); threshold: a scalar (a
    centroid counts only where its best score over the query tokens is >= threshold; -inf: all count);
    starts, lens [n] int32: each document's first row and row count (0: an empty slot, scored -inf) ->
    [n] f32: sum over query tokens of the best kept row's score (MASKED_SCORE for a token when none is kept).
    Call only where `enabled()`; vmaps over queries (a leading batch axis on any operand but codes)."""
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    codes = jnp.asarray(codes)
    target = _TARGETS.get(np.dtype(codes.dtype))
    if target is None:
        raise TypeError(f"codes must be int32 or uint16, got {codes.dtype}")
    if S.ndim != 2 or codes.ndim != 1 or starts.shape != lens.shape or starts.ndim != 1:
        raise ValueError(f"shapes: S {S.shape} needs [P, Lq], codes {codes.shape} [R], starts/lens {starts.shape} [n]")
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(starts.shape, jnp.float32), vmap_method="expand_dims")
    return call(
        S if S.dtype == jnp.float16 else S.astype(jnp.float32),
        codes,
        jnp.asarray(threshold, jnp.float32).reshape(1),
        starts.astype(jnp.int32),
        lens.astype(jnp.int32),
    )


MAXSIM_IMPLEMENTATIONS = ("auto", "vector", "amx", "table")
_MAXSIM_CODES = {"vector": 0, "amx": 1, "table": 2}  # plaid_cpu.cc's `implementation`


def _maxsim_auto(lq: int, per_byte: int) -> str:
    """amx where the CPU has AMX-BF16; the nibble table at nbits 1 and 2 on AVX-512 CPUs whose 512-bit FMAs run
    at half width or on one unit (a nibble then holds two or four dimensions, and its lookups beat their FMAs
    there; at nbits 4, one dimension a nibble, they lose to them); else the vector unit's products (with two
    full-width FMA units those run at twice the rate, and beat the table's lookups: `full_width_fma`)."""
    if lq != 32:
        return "vector"
    if amx_bf16_available():
        return "amx"
    if vector_bits() >= 512 and per_byte >= 4 and not full_width_fma():
        return "table"
    return "vector"


def full_width_fma() -> bool:
    """Whether this CPU issues twice as many float32 multiply-adds a cycle with 512-bit FMAs as with 256-bit ones
    (two full-width units: AMD Zen 5, Intel Xeons with two FMA units; not AMD Zen 4, which runs them as two
    halves), by `rates.cc`'s probe, measured once per process and rounded to a power of two; False without
    AVX-512."""
    return 0.0 < _measured_rate("f32_256", lambda: vector_bits() >= 512) < 1.0


def exact_maxsim(
    Q: jax.Array,
    S: jax.Array,
    codes: jax.Array,
    residuals: jax.Array,
    inv_norms: jax.Array,
    table: jax.Array,
    starts: jax.Array,
    lens: jax.Array,
    *,
    centroids: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """PLAID's stage 6 on the CPU: per-token MaxSim [n, Lq] of documents over their decompressed embeddings.

    Q [Lq, dim]; S [P, Lq] centroid scores (q . c; float16 ones only with `centroids`); codes [R] int32 or uint16,
    residuals uint8 [R, dim * nbits / 8], inv_norms [R] (1 / ||c + r||) of the index's rows; table [256, 8 / nbits]
    (`byte_table`); starts, lens [n] int32 -> [n, Lq] f32, each token's best (S[c, q] + r . q) * inv_norm over the
    document's rows (-inf for an empty document). centroids [P, dim] float32: q . c recomputed in float32 for the
    distinct centroids of the documents' rows, in place of S's (S from bfloat16 or int8 operands:
    `placement.stage1_precision`). Call only where `enabled()`; vmapped, it runs once per query.
    implementation: "vector" (float32 products on the vector unit), "amx" (32 query tokens on CPUs with AMX-BF16:
    r . q as three bfloat16 products accumulated in float32, like stage 1's: float32-class, not float32's bits),
    "table" (32 query tokens: r . q as a sum of lookups in a per-query table of each byte nibble's 16 possible
    contributions, float32 sums in another order than "vector"'s; a byte table whose halves are not each a
    nibble's runs as "vector") or "auto" (`_maxsim_auto`: amx, else table at nbits 1 and 2 on AVX-512)."""
    if implementation not in MAXSIM_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {MAXSIM_IMPLEMENTATIONS}, got {implementation!r}")
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    if implementation == "amx" and not amx_bf16_available():
        raise NativeBuildError(
            f"exact_maxsim(implementation='amx'): no AMX-BF16 here (not on this CPU or OS, or {AMX_ENV}=0)"
        )
    chosen = _maxsim_auto(Q.shape[0], table.shape[-1]) if implementation == "auto" else implementation
    if chosen in ("amx", "table") and Q.shape[0] != 32:
        raise ValueError(f"exact_maxsim(implementation={chosen!r}) takes 32 query tokens, got Q {Q.shape}")
    target = _MAXSIM_TARGETS.get(np.dtype(codes.dtype))
    if target is None:
        raise TypeError(f"codes must be int32 or uint16, got {codes.dtype}")
    if Q.ndim != 2 or S.shape[1:] != Q.shape[:1] or residuals.shape[0] != codes.shape[0]:
        raise ValueError(f"shapes: Q {Q.shape} [Lq, dim], S {S.shape} [P, Lq], residuals {residuals.shape} [R, B]")
    if centroids is None:
        centroids = jnp.zeros((0, Q.shape[1]), jnp.float32)
        S = S.astype(jnp.float32)  # its rows are read
    elif centroids.shape != (S.shape[0], Q.shape[1]):
        raise ValueError(f"centroids {centroids.shape}: want [P, dim] = {(S.shape[0], Q.shape[1])}")
    # Under vmap (the searcher maps queries one at a time, in batches of 1), a loop over the batch.
    out = jax.ShapeDtypeStruct((starts.shape[0], Q.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    return call(
        Q.astype(jnp.float32),
        S if S.dtype == jnp.float16 else S.astype(jnp.float32),  # with the centroids: only its shape is read
        centroids.astype(jnp.float32),
        codes,
        residuals,
        inv_norms.astype(jnp.float32),
        table.astype(jnp.float32),
        starts.astype(jnp.int32),
        lens.astype(jnp.int32),
        implementation=np.int32(_MAXSIM_CODES[chosen]),
    )


# -- the int8 query encoder's dense layer (dense_int8.cc) -----------------------------------------------------

DENSE_IMPLEMENTATIONS = ("portable", "amx", "vnni")  # the kernel's implementation codes 0, 1, 2


def _amx_off() -> bool:
    """`COLBERT_JAX_AMX=0`: run as on a CPU without the tile unit (the AVX-512/portable paths), e.g. to measure
    them on a CPU that has it."""
    return os.environ.get(AMX_ENV, "auto").strip().lower() in ("0", "off", "false", "no")


def amx_available() -> bool:
    """Whether the kernels are enabled and this CPU and OS run AMX-INT8 tiles (the fast `int8_dense`), and
    `COLBERT_JAX_AMX=0` does not turn them off."""
    lib = library()
    return lib is not None and not _amx_off() and bool(lib.colbert_jax_amx_ready())


_tiles_granted: list[bool] = []  # the OS's answer, asked once


def int8_tiles() -> bool:
    """Whether int8 products run on AMX tiles here, in any library (XLA's own int8 products too, not only our
    kernels): the CPU has AMX-INT8, Linux grants this process the tile state, and `COLBERT_JAX_AMX=0` does not
    say otherwise. Without them XLA:CPU's int8 products run no faster per operation than its float32 ones, so
    the two-term int8 query encoder (three products per weight) is the slower choice."""
    if _amx_off():
        return False
    if not _tiles_granted:
        flags = _cpu_features().split()
        granted = False
        if platform.machine().lower() in ("x86_64", "amd64") and "amx_int8" in flags and "amx_tile" in flags:
            arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18
            try:
                granted = ctypes.CDLL(None, use_errno=True).syscall(arch_prctl, req_xcomp_perm, xtiledata) == 0
            except (OSError, AttributeError):
                granted = False
        _tiles_granted.append(granted)
    return _tiles_granted[0]


def int8_vnni_available() -> bool:
    """Whether the kernels are enabled and built with AVX-512 VNNI (`int8_dense(implementation="vnni")`)."""
    lib = library()
    return lib is not None and bool(lib.colbert_jax_int8_vnni())


# The int8 / float32 multiply-add rate (`int8_over_f32_rate`) above which three int8 products per weight, plus
# the activations' split, beat one float32 product.
INT8_OVER_F32_NEEDED = 3.5
# The bfloat16 / float32 rate (`bf16_over_f32_rate`) above which one bfloat16 product per weight, plus the
# operands' rounding, beats a float32 one.
BF16_OVER_F32_NEEDED = 1.2
_rates: dict[str, float] = {}  # as measured, by kind


def _measured_rate(kind: str, built: Callable[[], bool]) -> float:
    """`rates.cc`'s probe for `kind` ("int8", "int16", "bf16", "f32_256"), run once per process, rounded to the
    nearest power of two; 0.0 where `built()` is false.

    Rounded because the choice it feeds must not depend on the moment: cores issue each instruction kind at 1, 2
    or 4 times float32's multiply-add rate, and the raw reading moves with the machine's load (seen: two processes
    of one job on a busy 2-core machine ranked "bf16" and "int16" differently, whose costs differ by 10%, and
    gave one query different scores). A reading would have to be off by a factor of 1.41 to move."""
    if kind not in _rates:
        lib = library()
        if lib is None or not built():
            _rates[kind] = 0.0
        else:
            probe = getattr(lib, f"colbert_jax_{kind}_over_f32_rate")
            probe.restype = ctypes.c_double
            _rates[kind] = float(probe())
    raw = _rates[kind]
    return 0.0 if raw <= 0.0 else float(2.0 ** round(math.log2(raw)))


def measured_rates() -> dict[str, float]:
    """The rate probes' raw readings so far (kind -> multiply-add rate over float32's on one core), for reports;
    the choices use them rounded to powers of two (`int8_over_f32_rate` and its kin)."""
    return dict(_rates)


def int8_over_f32_rate() -> float:
    """One core's rate of int8 multiply-adds on AVX-512 VNNI over its rate of float32 ones, measured once per
    process (a few milliseconds of register-only loops) and rounded to a power of two; 0.0 where the kernels lack
    VNNI. 4 on AMD Zen 4 and Zen 5."""
    return _measured_rate("int8", int8_vnni_available)


def bf16_over_f32_rate() -> float:
    """One core's rate of bfloat16 multiply-adds on AVX-512 BF16 (`vdpbf16ps`) over its rate of float32 ones,
    measured once per process and rounded like `int8_over_f32_rate`; 0.0 where `dense_bf16_vectorized()` is
    false. 2 on AMD Zen 4 and Zen 5."""
    return _measured_rate("bf16", dense_bf16_vectorized)


def int8_products_fast() -> bool:
    """Whether the two-term int8 query encoder (three int8 products per weight) runs faster than float32 here:
    on AMX tiles (`int8_tiles()`), or on AVX-512 VNNI by `int8_dense` where its int8 rate is more than
    `INT8_OVER_F32_NEEDED` times the float32 one (XLA:CPU's own int8 products are no faster per operation than
    its float32 ones)."""
    return int8_tiles() or (int8_vnni_available() and int8_over_f32_rate() > INT8_OVER_F32_NEEDED)


def bf16_products_fast() -> bool:
    """Whether `dense_bf16` runs `vdpbf16ps` here at more than `BF16_OVER_F32_NEEDED` times float32's rate."""
    return dense_bf16_vectorized() and bf16_over_f32_rate() > BF16_OVER_F32_NEEDED


# int16 products' cost per weight over bfloat16's at the same instruction rate: the activations' quantization (a
# row's maximum, then its codes) and float32 passes between products where bf16 hands the MLP's second product
# its input rounded already (`scripts/bench_encoder.py`: batched encoding about 9% slower on AMD Zen 4).
INT16_OVERHEAD = 1.1


def query_products_by_speed() -> list[str]:
    """The query encoder's products (`query_quantization` values) that hold the quality bar (query embeddings
    within cosine 0.999 of float32's, rankings' overlap@10 with float32's at least 0.99) and run faster than
    float32's on this CPU, fastest first, then "none": "int8" first on AMX tiles; then, by measured cost per
    weight, "int16" (one int16 multiply-add on AVX-512 VNNI and the activations' quantization,
    `int16_products_fast()`) and "int8" on AVX-512 VNNI (three int8 ones, `int8_products_fast()`). Ties keep that
    order. Not "bf16": its rankings overlap float32's by 0.988 on the 200 bench queries, under the bar
    (docs/benchmarks.md, `scripts/quality_int16_encoder.py`), and where both run it saves a few percent of the
    encoding time at three times int16's error."""
    tiles = int8_tiles()
    costs = {}
    if not tiles and int16_products_fast():
        costs["int16"] = INT16_OVERHEAD / int16_over_f32_rate()
    if not tiles and int8_products_fast():
        costs["int8"] = 3.0 / int8_over_f32_rate()
    return [*(["int8"] if tiles else []), *sorted(costs, key=costs.__getitem__), "none"]


def pack_dense(high: np.ndarray, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two int8 weight terms [..., K, N] -> each packed [..., Nb, Kp / 4, 64] for `int8_dense`: Kp = K rounded
    up to 64, Nb = N rounded up to 32 in blocks of 16 columns, four consecutive k of a column adjacent (zero
    padding). Host arrays; leading (stacked layer) axes are kept."""

    def pack(w: np.ndarray) -> np.ndarray:
        w = np.asarray(w)
        if w.dtype != np.int8 or w.ndim < 2:
            raise ValueError(f"pack_dense: int8 [..., K, N] weights, got {w.dtype} {w.shape}")
        *lead, k, n = w.shape
        kp, nb = -(-k // 64) * 64, -(-n // 32) * 2
        padded = np.zeros((*lead, kp, nb * 16), np.int8)
        padded[..., :k, :n] = w
        # [..., Kp/4, 4, Nb, 16] -> [..., Nb, Kp/4, 16, 4]
        blocks = padded.reshape(*lead, kp // 4, 4, nb, 16)
        axes = tuple(range(len(lead)))
        packed = blocks.transpose(*axes, len(lead) + 2, len(lead), len(lead) + 3, len(lead) + 1)
        return np.ascontiguousarray(packed).reshape(*lead, nb, kp // 4, 64)

    if np.shape(high) != np.shape(low):
        raise ValueError(f"pack_dense: the two terms differ in shape: {np.shape(high)} and {np.shape(low)}")
    return pack(high), pack(low)


def int8_dense(
    x: jax.Array,
    high: jax.Array,
    low: jax.Array,
    scale: jax.Array,
    *,
    gelu_bias: jax.Array | None = None,
    implementation: str = "amx",
) -> jax.Array:
    """x float [..., K] times the two-term int8 kernel packed by `pack_dense` (high, low [Nb, Kp / 4, 64]; scale
    [N] per output column) -> float32 [..., N]: `quantize._int8_matmul`'s numbers, bit for bit (see
    `dense_int8.cc`). With `gelu_bias` [N]: `gelu(product + gelu_bias)`, the exact GELU applied in the kernel's
    epilogue with `gelu`'s bits (XLA's). implementation: "amx" (CPUs with AMX-INT8: check `amx_available()`),
    "vnni" (the vector unit's int8 products, AVX-512 VNNI builds: check `int8_vnni_available()`) or "portable"
    (plain loops, any CPU: slow; the reference the other two are tested against). CPU programs only."""
    if implementation not in DENSE_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {DENSE_IMPLEMENTATIONS}, got {implementation!r}")
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    if implementation == "amx" and not amx_available():
        raise NativeBuildError(
            f"int8_dense(implementation='amx'): no AMX-INT8 here (not on this CPU or OS, or {AMX_ENV}=0)"
        )
    if implementation == "vnni" and not int8_vnni_available():
        raise NativeBuildError("int8_dense(implementation='vnni'): the kernels were not built with AVX-512 VNNI")
    n = scale.shape[-1]
    k = x.shape[-1]
    if high.ndim != 3 or high.shape[-1] != 64 or low.shape != high.shape or scale.ndim != 1:
        raise ValueError(
            f"int8_dense: packed weights [Nb, Kp/4, 64] and scale [N], got {high.shape}, {low.shape}, {scale.shape}"
        )
    nb, kp = high.shape[0], high.shape[1] * 4
    if kp != -(-k // 64) * 64 or nb != -(-n // 32) * 2:
        raise ValueError(f"int8_dense: weights packed for K={kp}, N<={nb * 16} do not fit x [..., {k}] and N={n}")
    if gelu_bias is not None and gelu_bias.shape != (n,):
        raise ValueError(f"int8_dense: gelu_bias needs [{n}], got {gelu_bias.shape}")
    lead = x.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    padded_scale = jnp.pad(scale.astype(jnp.float32), (0, nb * 16 - n), constant_values=1.0)
    operands = [x.reshape(rows, k).astype(jnp.float32), high, low, padded_scale]
    target = "colbert_jax_int8_dense"
    if gelu_bias is not None:
        operands.append(gelu_bias.astype(jnp.float32))
        target = "colbert_jax_int8_dense_gelu"
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, n), jnp.float32))
    out = call(*operands, implementation=np.int32(DENSE_IMPLEMENTATIONS.index(implementation)))
    return out.reshape(*lead, n)


# -- PLAID's stage 1 product on the tile unit (centroid_scores.cc) -------------------------------------------

SCORES_IMPLEMENTATIONS = ("amx", "portable")


def amx_bf16_available() -> bool:
    """Whether the kernels are enabled and this CPU and OS run AMX-BF16 tiles (the fast `centroid_scores`), and
    `COLBERT_JAX_AMX=0` does not turn them off."""
    lib = library()
    return lib is not None and not _amx_off() and bool(lib.colbert_jax_amx_bf16_ready())


def split_centroids(centroids: np.ndarray) -> np.ndarray:
    """Centroids float32 [P, dim] -> their two bfloat16 terms [2, Pp, Kp] for `centroid_scores`: hi = bf16(c),
    lo = bf16(c - hi) (round to nearest even), Pp = P rounded up to 16, Kp = dim rounded up to 32 (zeros)."""
    c = np.asarray(centroids, np.float32)
    if c.ndim != 2:
        raise ValueError(f"split_centroids: float [P, dim] centroids, got {c.shape}")
    p, dim = c.shape
    out = np.zeros((2, -(-p // 16) * 16, -(-dim // 32) * 32), jnp.bfloat16)
    hi = c.astype(jnp.bfloat16)
    out[0, :p, :dim] = hi
    out[1, :p, :dim] = (c - hi.astype(np.float32)).astype(jnp.bfloat16)
    return out


def centroid_scores(split: jax.Array, Q: jax.Array, num_centroids: int, *, implementation: str = "amx") -> jax.Array:
    """S = C . Q^T [num_centroids, Lq] float32 from the split centroids (`split_centroids`, [2, Pp, Kp]) and Q
    [Lq, dim], as three bfloat16 products accumulated in float32 (see `centroid_scores.cc`: float32-class
    accuracy, not float32's bits). implementation: "amx" (CPUs with AMX-BF16: check `amx_bf16_available()`) or
    "portable" (plain loops, any CPU: slow; the reference the AMX path is tested against). CPU programs only;
    vmapped, it runs once per query."""
    if implementation not in SCORES_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {SCORES_IMPLEMENTATIONS}, got {implementation!r}")
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    if implementation == "amx" and not amx_bf16_available():
        raise NativeBuildError(
            f"centroid_scores(implementation='amx'): no AMX-BF16 here (not on this CPU or OS, or {AMX_ENV}=0)"
        )
    if split.ndim != 3 or split.shape[0] != 2 or split.dtype != jnp.bfloat16 or Q.ndim != 2:
        raise ValueError(
            f"centroid_scores: split bfloat16 [2, Pp, Kp] and Q [Lq, dim], got {split.shape} "
            f"{split.dtype} and {Q.shape}"
        )
    pp, kp = split.shape[1:]
    if pp != -(-num_centroids // 16) * 16 or kp != -(-Q.shape[1] // 32) * 32:
        raise ValueError(
            f"centroid_scores: centroids split as [2, {pp}, {kp}] do not fit P={num_centroids}, dim={Q.shape[1]}"
        )
    out = jax.ShapeDtypeStruct((num_centroids, Q.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call("colbert_jax_centroid_scores", out, vmap_method="sequential")
    return call(split, Q.astype(jnp.float32), amx=np.int32(implementation == "amx"))


# -- PLAID's stage 1 product in float32, where there is no AMX-BF16 (centroid_scores_f32.cc) ----------------

SCORES_F32_IMPLEMENTATIONS = ("vector", "scalar")
SCORES_GROUP = 8  # centroids per group of `block_centroids`' layout
SCORES_MAX_BLOCK = 128  # centroids per block of the maxima `centroid_scores_f32` also returns


def block_centroids(centroids: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """Centroids float32 [P, dim] -> [ceil(P / 8), dim, 8] for `centroid_scores_f32`: groups of 8 centroids,
    their k-th coordinates adjacent (zeros past P). numpy in, numpy out (index placement); a jax array in, a
    jax array out (rows gathered inside a program)."""
    xp = np if isinstance(centroids, np.ndarray) else jnp
    c = xp.asarray(centroids, xp.float32)
    if c.ndim != 2:
        raise ValueError(f"block_centroids: float [P, dim] centroids, got {c.shape}")
    p, dim = c.shape
    padded = xp.pad(c, ((0, -p % SCORES_GROUP), (0, 0)))
    blocked = padded.reshape(-1, SCORES_GROUP, dim).transpose(0, 2, 1)
    return np.ascontiguousarray(blocked) if xp is np else blocked


def scores_f32_vectorized() -> bool:
    """Whether `centroid_scores_f32` runs its vector code here faster than XLA's float32 product: AVX-512 and
    AVX2 builds (measured on Zen 4 and Zen 3)."""
    return vector_bits() >= 256


def centroid_scores_f32(
    blocked: jax.Array,
    Q: jax.Array,
    num_centroids: int,
    *,
    implementation: str = "vector",
    block_maxima: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """S = C . Q^T [num_centroids, Lq] float32 from the centroids laid out by `block_centroids` and Q [Lq, dim]:
    each score one FMA chain over k (see `centroid_scores_f32.cc`: the same bits from every implementation and
    for any row count, not XLA's). implementation: "vector" (AVX-512 or AVX2 where compiled, else as "scalar")
    or "scalar" (plain loops). block_maxima: also return each token's maximum over each block of
    `SCORES_MAX_BLOCK` centroids, [ceil(num_centroids / SCORES_MAX_BLOCK), Lq] (`S.max` over the blocks, taken
    while they are in cache). CPU programs only; vmapped, it runs once per query."""
    if implementation not in SCORES_F32_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {SCORES_F32_IMPLEMENTATIONS}, got {implementation!r}")
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    if blocked.ndim != 3 or blocked.shape[2] != SCORES_GROUP or Q.ndim != 2 or blocked.shape[1] != Q.shape[1]:
        raise ValueError(
            f"centroid_scores_f32: blocked centroids [P8 / 8, dim, 8] and Q [Lq, dim], got {blocked.shape} "
            f"and {Q.shape}"
        )
    if blocked.shape[0] != -(-num_centroids // SCORES_GROUP):
        raise ValueError(f"centroid_scores_f32: {blocked.shape[0]} groups of 8 do not hold P={num_centroids}")
    operands = (blocked.astype(jnp.float32), Q.astype(jnp.float32))
    vectorized = np.int32(implementation == "vector")
    target = "colbert_jax_centroid_scores_f32"
    return _stage1_call(target, num_centroids, Q, operands, block_maxima, vectorized=vectorized)


def _stage1_call(
    target: str, num_centroids: int, Q: jax.Array, operands: tuple, block_maxima: bool, s_dtype=jnp.float32, **attrs
):
    """A stage 1 kernel's FFI call: S [num_centroids, Lq] (s_dtype) and its float32 block maxima
    [ceil(P / SCORES_MAX_BLOCK), Lq]; S alone unless `block_maxima`."""
    lq = Q.shape[0]
    out = (
        jax.ShapeDtypeStruct((num_centroids, lq), s_dtype),
        jax.ShapeDtypeStruct((-(-num_centroids // SCORES_MAX_BLOCK), lq), jnp.float32),
    )
    S, maxima = jax.ffi.ffi_call(target, out, vmap_method="sequential")(*operands, **attrs)
    return (S, maxima) if block_maxima else S


# -- PLAID's stage 1 product on bfloat16 operands with AVX-512 BF16 (centroid_scores_bf16.cc) --------------


def avx512_bf16_available() -> bool:
    """Whether the kernels are enabled, built for an AVX-512 CPU type, and this CPU and OS run AVX-512 BF16
    (`vdpbf16ps`): where `centroid_scores_bf16` may be called."""
    lib = library()
    return lib is not None and bool(lib.colbert_jax_avx512_bf16_ready())


def block_centroids_bf16(centroids: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """Centroids float32 [P, dim] -> bfloat16 [ceil(P / 8), ceil(dim / 2), 8, 2] for `centroid_scores_bf16`:
    groups of 8 centroids, each row's coordinate pair (2kk, 2kk + 1) adjacent and the group's 8 pairs for one kk
    adjacent (zeros past P and dim), rounded to nearest even (ml_dtypes' cast). numpy in, numpy out; a jax
    array in, a jax array out."""
    xp = np if isinstance(centroids, np.ndarray) else jnp
    c = xp.asarray(centroids, xp.float32)
    if c.ndim != 2:
        raise ValueError(f"block_centroids_bf16: float [P, dim] centroids, got {c.shape}")
    p, dim = c.shape
    padded = xp.pad(c, ((0, -p % SCORES_GROUP), (0, dim % 2))).astype(jnp.bfloat16)
    packed = padded.reshape(-1, SCORES_GROUP, (dim + 1) // 2, 2).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(packed) if xp is np else packed


def centroid_scores_bf16(
    packed: jax.Array, Q: jax.Array, num_centroids: int, *, block_maxima: bool = False
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """S = bf16(C) . bf16(Q)^T [num_centroids, Lq], float32 sums, from the centroids packed by
    `block_centroids_bf16` and Q float32 [Lq, dim] (rounded to bfloat16 by the kernel): see
    `centroid_scores_bf16.cc` for the order of the sums. block_maxima: also return each token's maximum over
    each block of `SCORES_MAX_BLOCK` centroids, as `centroid_scores_f32` does. Only where
    `avx512_bf16_available()` (else `NativeBuildError`); CPU programs only; vmapped, it runs once per query."""
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    if not avx512_bf16_available():
        raise NativeBuildError(
            "centroid_scores_bf16: no AVX-512 BF16 here (not on this CPU or OS, or the kernels were built for an "
            f"older CPU type by {ARCH_ENV}); check `avx512_bf16_available()` first"
        )
    if packed.ndim != 4 or packed.shape[2:] != (SCORES_GROUP, 2) or Q.ndim != 2:
        raise ValueError(
            f"centroid_scores_bf16: packed centroids [P8 / 8, dim2, 8, 2] and Q [Lq, dim], got {packed.shape} "
            f"and {Q.shape}"
        )
    if packed.shape[1] != -(-Q.shape[1] // 2):
        raise ValueError(f"centroid_scores_bf16: centroids packed for dim {2 * packed.shape[1]} do not fit Q {Q.shape}")
    if packed.shape[0] != -(-num_centroids // SCORES_GROUP):
        raise ValueError(f"centroid_scores_bf16: {packed.shape[0]} groups of 8 do not hold P={num_centroids}")
    operands = (packed.astype(jnp.bfloat16), Q.astype(jnp.float32))
    return _stage1_call("colbert_jax_centroid_scores_bf16", num_centroids, Q, operands, block_maxima)


# -- PLAID's stage 1 product on int8 operands with AVX-512 VNNI (centroid_scores_int8.cc) --------------------


def stage1_int8_available() -> bool:
    """Whether the kernels are enabled and built for a CPU type with AVX-512 VNNI (`vpdpbusd`): where
    `centroid_scores_int8` may be called."""
    lib = library()
    return lib is not None and bool(lib.colbert_jax_stage1_int8_ready())


def quantize_rows_int8(x: jax.Array | np.ndarray) -> tuple[jax.Array | np.ndarray, jax.Array | np.ndarray]:
    """Rows float32 [n, dim] -> (codes [n, dim], scales [n]), both float32: per row m = max |x|,
    codes = rint(x * (127 / m)) (nearest even, within [-127, 127]) and scale = m * float32(1 / 127) (a product,
    which XLA does not rewrite, where it turns a division by a constant into one); zeros and scale 0 for a zero
    row. `centroid_scores_int8.cc` quantizes query tokens the same way. numpy in, numpy out."""
    xp = np if isinstance(x, np.ndarray) else jnp
    x = xp.asarray(x, xp.float32)
    m = xp.max(xp.abs(x), axis=-1)
    positive = m > 0
    inv = xp.float32(127.0) / xp.where(positive, m, xp.float32(1.0))
    codes = xp.clip(xp.round(x * inv[..., None]), -127, 127).astype(xp.float32)
    scales = xp.where(positive, m * xp.float32(1.0 / 127.0), xp.float32(0.0)).astype(xp.float32)
    return codes, scales


def block_centroids_int8(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroids float32 [P, dim] -> (codes int8 [ceil(P / 8), ceil(dim / 4), 8, 4], terms float32
    [ceil(P / 8) * 8, 2]) for `centroid_scores_int8`: each row quantized by `quantize_rows_int8`, groups of 8
    rows with each row's coordinate quads adjacent (zeros past P and dim); terms: each row's scale and 128 times
    the sum of its codes (the unsigned query's offset, taken off the kernel's sums)."""
    c = np.asarray(centroids, np.float32)
    if c.ndim != 2:
        raise ValueError(f"block_centroids_int8: float [P, dim] centroids, got {c.shape}")
    p, dim = c.shape
    if dim > SCORES_INT8_MAX_DIM:
        raise ValueError(f"block_centroids_int8: dim {dim} > {SCORES_INT8_MAX_DIM} (sums past float32's integers)")
    codes, scales = quantize_rows_int8(c)
    padded = np.pad(codes, ((0, -p % SCORES_GROUP), (0, -dim % 4))).astype(np.int8)
    packed = np.ascontiguousarray(padded.reshape(-1, SCORES_GROUP, padded.shape[1] // 4, 4).transpose(0, 2, 1, 3))
    terms = np.zeros((padded.shape[0], 2), np.float32)
    terms[:p, 0] = scales
    terms[:p, 1] = 128.0 * codes.sum(axis=1, dtype=np.float64)
    return packed, terms


SCORES_INT8_MAX_DIM = 512  # up to this dim the kernel's integer sums stay exact in float32


def centroid_scores_int8(
    packed: jax.Array, terms: jax.Array, Q: jax.Array, num_centroids: int, *, block_maxima: bool = False
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """S float16 [num_centroids, Lq] from the centroids packed by `block_centroids_int8` and Q float32 [Lq, dim]
    (quantized per token by the kernel, as `quantize_rows_int8`): float16(((sum of code products) * scale_c) *
    scale_q), exact integer sums (see `centroid_scores_int8.cc`: half of float32's bytes, far inside int8's
    error). block_maxima: also return each token's maximum (float32) over each block of `SCORES_MAX_BLOCK`
    centroids of that S, as `centroid_scores_f32` does. Only where
    `stage1_int8_available()` (else `NativeBuildError`); CPU programs only; vmapped, it runs once per query."""
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    if not stage1_int8_available():
        raise NativeBuildError(
            "centroid_scores_int8: no AVX-512 VNNI here (the kernels were built for a CPU type without it, "
            f"or by {ARCH_ENV} for an older one); check `stage1_int8_available()` first"
        )
    groups = packed.shape[0] if packed.ndim == 4 else -1
    if packed.ndim != 4 or packed.shape[2:] != (SCORES_GROUP, 4) or Q.ndim != 2 or terms.shape != (groups * 8, 2):
        raise ValueError(
            f"centroid_scores_int8: packed centroids [P8 / 8, dim4, 8, 4], terms [P8, 2] and Q [Lq, dim], got "
            f"{packed.shape}, {terms.shape} and {Q.shape}"
        )
    if packed.shape[1] != -(-Q.shape[1] // 4) or Q.shape[1] > SCORES_INT8_MAX_DIM:
        raise ValueError(f"centroid_scores_int8: centroids packed for dim {4 * packed.shape[1]} do not fit Q {Q.shape}")
    if packed.shape[0] != -(-num_centroids // SCORES_GROUP):
        raise ValueError(f"centroid_scores_int8: {packed.shape[0]} groups of 8 do not hold P={num_centroids}")
    operands = (packed.astype(jnp.int8), terms.astype(jnp.float32), Q.astype(jnp.float32))
    return _stage1_call("colbert_jax_centroid_scores_int8", num_centroids, Q, operands, block_maxima, jnp.float16)


# -- the int8 query encoder's self-attention (attention.cc) --------------------------------------------------


def attention(qkv: jax.Array, qkv_bias: jax.Array, key_bias: jax.Array, heads: int) -> jax.Array:
    """Self-attention from the fused projections: qkv [B, L, 3 * H * D] (queries, keys, values, head after
    head) plus qkv_bias [3 * H * D], key_bias [B, L] (added to every score of that key: 0, or a large negative
    number to mask it) -> ctx [B, L, H * D], softmax(q . k / sqrt(D) + key_bias) . v per batch row and head (see
    `attention.cc`: float32-accurate, XLA's exp, not XLA's bits). CPU programs only."""
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * heads) or key_bias.shape != qkv.shape[:2]:
        raise ValueError(f"attention: qkv [B, L, 3 * {heads} * D], key_bias [B, L]; got {qkv.shape}, {key_bias.shape}")
    if qkv_bias.shape != qkv.shape[-1:]:
        raise ValueError(f"attention: qkv_bias [{qkv.shape[-1]}], got {qkv_bias.shape}")
    b, n, width = qkv.shape
    call = jax.ffi.ffi_call("colbert_jax_attention", jax.ShapeDtypeStruct((b, n, width // 3), jnp.float32))
    f32 = jnp.float32
    return call(qkv.astype(f32), qkv_bias.astype(f32), key_bias.astype(f32), heads=np.int32(heads))


GELU_IMPLEMENTATIONS = ("vector", "scalar")


def gelu_faster_than_xla() -> bool:
    """Whether `gelu` runs faster here than XLA's own exact GELU (the same bits): AVX-512 builds, whose compress
    and expand gather the elements that take the erfc branch. AVX2 builds' lane permutations for them measured
    slower than XLA's GELU on a Zen 3 (both computing every element), so the encoder takes XLA's there."""
    return vector_bits() == 512


def gelu(y: jax.Array, bias: jax.Array, *, implementation: str = "vector") -> jax.Array:
    """`jax.nn.gelu(y + bias, approximate=False)` with XLA:CPU's bits, computing each element's expensive erfc
    branch only where it selects it (see `gelu.cc`): y float32 [..., N], bias [N]. implementation: "vector"
    (AVX-512 where the CPU has it, else as "scalar") or "scalar" (every branch, one element at a time: the
    reference). CPU programs only."""
    if implementation not in GELU_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {GELU_IMPLEMENTATIONS}, got {implementation!r}")
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    if y.ndim < 1 or bias.shape != y.shape[-1:]:
        raise ValueError(f"gelu: y [..., N] and bias [N], got {y.shape} and {bias.shape}")
    n = y.shape[-1]
    rows = int(np.prod(y.shape[:-1], dtype=np.int64))
    call = jax.ffi.ffi_call("colbert_jax_gelu", jax.ShapeDtypeStruct((rows, n), jnp.float32))
    vectorized = np.int32(implementation == "vector")
    return call(y.reshape(rows, n).astype(jnp.float32), bias.astype(jnp.float32), vectorized=vectorized).reshape(
        y.shape
    )


# -- the float32 query encoder's dense layer (dense_f32.cc) ---------------------------------------------------

F32_PANELS = (48, 16)  # the packed panel widths `dense_f32` reads
DENSE_F32_IMPLEMENTATIONS = ("vector", "scalar")


def vector_bits() -> int:
    """The widest vector registers the built kernels use: 512 (AVX-512), 256 (AVX2 and FMA) or 0 (other, or the
    kernels unavailable). `-march=native` makes it this CPU's; `COLBERT_JAX_NATIVE_ARCH` an older type's."""
    lib = library()
    return int(lib.colbert_jax_vector_bits()) if lib is not None else 0


def dense_f32_vectorized() -> bool:
    """Whether `dense_f32`'s vector path is compiled here (AVX-512, or AVX2 with FMA): without it XLA's product is
    the faster one."""
    return vector_bits() >= 256


def f32_panel() -> int:
    """The packed panel width `dense_f32`'s vector code reads as one stream here: 16 columns for AVX2 builds (its
    6 x 16 register block), 48 otherwise."""
    return 16 if vector_bits() == 256 else 48


def pack_dense_f32(w: np.ndarray, panel: int | None = None) -> np.ndarray:
    """float32 weights [..., K, N] -> [..., ceil(N / W), K, W] for `dense_f32`, W = `panel` (48 or 16; default
    `f32_panel()`), zero padding past N. Host arrays; leading (stacked layer) axes are kept."""
    w = np.asarray(w, np.float32)
    width = f32_panel() if panel is None else panel
    if width not in F32_PANELS:
        raise ValueError(f"pack_dense_f32: panels are {F32_PANELS} columns wide, got {panel}")
    if w.ndim < 2:
        raise ValueError(f"pack_dense_f32: weights [..., K, N], got {w.shape}")
    *lead, k, n = w.shape
    panels = -(-n // width)
    padded = np.zeros((*lead, k, panels * width), np.float32)
    padded[..., :n] = w
    blocks = padded.reshape(*lead, k, panels, width)
    return np.ascontiguousarray(np.moveaxis(blocks, -2, -3))


def dense_f32(
    x: jax.Array,
    packed: jax.Array,
    n: int,
    *,
    rows_needed: jax.Array | None = None,
    split: int = 0,
    implementation: str = "vector",
) -> jax.Array:
    """x float32 [..., K] times weights packed by `pack_dense_f32` ([ceil(N / W), K, W]) -> float32 [..., N]
    (see `dense_f32.cc`: float32 accumulation in k order, the columns split across the pool's threads; not
    XLA's bits). With `rows_needed` (bool [...], x's leading shape): the columns from `split` on (a multiple of
    W) only for the rows it marks, zero elsewhere, each computed row with the bits of the full product (a fused
    query/key/value product whose masked keys and values nothing reads). implementation: "vector" (AVX-512 or
    AVX2 where compiled, else as "scalar") or "scalar" (plain loops). CPU programs only."""
    if implementation not in DENSE_F32_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {DENSE_F32_IMPLEMENTATIONS}, got {implementation!r}")
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    k = x.shape[-1]
    width = packed.shape[-1] if packed.ndim == 3 else 0
    if width not in F32_PANELS or packed.shape[1] != k or not 0 < n <= packed.shape[0] * width < n + width:
        raise ValueError(f"dense_f32: weights packed as {packed.shape} do not fit x [..., {k}] and N={n}")
    lead = x.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    operands = [x.reshape(rows, k).astype(jnp.float32), packed.astype(jnp.float32)]
    attrs = {"vectorized": np.int32(implementation == "vector")}
    target = "colbert_jax_dense_f32"
    if rows_needed is not None:
        if split % width:
            raise ValueError(f"dense_f32: split must be a multiple of the packed panel width {width}, got {split}")
        operands.append(_rows_needed_operand("dense_f32", rows_needed, lead, split))
        attrs["split"] = np.int32(split)
        target = "colbert_jax_dense_f32_rows"
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, n), jnp.float32), vmap_method="sequential")
    return call(*operands, **attrs).reshape(*lead, n)


# -- the float32 encoder's dense products on bfloat16 operands (dense_bf16.cc)

BF16_PANEL = 48  # the packed panel width `dense_bf16` reads


def dense_bf16_vectorized() -> bool:
    """Whether `dense_bf16`'s AVX-512 BF16 path (`vdpbf16ps`) is compiled here and this CPU and OS run it:
    elsewhere its plain loops run, far slower than a float32 product."""
    lib = library()
    return lib is not None and bool(lib.colbert_jax_dense_bf16_vector())


def _pair_panels(padded: np.ndarray) -> np.ndarray:
    """[..., 2 * K2, P * 48] (zeros past K and N) -> [..., P, K2, 48, 2]: panels of 48 columns, a column's coordinate
    pair (2kk, 2kk + 1) adjacent (`dense_bf16`'s and `dense_int16`'s layout)."""
    *lead, k, n = padded.shape
    blocks = padded.reshape(*lead, k // 2, 2, n // BF16_PANEL, BF16_PANEL)
    a = len(lead)  # [..., K2, 2, P, 48] -> [..., P, K2, 48, 2]
    return np.ascontiguousarray(blocks.transpose(*range(a), a + 2, a, a + 3, a + 1))


def _check_pair_panels(name: str, k: int, packed: jax.Array, n: int) -> None:
    if (
        packed.ndim != 4
        or packed.shape[2:] != (BF16_PANEL, 2)
        or packed.shape[1] != -(-k // 2)
        or not 0 < n <= packed.shape[0] * BF16_PANEL < n + BF16_PANEL
    ):
        raise ValueError(f"{name}: weights packed as {packed.shape} do not fit x [..., {k}] and N={n}")


def _rows_needed_operand(name: str, rows_needed: jax.Array, lead: tuple, split: int) -> jax.Array:
    """`rows_needed` (x's leading shape) as the kernels read it: int32 [rows]; split checked."""
    if rows_needed.shape != lead:
        raise ValueError(f"{name}: rows_needed needs x's leading shape {lead}, got {rows_needed.shape}")
    if split < 0 or split % BF16_PANEL:
        raise ValueError(f"{name}: split must be a multiple of {BF16_PANEL} >= 0, got {split}")
    return rows_needed.reshape(-1).astype(jnp.int32)


def pack_dense_bf16(w: np.ndarray) -> np.ndarray:
    """float32 weights [..., K, N] -> bfloat16 [..., ceil(N / 48), ceil(K / 2), 48, 2] for `dense_bf16`: panels
    of 48 columns, a column's coordinate pair (2kk, 2kk + 1) adjacent, zeros past K and N, rounded to nearest
    even. Host arrays; leading (stacked layer) axes are kept."""
    w = np.asarray(w, np.float32)
    if w.ndim < 2:
        raise ValueError(f"pack_dense_bf16: weights [..., K, N], got {w.shape}")
    *lead, k, n = w.shape
    padded = np.zeros((*lead, 2 * -(-k // 2), -(-n // BF16_PANEL) * BF16_PANEL), np.float32)
    padded[..., :k, :n] = w
    return _pair_panels(padded.astype(jnp.bfloat16))


def dense_bf16(
    x: jax.Array,
    packed: jax.Array,
    n: int,
    *,
    gelu_bias: jax.Array | None = None,
    rows_needed: jax.Array | None = None,
    split: int = 0,
    out_dtype: Any = jnp.float32,
    implementation: str = "vector",
) -> jax.Array:
    """bf16(x) [..., K] times weights packed by `pack_dense_bf16` -> float32 [..., N]: x rounded to bfloat16 (to
    nearest even) by the kernel, float32 sums over the coordinate pairs in k order (see `dense_bf16.cc`; within
    float32 rounding of `jnp.matmul` of the rounded operands, not its bits). Each row's result depends on that
    row alone. With `gelu_bias` [N]: `gelu(product + gelu_bias)`, the exact GELU applied in the kernel's epilogue
    with `gelu`'s bits (XLA's). With `rows_needed` (bool [...], x's leading shape): the columns from `split` on
    (a multiple of 48) only for the rows it marks, zero elsewhere, each computed row with the bits of the full
    product (a fused query/key/value product whose masked keys and values nothing reads). `out_dtype`
    bfloat16 (with `gelu_bias` only) rounds the GELU's output to nearest even, as the next product rounds its
    input; a bfloat16 x with an even K is read as it is (nothing to round): the MLP's two products pass half
    the bytes between them, with the same bits. implementation:
    "vector" (`vdpbf16ps` where `dense_bf16_vectorized()`, else as "scalar") or "scalar" (plain loops, the same
    order). CPU programs only."""
    if implementation not in DENSE_F32_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {DENSE_F32_IMPLEMENTATIONS}, got {implementation!r}")
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    k = x.shape[-1]
    _check_pair_panels("dense_bf16", k, packed, n)
    if gelu_bias is not None and gelu_bias.shape != (n,):
        raise ValueError(f"dense_bf16: gelu_bias needs [{n}], got {gelu_bias.shape}")
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (np.dtype(jnp.float32), np.dtype(jnp.bfloat16)):
        raise ValueError(f"dense_bf16: out_dtype must be float32 or bfloat16, got {out_dtype}")
    if out_dtype == np.dtype(jnp.bfloat16) and gelu_bias is None:
        raise ValueError("dense_bf16: a bfloat16 output needs gelu_bias (it is the GELU's output, rounded)")
    lead = x.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    rounded = x.dtype == jnp.bfloat16 and k % 2 == 0 and gelu_bias is None and rows_needed is None
    x = x.reshape(rows, k)
    operands = [x if rounded else x.astype(jnp.float32), packed.astype(jnp.bfloat16)]
    attrs = {"vectorized": np.int32(implementation == "vector")}
    target = "colbert_jax_dense_bf16_rounded" if rounded else "colbert_jax_dense_bf16"
    if gelu_bias is not None and rows_needed is not None:
        raise ValueError("dense_bf16: rows_needed and gelu_bias do not go together")
    if gelu_bias is not None:
        operands.append(gelu_bias.astype(jnp.float32))
        to_bf16 = out_dtype == np.dtype(jnp.bfloat16)
        target = "colbert_jax_dense_bf16_gelu_rounded" if to_bf16 else "colbert_jax_dense_bf16_gelu"
    if rows_needed is not None:
        operands.append(_rows_needed_operand("dense_bf16", rows_needed, lead, split))
        attrs["split"] = np.int32(split)
        target = "colbert_jax_dense_bf16_rows"
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, n), out_dtype))
    out = call(*operands, **attrs)
    return out.reshape(*lead, n)


# -- the float32 encoder's dense products on int16 operands (dense_int16.cc)

INT16_MAX_CODE = 4095  # |code| on either side: a 128-coordinate pass's int32 sum cannot overflow
INT16_PASS = 128  # coordinates summed exactly in int32 before the float32 running sum


def dense_int16_vectorized() -> bool:
    """Whether `dense_int16`'s AVX-512 VNNI path (`vpdpwssd`) is compiled here (the kernels are built for this
    CPU's type): elsewhere its plain loops run, far slower than a float32 product."""
    lib = library()
    return lib is not None and bool(lib.colbert_jax_dense_int16_vector())


def int16_over_f32_rate() -> float:
    """One core's rate of int16 multiply-adds on AVX-512 VNNI (`vpdpwssd`) over its rate of float32 ones, measured
    once per process and rounded like `int8_over_f32_rate`; 0.0 where `dense_int16_vectorized()` is false. 2 on
    AMD Zen 4 and Zen 5 (the rate of `vdpbf16ps`)."""
    return _measured_rate("int16", dense_int16_vectorized)


def int16_products_fast() -> bool:
    """Whether `dense_int16` runs `vpdpwssd` here at more than `BF16_OVER_F32_NEEDED` times float32's rate (one
    int16 multiply-add per weight, plus the activations' quantization, against one float32 one)."""
    return dense_int16_vectorized() and int16_over_f32_rate() > BF16_OVER_F32_NEEDED


def _int16_codes(a: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 a -> (int16 codes, float32 scales) along `axis`: m = max |a|, codes rint(a * (4095 / m)) within
    [-4095, 4095], scale m * (1 / 4095); codes and scale 0 where m = 0 (`dense_int16.cc`'s quantization)."""
    m = np.abs(a).max(axis=axis, keepdims=True)
    top = np.float32(INT16_MAX_CODE)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(m > 0, top / np.where(m > 0, m, np.float32(1)), np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint(a * inv), -INT16_MAX_CODE, INT16_MAX_CODE).astype(np.int16)
    scale = (m * (np.float32(1) / top)).astype(np.float32)
    return codes, np.squeeze(scale, axis)


def pack_dense_int16(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 weights [..., K, N] -> (int16 codes [..., ceil(N / 48), ceil(K / 2), 48, 2], float32 scales [..., N])
    for `dense_int16`: each column quantized with its own scale, panels of 48 columns, a column's coordinate pair
    (2kk, 2kk + 1) adjacent, zeros past K and N. Host arrays; leading (stacked layer) axes are kept."""
    w = np.asarray(w, np.float32)
    if w.ndim < 2:
        raise ValueError(f"pack_dense_int16: weights [..., K, N], got {w.shape}")
    *lead, k, n = w.shape
    codes, scales = _int16_codes(w, axis=-2)
    padded = np.zeros((*lead, 2 * -(-k // 2), -(-n // BF16_PANEL) * BF16_PANEL), np.int16)
    padded[..., :k, :n] = codes
    return _pair_panels(padded), scales


def _check_int16(name: str, k: int, packed: jax.Array, scales: jax.Array, n: int) -> None:
    _check_pair_panels(name, k, packed, n)
    if scales.shape != (n,):
        raise ValueError(f"{name}: the weights' scales need [{n}], got {scales.shape}")


def dense_int16_reference(x: jax.Array, packed: jax.Array, scales: jax.Array, n: int) -> jax.Array:
    """`dense_int16`'s numbers by XLA, bit for bit (for programs without the kernel): x's rows quantized as the
    kernel quantizes them, the weights' codes unpacked, int32 sums over passes of 128 coordinates, their float32
    sum in pass order, times the row's scale, then the column's."""
    k = x.shape[-1]
    _check_int16("dense_int16_reference", k, packed, scales, n)
    p, k2 = packed.shape[0], packed.shape[1]
    codes = jnp.asarray(packed).transpose(1, 3, 0, 2).reshape(2 * k2, p * BF16_PANEL)[:k, :n].astype(jnp.int32)
    x = x.astype(jnp.float32)
    m = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    top = jnp.float32(INT16_MAX_CODE)
    inv = jnp.where(m > 0, top / jnp.where(m > 0, m, 1.0), 0.0)
    q = jnp.clip(jnp.round(x * inv), -INT16_MAX_CODE, INT16_MAX_CODE).astype(jnp.int32)
    sx = m * (np.float32(1) / np.float32(INT16_MAX_CODE))
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    total = None
    for k0 in range(0, k, INT16_PASS):
        part = jax.lax.dot_general(
            q[..., k0 : k0 + INT16_PASS], codes[k0 : k0 + INT16_PASS], dims, preferred_element_type=jnp.int32
        ).astype(jnp.float32)
        total = part if total is None else total + part
    return (total * sx) * scales.astype(jnp.float32)


def dense_int16(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    n: int,
    *,
    gelu_bias: jax.Array | None = None,
    rows_needed: jax.Array | None = None,
    split: int = 0,
    implementation: str = "vector",
) -> jax.Array:
    """x [..., K] times weights packed by `pack_dense_int16` (codes and column `scales`) -> float32 [..., N], on
    int16 operands: each row of x quantized with its own scale by the kernel, exact int32 sums over passes of
    128 coordinates (see `dense_int16.cc`), the bits of `dense_int16_reference`. Each row's result depends on
    that row alone. With `gelu_bias` [N]: `gelu(product + gelu_bias)` in the kernel's epilogue with `gelu`'s
    bits (XLA's). With `rows_needed` (bool [...], x's leading shape): the columns from `split` on (a multiple of
    48) only for the rows it marks, zero elsewhere, each computed row with the bits of the full product.
    implementation: "vector" (`vpdpwssd` where `dense_int16_vectorized()`, else as "scalar") or "scalar" (plain
    loops, the same bits). x must be finite. CPU programs only."""
    if implementation not in DENSE_F32_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {DENSE_F32_IMPLEMENTATIONS}, got {implementation!r}")
    if library() is None:
        raise NativeBuildError(f"the native CPU kernels are off or unavailable ({_why_not()}); check `enabled()` first")
    k = x.shape[-1]
    _check_int16("dense_int16", k, packed, scales, n)
    if gelu_bias is not None and gelu_bias.shape != (n,):
        raise ValueError(f"dense_int16: gelu_bias needs [{n}], got {gelu_bias.shape}")
    if gelu_bias is not None and rows_needed is not None:
        raise ValueError("dense_int16: rows_needed and gelu_bias do not go together")
    lead = x.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    operands = [x.reshape(rows, k).astype(jnp.float32), packed.astype(jnp.int16), scales.astype(jnp.float32)]
    attrs = {"vectorized": np.int32(implementation == "vector")}
    target = "colbert_jax_dense_int16"
    if gelu_bias is not None:
        operands.append(gelu_bias.astype(jnp.float32))
        target = "colbert_jax_dense_int16_gelu"
    if rows_needed is not None:
        operands.append(_rows_needed_operand("dense_int16", rows_needed, lead, split))
        attrs["split"] = np.int32(split)
        target = "colbert_jax_dense_int16_rows"
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, n), jnp.float32))
    return call(*operands, **attrs).reshape(*lead, n)
