"""Run a command as on a CPU without AMX tiles, to measure that CPU type on one that has them.

    python scripts/without_amx.py python scripts/bench_scale.py ...

Linux hands a process the tile state only when it asks (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`), and every
library that uses the tiles asks first and falls back to AVX-512 when refused: XLA:CPU's own int8 products
(YNNPACK), oneDNN, and our native kernels (`colbert_jax.native`). This installs a seccomp filter that refuses
exactly that request, then runs the command in its place; the filter is inherited by every process it starts.
`COLBERT_JAX_AMX=0` is narrower: it turns off only our kernels' tile paths, while XLA's int8 products keep
running on the tile unit. x86-64 Linux only.
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


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if len(sys.argv) >= 2 else 2)
    refuse_tiles()
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    except OSError as e:
        raise SystemExit(f"without_amx.py: cannot run {sys.argv[1]!r}: {e}") from e


if __name__ == "__main__":
    main()
