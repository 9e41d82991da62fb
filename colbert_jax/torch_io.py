"""Reads `torch.save` files (`pytorch_model.bin`, colbert-ai `.pt` index files) without torch.

A torch.save file (torch >= 1.6) is a zip: `<prefix>/data.pkl` is a pickle whose tensors refer, through
"persistent ids", to raw little-endian storages `<prefix>/data/<key>`. We unpickle `data.pkl` with an
unpickler whose `find_class` knows only a short allowlist (OrderedDict, the storage type names and the
tensor-rebuild functions, each replaced by our own numpy implementation), whose REDUCE calls only those and
whose BUILD only sets an OrderedDict's attributes, so a malicious file cannot run code: any other global or
object-building opcode is refused with `UnsafeCheckpointError` before anything is called. Anything else
wrong with a file (truncated, corrupt, a zip bomb) is a `TorchFileError` naming it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["load_torch_file", "UnsafeCheckpointError", "TorchFileError"]


class TorchFileError(ValueError):
    """The file is not a readable torch.save zip archive, or it is corrupt."""


class UnsafeCheckpointError(TorchFileError):
    """The pickle refers to something other than tensors and plain containers."""


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _TensorType:
    """Stands for torch.Tensor / torch.nn.Parameter in `_rebuild_from_type_v2`; never instantiated."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, np.ndarray):
        raise TorchFileError("tensor refers to something that is not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise TorchFileError(f"bad tensor geometry size={size} stride={stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if storage_offset < 0 or last >= storage.size:
        raise TorchFileError(
            f"tensor of size {size} at offset {storage_offset} overruns its storage of "
            f"{storage.size} elements (truncated or corrupt file)"
        )
    base = storage[storage_offset:]
    view = np.lib.stride_tricks.as_strided(base, shape=size, strides=[s * storage.itemsize for s in stride])
    return np.array(view, order="C")  # own, C-contiguous copy


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _TensorType,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


_CALLABLE = {id(v) for v in _ALLOWED.values() if callable(v) and not isinstance(v, _StorageType)}


class _RestrictedUnpickler(pickle._Unpickler):
    """Python's own unpickler with the opcodes that call or mutate objects narrowed down.

    GLOBAL/STACK_GLOBAL resolve only names of `_ALLOWED`; REDUCE calls only those; BUILD may only set
    plain attributes of an OrderedDict (torch's `_metadata`), never those of the allowed functions and
    types themselves (shared by every load); INST, OBJ, NEWOBJ, NEWOBJ_EX and the EXT opcodes, which
    torch.save does not write, are refused. The pure-Python unpickler is used because only it lets an
    opcode be replaced; a checkpoint's pickle is small (its tensors are separate records).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, read_record, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._byteorder = byteorder
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # protocol-2 pickles (torch's default) use the Python 2 name
            module = "builtins"
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"refusing to load global '{module}.{name}': only tensors and plain containers are allowed"
            ) from None

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in _CALLABLE or not isinstance(args, tuple):
            raise UnsafeCheckpointError(f"refusing to call {func!r}: not a tensor-rebuild function")
        self.stack[-1] = func(*args)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is not collections.OrderedDict or not isinstance(state, dict):
            raise UnsafeCheckpointError(
                f"refusing to set the state of a {type(inst).__name__}: only an OrderedDict's attributes may be set"
            )
        if not all(isinstance(k, str) and not k.startswith("__") for k in state):
            raise UnsafeCheckpointError("refusing to set special attributes of an OrderedDict")
        inst.__dict__.update(state)

    def _refuse(self) -> None:
        raise UnsafeCheckpointError(
            "refusing a pickle opcode that builds arbitrary objects (torch.save never writes it)"
        )

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.BUILD[0]] = _load_build
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse
    del _op

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"persistent id names a non-storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            raw = self._read_record(key)
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) < int(numel) * dtype.itemsize:
                raise TorchFileError(f"storage {key} holds {len(raw)} bytes, expected {int(numel) * dtype.itemsize}")
            arr = np.frombuffer(raw, dtype=dtype, count=int(numel))
            self._storages[key] = arr.astype(storage_type.dtype, copy=False)
        return self._storages[key]


def load_torch_file(path: str | os.PathLike) -> Any:
    """Loads a torch.save zip file into the same structure with numpy arrays in place of tensors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise TorchFileError(
            f"{path}: not a torch.save zip archive (files from torch < 1.6 use a legacy format; re-save them "
            "with a newer torch)"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            # torch.save stores its records uncompressed: an archive that expands far beyond its size is
            # refused before anything is read (a zip bomb).
            expanded, size = sum(i.file_size for i in zf.infolist()), os.path.getsize(path)
            if expanded > 2 * size + (1 << 20):
                raise TorchFileError(
                    f"{path}: its entries expand to {expanded:,} bytes from {size:,}: not a torch.save archive"
                )
            pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise TorchFileError(f"{path}: expected one '<prefix>/data.pkl' entry, found {len(pkl)}")
            prefix = pkl[0][: -len("data.pkl")]
            byteorder = "little"
            if prefix + "byteorder" in names:
                byteorder = zf.read(prefix + "byteorder").decode().strip()

            def read_record(key: str) -> bytes:
                name = f"{prefix}data/{key}"
                if name not in names:
                    raise TorchFileError(f"{path}: storage entry {name!r} is missing")
                return zf.read(name)

            return _RestrictedUnpickler(zf.read(pkl[0]), read_record, byteorder).load()
    except TorchFileError:
        raise
    except (Exception, RecursionError) as e:  # noqa: BLE001 - whatever a damaged or hostile file makes
        # zipfile, the unpickler or numpy raise, it is this file's fault: one error type, naming the file
        raise TorchFileError(f"{path}: corrupt torch.save file: {type(e).__name__}: {e}") from None
