"""Hostile files: pickles that try to run code, archives that are nested, oversized or cut, and index
directories that were edited, truncated or point outside themselves. Each is refused with the project's own
error naming what is wrong, and no payload runs (each would create a marker file)."""

from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import colbert_jax
from colbert_jax import torch_io
from colbert_jax.index import CorruptIndexError, Index
from colbert_jax.torch_io import TorchFileError, UnsafeCheckpointError, load_torch_file
from tests.helpers import FIXTURES

SAMPLES = FIXTURES / "torch_samples.pt"


def torch_zip(path: Path, pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch.save-style archive: archive/data.pkl, archive/byteorder and archive/data/<key> records."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def text(s: str) -> bytes:
    """A BINUNICODE opcode pushing `s`."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def glob_(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickles each of which creates `marker` if the unpickler lets it run."""
    shell, py = f"touch {marker}", f"open({str(marker)!r}, 'w').close()"
    p2, p4 = b"\x80\x02", b"\x80\x04"
    return {
        "GLOBAL os.system + REDUCE": p2 + glob_("os", "system") + text(shell) + b"\x85R.",
        "GLOBAL posix.system": p2 + glob_("posix", "system") + text(shell) + b"\x85R.",
        "GLOBAL builtins.eval": p2 + glob_("builtins", "eval") + text(py) + b"\x85R.",
        "GLOBAL __builtin__.exec": p2 + glob_("__builtin__", "exec") + text(py) + b"\x85R.",
        "STACK_GLOBAL builtins.eval": p4 + text("builtins") + text("eval") + b"\x93" + text(py) + b"\x85R.",
        "STACK_GLOBAL subprocess.Popen": p4
        + text("subprocess")
        + text("Popen")
        + b"\x93]"
        + text("touch")
        + b"a"
        + text(str(marker))
        + b"a\x85R.",
        "INST os.system": b"(" + text(shell) + b"ios\nsystem\n.",
        "OBJ builtins.eval": b"(" + glob_("builtins", "eval") + text(py) + b"o.",
        "NEWOBJ of an allowed class": p2 + glob_("collections", "OrderedDict") + b")\x81.",
        "REDUCE of a storage type": p2 + glob_("torch", "FloatStorage") + b")R.",
        "BUILD on a rebuild function": p2
        + glob_("torch._utils", "_rebuild_tensor_v2")
        + b"N}"
        + text("__defaults__")
        + b")s\x86b.",
        "BUILD on a storage type": p2 + glob_("torch", "FloatStorage") + b"}" + text("dtype") + text("O") + b"sb.",
        "BUILD dunder on an OrderedDict": p2
        + glob_("collections", "OrderedDict")
        + b")R}"
        + text("__class__")
        + b"Nsb.",
        "EXT1": p2 + b"\x82\x01.",
        "getattr chain": p2 + glob_("builtins", "getattr") + glob_("os", "path") + text("join") + b"\x86R.",
        "nested pickle via eval of pickle.loads": p2 + glob_("pickle", "loads") + b"C\x00\x85R.",
    }


def test_pickles_that_would_run_code_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    rebuild_defaults = torch_io._rebuild_tensor_v2.__defaults__
    float_dtype = torch_io._ALLOWED[("torch", "FloatStorage")].dtype
    for name, pkl in payloads(marker).items():
        path = torch_zip(tmp_path / "evil.pt", pkl)
        with pytest.raises(UnsafeCheckpointError, match="refusing"):
            load_torch_file(path)
        assert not marker.exists(), name
    # Nothing shared between loads was changed by a refused BUILD.
    assert torch_io._rebuild_tensor_v2.__defaults__ == rebuild_defaults
    assert torch_io._ALLOWED[("torch", "FloatStorage")].dtype == float_dtype


def test_a_state_dict_with_metadata_still_loads(tmp_path):
    """torch's state_dict is an OrderedDict with a `_metadata` attribute, pickled with BUILD: allowed."""
    od = collections.OrderedDict(a=1)
    od._metadata = {"": {"version": 1}}
    loaded = load_torch_file(torch_zip(tmp_path / "ok.pt", pickle.dumps(od, protocol=2)))
    assert loaded == {"a": 1} and loaded._metadata == {"": {"version": 1}}


def test_nested_oversized_and_non_torch_archives(tmp_path):
    nested = tmp_path / "nested.pt"
    with zipfile.ZipFile(nested, "w") as z:
        z.writestr("inner.pt", SAMPLES.read_bytes())
    with pytest.raises(TorchFileError, match="expected one '<prefix>/data.pkl' entry, found 0"):
        load_torch_file(nested)
    two = tmp_path / "two.pt"
    with zipfile.ZipFile(two, "w") as z:
        z.writestr("a/data.pkl", pickle.dumps(1))
        z.writestr("b/data.pkl", pickle.dumps(2))
    with pytest.raises(TorchFileError, match="found 2"):
        load_torch_file(two)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(1, protocol=2))
        z.writestr("archive/data/0", b"\0" * (64 << 20))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(TorchFileError, match="expand to 67,108,"):
        load_torch_file(bomb)
    zip_as_pickle = torch_zip(tmp_path / "zip_in_pkl.pt", SAMPLES.read_bytes())
    with pytest.raises(TorchFileError, match="corrupt torch.save file"):
        load_torch_file(zip_as_pickle)


