import pickle
import struct

import numpy as np
import pytest
import safetensors.numpy

from fd_ray_sync.checksum import digest, fingerprint
from fd_ray_sync.errors import SnapshotError
from fd_ray_sync.safetensors_io import SafetensorsFile, write_safetensors


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a": (rng.standard_normal((3, 5)).astype(np.float32), "float32"),
        "b": (np.arange(7, dtype=np.int64), "int64"),
        "h": (rng.standard_normal(4).astype(np.float16), "float16"),
        "bf": (np.array([0x3F80, 0x4000], dtype=np.uint16), "bfloat16"),
    }


def test_round_trip_and_interop_with_official_library(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = _tensors()
    write_safetensors(path, tensors, {"k": "v"})
    f = SafetensorsFile(path)
    assert f.metadata == {"k": "v"}
    for name, (arr, dtype) in tensors.items():
        assert f.entries[name].dtype == dtype
        np.testing.assert_array_equal(f.array(name), arr)
    # The official reader accepts our files (numpy has no bfloat16, so leave it out there).
    no_bf = {k: v for k, v in tensors.items() if k != "bf"}
    write_safetensors(path, no_bf)
    official = safetensors.numpy.load_file(str(path))
    for name, (arr, _) in no_bf.items():
        np.testing.assert_array_equal(official[name], arr)
    # ...and we read the official writer's files.
    safetensors.numpy.save_file({"z": np.ones((2, 2), np.float32)}, str(path))
    np.testing.assert_array_equal(SafetensorsFile(path).array("z"), np.ones((2, 2)))


def test_truncated_file_is_refused_by_name(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, _tensors())
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(SnapshotError, match=r"t\.safetensors is truncated"):
        SafetensorsFile(path)
    path.write_bytes(data[:5])
    with pytest.raises(SnapshotError, match="truncated"):
        SafetensorsFile(path)


def test_corrupt_header_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8)
    with pytest.raises(SnapshotError, match="corrupt safetensors header"):
        SafetensorsFile(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(SnapshotError, match="header length"):
        SafetensorsFile(path)
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(SnapshotError, match="needs 16 bytes"):
        SafetensorsFile(path)


def test_pickle_is_refused_not_loaded(tmp_path):
    path = tmp_path / "model.pdparams"
    marker = tmp_path / "was_unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(SnapshotError, match="pickle file"):
        SafetensorsFile(path)
    assert not marker.exists()


def test_checksums_and_fingerprint():
    a = np.arange(10, dtype=np.float32)
    assert digest(a) == digest(a.copy())
    assert digest(a) != digest(a + 1)
    assert digest(a[::2]) == digest(np.ascontiguousarray(a[::2]))
    fp1 = fingerprint([("x", "float32", a), ("y", "float32", a * 2)])
    assert fp1 == fingerprint([("y", "float32", a * 2), ("x", "float32", a)])
    assert fp1 != fingerprint([("x", "float32", a), ("y", "float32", a * 3)])
    assert fp1 != fingerprint([("x", "float32", a), ("z", "float32", a * 2)])
