"""Storage: TensorStore (zarr v3) arrays, checksums, atomic JSON and directory writes.

Every array of an index is a zarr v3 array directory written through TensorStore, in row chunks of at most
`CHUNK_BYTES`. Its checksum is the sha256 over the array directory's files (relative path + bytes), so a
truncated, edited or missing chunk file changes it. Files (`atomic_file`, `write_text`, `write_json`,
`save_npy`) go to a temporary name first, are flushed to disk and renamed into place, and the rename itself is
flushed (the directory fsynced): after a kill or a power loss a file is whole, old or new. Directories are built
under a temporary name, flushed, and renamed when complete (`replace_dir`). Writers of one directory take its
lock (`locked_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import tensorstore as ts

from colbert_jax.errors import needs_option

__all__ = [
    "create_array",
    "write_array",
    "open_array",
    "read_array",
    "array_checksum",
    "atomic_file",
    "write_text",
    "write_json",
    "read_json",
    "replace_dir",
    "locked_dir",
    "lock_file",
    "LockedError",
    "work_dir",
    "check_target",
]

CHUNK_BYTES = 32 << 20


def _spec(path: Path) -> dict[str, Any]:
    # absolute: TensorStore's file driver refuses paths with ".." components ("Invalid file path")
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.abspath(path)}}


def create_array(path: str | os.PathLike, shape: tuple[int, ...], dtype) -> ts.TensorStore:
    """Creates an empty zarr v3 array (deleting anything at `path`), chunked by rows."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    dtype = np.dtype(dtype)
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    rows = int(min(max(shape[0], 1), max(1, CHUNK_BYTES // row_bytes)))
    spec = _spec(path) | {
        "metadata": {
            "shape": list(shape),
            "data_type": dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [rows, *shape[1:]]}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]
            if dtype.itemsize > 1
            else [{"name": "bytes"}],
        }
    }
    return ts.open(spec, create=True, delete_existing=True).result()


def write_array(path: str | os.PathLike, data: np.ndarray) -> dict[str, Any]:
    """Writes a whole array; returns its manifest entry (shape, dtype, sha256)."""
    data = np.ascontiguousarray(data)
    store = create_array(path, data.shape, data.dtype)
    if data.size:
        _written(store.write(data))
    return describe_array(path)


def chunk_rows(store: ts.TensorStore) -> int:
    """Rows per storage chunk (file) of an array: writers that split an array between them split it here."""
    return int(store.chunk_layout.write_chunk.shape[0])


def write_rows(store: ts.TensorStore, start: int, rows: np.ndarray) -> None:
    if len(rows):
        _written(store[start : start + len(rows)].write(np.ascontiguousarray(rows)))


def _written(future) -> None:
    """Waits for a TensorStore write; a full disk (or quota, or file size limit) is an OSError with its errno,
    as Python's own writes report it (TensorStore says ValueError with the code in the message)."""
    try:
        future.result()
    except ValueError as e:
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code and int(code[1]) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise OSError(int(code[1]), str(e)) from None
        raise


def describe_array(path: str | os.PathLike) -> dict[str, Any]:
    store = open_array(path)
    return {"shape": list(store.shape), "dtype": np.dtype(store.dtype.numpy_dtype).name, "sha256": array_checksum(path)}


def open_array(path: str | os.PathLike, *, strict: bool = False) -> ts.TensorStore:
    """Opens an array for reading. TensorStore reads a missing chunk file as zeros (it does not store chunks
    equal to the fill value); strict=True makes it an error instead, for arrays that never hold a chunk of
    zeros (passage texts and their offsets), so that a reader of files an update removed learns so."""
    spec = _spec(Path(path)) | ({"fill_missing_data_reads": False} if strict else {})
    return ts.open(spec, open=True).result()


def read_array(path: str | os.PathLike, *, strict: bool = False) -> np.ndarray:
    return np.asarray(open_array(path, strict=strict).read().result())


def _files(path: Path) -> Iterable[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def array_checksum(path: str | os.PathLike) -> str:
    path = Path(path)
    h = hashlib.sha256()
    for f in _files(path):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def content_checksum(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a directory's files (`array_checksum`)."""
    path = Path(path)
    if path.is_dir():
        return array_checksum(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def save_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors' `save_file`, with a full disk reported as an OSError carrying its errno (safetensors says
    SafetensorError, its code only in the message)."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file(tensors, os.fspath(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code and int(code[1]) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise OSError(int(code[1]), f"{path}: {e}") from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Opens a temporary file beside `path` for writing; when the block ends without an error the file is flushed
    to disk (fsync), renamed over `path` and the rename flushed (the directory fsynced), so that a kill or a
    power loss leaves `path` whole, old or new; on an error the temporary file is removed and `path` untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes a text file atomically and durably (`atomic_file`)."""
    with atomic_file(path, encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON atomically and durably (`atomic_file`)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """np.save, atomically and durably (`atomic_file`)."""
    with atomic_file(path, "wb") as f:
        np.save(f, array)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a directory's entries (a rename or a new file in it) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):  # a directory we may write but not read: nothing to flush by
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # filesystems that cannot sync directories
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flushes every file and directory under `path` (and `path`) to disk, before it is renamed into place: a
    rename can reach the disk before the data it names."""
    path = Path(path)
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


class LockedError(RuntimeError):
    """Another process holds a lock taken without waiting (`lock_file(..., wait=False)`)."""


@contextlib.contextmanager
def lock_file(lock: str | os.PathLike, *, wait: bool = True, what: str = "") -> Iterator[None]:
    """Holds an exclusive lock on the file `lock` (created if missing), released by the kernel if the holder
    dies. Robust to the file being replaced or removed while we wait: the lock counts only once the file we
    locked is still the one at `lock`. wait=False: `LockedError` naming `what` if another process holds it."""
    lock = Path(lock)
    while True:
        f = open(lock, "a")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise LockedError(f"{what or lock} is locked by another process (lock file {lock})") from None
            try:
                current = os.stat(lock)
            except FileNotFoundError:
                current = None
            held = os.fstat(f.fileno())
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                break
        except BaseException:
            f.close()
            raise
        f.close()  # replaced while we waited: lock the file now there
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def locked_dir(path: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """The writers' lock of directory `path` (an index): one writer at a time. The lock file lives in the
    directory, so a writer that replaces the whole directory (`replace_dir`, e.g. a rebuild) takes the lock
    first; a writer that was waiting then finds its lock file gone from `path` and takes the new directory's."""
    return lock_file(Path(path) / ".lock")


def work_dir(target: str | os.PathLike) -> Path:
    """A new, empty `.NAME.saving-<pid>` directory beside `target` to build it in before `replace_dir`.

    Those of earlier writers that were killed (their process is gone) are deleted first: nothing else is
    named so, and a kill must not leave a copy behind at every attempt.
    """
    target = Path(target)
    prefix = f".{target.name}.saving-"
    for stale in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid = stale.name[len(prefix) :]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    path = target.with_name(f"{prefix}{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves the finished directory `src` to `dst`, replacing `dst` only once `src` is in place.

    `src` is flushed to disk first and the rename after, so a power loss cannot leave `dst` naming files whose
    data never reached the disk. An existing `dst` is swapped with `src` in one step (Linux renameat2
    RENAME_EXCHANGE), so a kill at any moment leaves `dst` old or new, never absent; the old one, now at `src`,
    is deleted after. Where the swap is unavailable, two renames leave a moment without `dst` (the old one is
    then at `.NAME.old<pid>`). A writer that may run beside others holds `locked_dir(dst)` around this.
    """
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
    if not dst.exists():
        os.replace(src, dst)
        fsync_dir(dst.parent)
    elif _exchange(src, dst):
        fsync_dir(dst.parent)
        shutil.rmtree(src, ignore_errors=True)
    else:
        old = dst.with_name(f".{dst.name}.old{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        fsync_dir(dst.parent)
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths; False where the OS or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    sys.audit("os.rename", a, b, None, None)  # as os.replace does: tools watching renames see this one too
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def check_target(path: str | os.PathLike, *, overwrite: bool, what: str, is_ours: Callable[[Path], bool]) -> None:
    """Raises unless `path` may be written by a job that produces a `what` (e.g. "colbert-jax index").

    Writable: a path that does not exist, an empty directory, or, with `overwrite`, a directory that
    `is_ours` recognises as an earlier output of the same kind. Anything else (a regular file, a symbolic
    link, a directory holding other things) is refused whatever `overwrite` says: we never delete what we
    did not write.
    """
    path = Path(path)
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symbolic link: refusing to replace it; give the real path")
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a {what}: refusing to replace it; choose another path")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    if not is_ours(path):
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise FileExistsError(
            f"{path} is a directory that is not a {what} (it holds {shown}): refusing to replace it; "
            "choose another path, or empty or remove it yourself"
        )
    if not overwrite:
        raise needs_option(
            FileExistsError,
            f"{path} already holds a {what}",
            argument="overwrite=True",
            flag="--overwrite",
            purpose="replace it",
        )