def test_truncated_or_bit_flipped_archives_are_refused_or_read_intact(tmp_path):
    data = SAMPLES.read_bytes()
    expected = load_torch_file(SAMPLES)
    rng = np.random.default_rng(0)
    for cut in sorted(set(rng.integers(1, len(data), 40).tolist()) | {1, len(data) - 1}):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(TorchFileError):
            load_torch_file(tmp_path / "cut.pt")
    for pos in rng.integers(0, len(data), 60).tolist():
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(8))
        (tmp_path / "flip.pt").write_bytes(bytes(flipped))
        try:
            obj = load_torch_file(tmp_path / "flip.pt")
        except TorchFileError:
            continue
        # A flip the zip format ignores (a header's spare fields): the tensors must be the original ones.
        for key in ("f32", "i64", "u8", "param"):
            np.testing.assert_array_equal(obj[key], expected[key], err_msg=f"flip at {pos}")


def test_storage_records_out_of_bounds(tmp_path):
    """A tensor claiming more elements than its storage holds, or a missing record."""
    pkl = (
        b"\x80\x02"
        + glob_("torch._utils", "_rebuild_tensor_v2")
        + b"(("
        + text("storage")
        + glob_("torch", "FloatStorage")
        + text("0")
        + text("cpu")
        + b"K\x04tQK\x00K\x10\x85K\x01\x85\x89NtR."  # storage of 4 floats, tensor of 16
    )
    with pytest.raises(TorchFileError, match="overruns its storage"):
        load_torch_file(torch_zip(tmp_path / "over.pt", pkl, {"0": b"\0" * 16}))
    with pytest.raises(TorchFileError, match="is missing"):
        load_torch_file(torch_zip(tmp_path / "missing.pt", pkl))
    with pytest.raises(TorchFileError, match="holds 8 bytes, expected 16"):
        load_torch_file(torch_zip(tmp_path / "short.pt", pkl, {"0": b"\0" * 8}))


# -- index directories ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_index(tmp_path_factory, tiny_model, small_collection) -> Path:
    path = tmp_path_factory.mktemp("hostile_index") / "idx"
    lines = small_collection.read_text().splitlines()[:40]
    coll = path.parent / "c.tsv"
    coll.write_text("\n".join(lines) + "\n")
    colbert_jax.Indexer(tiny_model, nbits=2, chunksize=64, show_progress=False).index(path, coll)
    return path


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def first_chunk(array_dir: Path) -> Path:
    return sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())[0]


def _shape(name):
    def change(z):
        z["shape"][0] += 1
        z["chunk_grid"]["configuration"]["chunk_shape"][0] = z["shape"][0]

    return lambda idx: edit_json(idx / name / "zarr.json", change)


def _dtype(name, dtype):
    return lambda idx: edit_json(idx / name / "zarr.json", lambda z: z.update(data_type=dtype))


def _flip(name):
    def damage(idx):
        f = first_chunk(idx / name)
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))

    return damage


def _truncate(name):
    def damage(idx):
        f = first_chunk(idx / name)
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    return damage


def _moved(name, where):
    def damage(idx):
        outside = idx.parent / f"outside_{name}"
        shutil.copytree(idx / name, outside, dirs_exist_ok=True)
        edit_json(idx / "metadata.json", lambda m: m["arrays"][name].update(path=where(outside)))

    return damage


def _symlinked(name):
    def damage(idx):
        outside = idx.parent / f"linked_{name}"
        shutil.move(idx / name, outside)
        os.symlink(outside, idx / name)

    return damage


def _counts(name):
    return lambda idx: edit_json(idx / "metadata.json", lambda m: m["arrays"][name]["shape"].__setitem__(0, 7))


DAMAGE = {
    "codes shape": (_shape("codes"), "'codes' is int32"),
    "doclens shape": (_shape("doclens"), "'doclens' is int32"),
    "residuals dtype": (_dtype("residuals", "int8"), "'residuals' is int8"),
    "pids dtype": (_dtype("pids", "float64"), "'pids' is float64"),
    "codes tampered": (_flip("codes"), "'codes' is corrupt"),
    "ivf tampered": (_flip("ivf"), "'ivf' is corrupt"),
    "residuals truncated": (_truncate("residuals"), "'residuals' is corrupt"),
    "texts truncated": (_truncate("texts"), "'texts' is corrupt"),
    "centroids zarr.json removed": (lambda idx: (idx / "centroids" / "zarr.json").unlink(), "'centroids' is missing"),
    "codes path with ..": (_moved("codes", lambda o: f"../{o.name}"), "'codes' at '../outside_codes', outside"),
    "codes absolute path": (_moved("codes", str), "'codes' at '/.*', outside"),
    "residuals symlinked out": (_symlinked("residuals"), "'residuals' at 'residuals', outside"),
    "doclens count": (_counts("doclens"), "array 'doclens'"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_index_is_refused_naming_the_array(case, clean_index, tmp_path):
    damage, message = DAMAGE[case]
    idx = tmp_path / "idx"
    shutil.copytree(clean_index, idx)
    Index.open(idx)  # the copy is fine
    damage(idx)
    with pytest.raises(CorruptIndexError, match=message):
        Index.open(idx)


def test_metadata_that_is_not_an_index(clean_index, tmp_path):
    idx = tmp_path / "idx"
    shutil.copytree(clean_index, idx)
    (idx / "metadata.json").write_text("{not json")
    with pytest.raises(CorruptIndexError, match="not valid JSON"):
        Index.open(idx)
    (idx / "metadata.json").write_text(json.dumps({"format": "colbert-jax-index", "format_version": 99}))
    with pytest.raises(CorruptIndexError, match="format version 99"):
        Index.open(idx)
