"""Run a command as on a CPU without AMX tiles (and, with --avx2, without AVX-512 either), to measure that CPU
type on one that has them.

    python scripts/without_amx.py [--avx2] python scripts/bench_scale.py ...

Linux hands a process the tile state only when it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`), and every
library that uses the tiles asks first and falls back to AVX-512 when refused: XLA:CPU's own int8 products
(YNNPACK), oneDNN, and our native kernels (`colbert_jax.native`). This installs a seccomp filter that refuses
exactly that request, then runs the command in its place; the filter is inherited by every process it starts.
`COLBERT_JAX_AMX=0` is narrower: it turns off only our kernels' tile paths, while XLA's int8 products keep
running on the tile unit. x86-64 Linux only.

--avx2: also as on a CPU whose widest vectors are AVX2 with FMA (AMD Zen 2 and 3, Intel's client cores): each
library is told the widest instruction set it may use, through its own setting: XLA:CPU's code generation
(`--xla_cpu_max_isa=AVX2`), oneDNN and MKL (torch's products), ATen's kernels, NumPy's dispatch, faiss's build,
and our native kernels (compiled for x86-64-v3: `COLBERT_JAX_NATIVE_ARCH`). A library that reads the CPU's
features without such a setting still uses AVX-512; `scripts/bench_cpu_peak.py` under it shows which products
follow.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys

_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_AUDIT_ARCH_X86_64 = 0xC000003E
_NR_ARCH_PRCTL = 158
ARCH_REQ_XCOMP_PERM = 0x1023
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


# seccomp_data: nr at offset 0, arch at 4, args[0] (low 32 bits, little-endian) at 16
_PROGRAM = b"".join(
    [
        _insn(_LD_W_ABS, 0, 0, 4),
        _insn(_JEQ_K, 0, 5, _AUDIT_ARCH_X86_64),
        _insn(_LD_W_ABS, 0, 0, 0),
        _insn(_JEQ_K, 0, 3, _NR_ARCH_PRCTL),
        _insn(_LD_W_ABS, 0, 0, 16),
        _insn(_JEQ_K, 0, 1, ARCH_REQ_XCOMP_PERM),
        _insn(_RET_K, 0, 0, _RET_EPERM),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
    ]
)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def refuse_tiles() -> None:
    """From now on, this process and its children are refused the AMX tile state."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise SystemExit(f"without_amx.py: x86-64 Linux only (this is {sys.platform} {platform.machine()})")
    libc = ctypes.CDLL(None, use_errno=True)
    program = ctypes.create_string_buffer(_PROGRAM)
    fprog = _SockFprog(len(_PROGRAM) // 8, ctypes.addressof(program))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SystemExit(f"without_amx.py: prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise SystemExit(f"without_amx.py: prctl(PR_SET_SECCOMP): {os.strerror(ctypes.get_errno())}")


# NumPy names its AVX-512 dispatch targets by CPU generation; those it does not know are ignored with a warning
_NUMPY_AVX512 = "AVX512F AVX512CD AVX512_KNL AVX512_KNM AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"


def avx2_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` with every library's widest instruction set set to AVX2 (see the module docstring)."""
    xla = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_max_isa"))
    return {
        **env,
        "XLA_FLAGS": f"{xla} --xla_cpu_max_isa=AVX2".strip(),
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "DNNL_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "NPY_DISABLE_CPU_FEATURES": _NUMPY_AVX512,
        "FAISS_OPT_LEVEL": "avx2",
        "COLBERT_JAX_NATIVE_ARCH": "x86-64-v3",
    }


def main() -> None:
    args = sys.argv[1:]
    avx2 = bool(args) and args[0] == "--avx2"
    args = args[1:] if avx2 else args
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if args else 2)
    refuse_tiles()
    env = avx2_environment(dict(os.environ)) if avx2 else dict(os.environ)
    try:
        os.execvpe(args[0], args, env)
    except OSError as e:
        raise SystemExit(f"without_amx.py: cannot run {args[0]!r}: {e}") from e


if __name__ == "__main__":
    main()
