"""The torch-free .pt reader: exact values for what torch.save writes, refusal of anything else."""

import pickle
import zipfile

import numpy as np
import pytest

from colbert_jax.torch_io import TorchFileError, UnsafeCheckpointError, load_torch_file
from tests.helpers import FIXTURES


def test_reads_every_sample_exactly():
    obj = load_torch_file(FIXTURES / "torch_samples.pt")
    expected = np.load(FIXTURES / "torch_samples.npz")
    for key in ("f32", "f16", "f64", "i64", "i32", "u8", "bool", "transposed", "view", "scalar", "empty", "param"):
        assert obj[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(obj[key], expected[key], err_msg=key)
    np.testing.assert_array_equal(obj["bf16"].astype(np.float32), expected["bf16"])
    assert str(obj["bf16"].dtype) == "bfloat16"
    assert isinstance(obj["pair"], tuple)
    np.testing.assert_array_equal(obj["pair"][0], expected["pair0"])
    np.testing.assert_array_equal(obj["pair"][1], expected["pair1"])
    assert obj["nested"]["n"] == 3 and obj["nested"]["s"] == "text"
    np.testing.assert_array_equal(obj["nested"]["list"][0], [1, 1])
    assert obj["transposed"].flags["C_CONTIGUOUS"]


def _rewrite_pickle(src, dst, payload: bytes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = payload if item.filename.endswith("/data.pkl") else zin.read(item.filename)
            zout.writestr(item, data)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/colbert_jax_pwned",))


def test_refuses_code_execution(tmp_path):
    evil = tmp_path / "evil.pt"
    _rewrite_pickle(FIXTURES / "torch_samples.pt", evil, pickle.dumps({"x": _Evil()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load global '(posix|os)\.system'"):
        load_torch_file(evil)
    import os

    assert not os.path.exists("/tmp/colbert_jax_pwned")


def test_refuses_builtins_eval(tmp_path):
    class EvalReduce:
        def __reduce__(self):
            return (eval, ("1+1",))

    evil = tmp_path / "evil2.pt"
    _rewrite_pickle(FIXTURES / "torch_samples.pt", evil, pickle.dumps(EvalReduce(), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
        load_torch_file(evil)


def test_truncated_and_non_zip_files(tmp_path):
    data = (FIXTURES / "torch_samples.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError):
        load_torch_file(cut)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(TorchFileError, match="legacy format"):
        load_torch_file(legacy)
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "missing.pt")


def test_corrupted_storage_is_detected(tmp_path):
    src = FIXTURES / "torch_samples.pt"
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if "/data/" in item.filename and len(data) > 8:
                data = data[:4]  # storage shorter than its tensors need
            zout.writestr(item, data)
    with pytest.raises(TorchFileError, match="bytes, expected|overruns"):
        load_torch_file(bad)
