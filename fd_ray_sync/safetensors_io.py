"""A strict reader and an atomic writer for the safetensors format. Never unpickles.

Layout: 8 bytes little-endian header length N, N bytes of JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`),
then the data region; offsets are relative to the data region. The reader checks every
entry against the file's real size before any byte is used, so a truncated or corrupt file
is refused by name instead of producing garbage weights. bfloat16 is read as uint16 bits,
F8_E4M3 (float8_e4m3fn) and F8_E5M2 (float8_e5m2) as uint8 bits.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fd_ray_sync.errors import SnapshotError
from fd_ray_sync.tensors import as_storage, contiguous, storage_dtype

_CODE_TO_DTYPE = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_DTYPE_TO_CODE = {v: k for k, v in _CODE_TO_DTYPE.items()}
_MAX_HEADER = 100 << 20
# A pickle stream (protocol 2+, as paddle.save writes) opens with PROTO 0x80 and its number.
_PICKLE_MAGIC = b"\x80"
_PICKLE_PROTOCOLS = (b"\x02", b"\x03", b"\x04", b"\x05")


class TensorEntry:
    """One tensor's place in a safetensors file."""

    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """A validated, memory-mapped safetensors file. `array(name)` is a read-only view."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries, self.metadata, self._data_start = _parse_header(self.path)
        self._map: np.memmap | None = None

    def array(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, mode="r", dtype=np.uint8)
        raw = self._map[self._data_start + entry.begin : self._data_start + entry.end]
        return raw.view(storage_dtype(entry.dtype)).reshape(entry.shape)

    def close(self) -> None:
        self._map = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            fits = 0 < n <= _MAX_HEADER and 8 + n <= size
            raw = f.read(n) if fits else b""
    except OSError as e:
        raise SnapshotError(f"cannot read {path}: {e}") from e
    if not raw.startswith(b"{"):
        if head[:1] == _PICKLE_MAGIC and head[1:2] in _PICKLE_PROTOCOLS:
            raise SnapshotError(
                f"{path} is a pickle file (e.g. written by paddle.save); fd-ray-sync only "
                "reads safetensors and never unpickles. Re-save it with "
                "fd_ray_sync.safetensors_io.write_safetensors."
            )
        if len(head) < 8:
            raise SnapshotError(f"{path} is truncated: {size} bytes, no safetensors header")
        if not fits:
            raise SnapshotError(
                f"{path} is not a valid safetensors file: header length {n} does not fit "
                f"in its {size} bytes (truncated or corrupt)"
            )
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{path} has a corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise SnapshotError(f"{path} has a corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SnapshotError(f"{path}: __metadata__ is not a mapping")
    data_len = size - 8 - n
    entries = {name: _entry(path, name, spec) for name, spec in header.items()}
    # Entries must tile the data region exactly: no gaps, no overlaps, nothing past the end.
    cursor = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != cursor:
            raise SnapshotError(f"{path}: tensor {entry.name!r} overlaps or leaves a gap")
        cursor = entry.end
    if cursor != data_len:
        what = "truncated" if cursor > data_len else "has trailing bytes"
        raise SnapshotError(
            f"{path} is {what}: tensors need {cursor} data bytes, the file holds {data_len}"
        )
    return entries, {str(k): str(v) for k, v in metadata.items()}, 8 + n


def _entry(path: Path, name: str, spec: object) -> TensorEntry:
    if not isinstance(spec, dict):
        raise SnapshotError(f"{path}: header entry {name!r} is not a mapping")
    code = spec.get("dtype")
    if code not in _CODE_TO_DTYPE:
        raise SnapshotError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise SnapshotError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise SnapshotError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}")
    dtype = _CODE_TO_DTYPE[code]
    want = math.prod(shape) * storage_dtype(dtype).itemsize  # Python ints: no overflow
    if want >= 1 << 63:
        raise SnapshotError(
            f"{path}: tensor {name!r} of shape {shape} {dtype} would need {want} bytes, "
            "more than any file can hold (corrupt header)"
        )
    if offsets[1] - offsets[0] != want:
        raise SnapshotError(
            f"{path}: tensor {name!r} of shape {shape} {dtype} needs {want} bytes, "
            f"header gives {offsets[1] - offsets[0]}"
        )
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, tuple[np.ndarray, str]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write `name -> (array, dtype)` atomically (temp file + rename); returns bytes written."""
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    ordered = []
    for name, (array, dtype) in tensors.items():
        data = contiguous(as_storage(array, dtype))
        header[name] = {
            "dtype": _DTYPE_TO_CODE[dtype],
            "shape": list(data.shape),
            "data_offsets": [offset, offset + data.nbytes],
        }
        offset += data.nbytes
        ordered.append(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data region starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for data in ordered:
                f.write(memoryview(data.reshape(-1).view(np.uint8)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return 8 + len(blob) + offset
