"""The blocked xxh3-64 digest: stride-independent, fused with the copy, and the snapshot
files' checksums (new key and the legacy CRC-32 key)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fd_ray_sync.checksum import (
    BLOCK,
    copy_and_digest,
    copy_and_digests,
    digest,
    digests,
    legacy_crc32,
)
from fd_ray_sync.errors import ChecksumError
from fd_ray_sync.safetensors_io import write_safetensors
from fd_ray_sync.sources.snapshot import (
    CHECKSUM_KEY,
    LEGACY_CRC_KEY,
    SnapshotSource,
    base_name,
    write_rank_snapshot,
)
from fd_ray_sync.version import write_version_file

RNG = np.random.default_rng(0)


def _full(shape, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


# (full shape, the slice a TP rank holds): rows of several blocks, a leading index bigger
# than a block (3-d expert stack), small arrays of one block.
CASES = [
    ((600, 1024), np.s_[:, :512]),  # column slice: 2 KiB rows, many blocks
    ((4, 300, 512), np.s_[:, :, 256:]),  # 300 KiB per leading index > BLOCK: recursion
    ((3, 2, 40, 4096), np.s_[..., 1000:3000]),
    ((3000,), np.s_[1000:2000]),
    ((40, 6), np.s_[:, 3:]),
    ((100000,), np.s_[::2]),
]


@pytest.mark.parametrize("shape, index", CASES)
def test_contiguous_strided_and_block_copied_digests_agree(shape, index):
    view = _full(shape)[index]
    packed = np.ascontiguousarray(view)
    dst = np.empty_like(packed)
    got = copy_and_digest(dst, view)
    assert digest(view) == digest(packed) == got
    np.testing.assert_array_equal(dst, packed)  # it really copied


def test_big_arrays_span_several_blocks_and_are_hashed_in_threads():
    full = _full((64, 3 * BLOCK // 4))  # 48 MiB: above the threshold for the pool
    assert full.nbytes > 32 << 20
    halves = [full[:, : full.shape[1] // 2], full[:, full.shape[1] // 2 :]]
    assert digests(halves) == [digest(np.ascontiguousarray(h)) for h in halves]
    dst = np.empty_like(full)
    assert copy_and_digest(dst, full) == digest(full)
    np.testing.assert_array_equal(dst, full)


def test_one_block_is_the_xxh3_of_the_bytes_and_several_combine_their_digests():
    import xxhash

    small = _full((10,))
    assert digest(small) == xxhash.xxh3_64_intdigest(small.tobytes())
    rows = _full((2 * BLOCK // 4096, 1024))  # two blocks of whole rows
    blocks = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    parts = np.array([xxhash.xxh3_64_intdigest(b.tobytes()) for b in blocks], "<u8")
    assert digest(rows) == xxhash.xxh3_64_intdigest(parts.tobytes())


def test_zero_d_one_d_and_bfloat16_bits():
    scalar = np.array(2.5, np.float32)
    dst = np.empty((), np.float32)
    assert copy_and_digest(dst, scalar) == digest(scalar) == digest(scalar.copy())
    assert dst == scalar and digest(scalar) != digest(np.array(2.0, np.float32))
    vec = _full((BLOCK,))  # 1-d over several blocks: a leading index is one element
    assert digest(vec) == digest(vec.copy())
    bf16 = RNG.integers(0, 1 << 16, size=(300, 1000), dtype=np.uint16)  # bfloat16 bits
    col = bf16[:, 500:]
    dst = np.empty(col.shape, np.uint16)
    assert copy_and_digest(dst, col) == digest(np.ascontiguousarray(col))


def test_a_flipped_byte_changes_the_digest():
    for shape in [(7,), (600, 1024), (4, 300, 512)]:
        a = _full(shape)
        flipped = a.copy()
        raw = flipped.reshape(-1).view(np.uint8)
        raw[raw.size // 2 + 1] ^= 0x01
        assert digest(a) != digest(flipped)
    assert digest(np.zeros(3, np.float32)) != digest(np.zeros(4, np.float32))


def test_copy_and_digest_refuses_a_destination_that_does_not_fit():
    src = _full((8, 8))
    with pytest.raises(ValueError, match="cannot copy"):
        copy_and_digest(np.empty((8, 4), np.float32), src)
    with pytest.raises(ValueError, match="C-contiguous"):
        copy_and_digest(np.empty((8, 16), np.float32)[:, :8], src)


def test_snapshot_files_carry_xxh3_checksums(tmp_path):
    tensors = {"w": _full((300, 1024)), "b": _full((5,))}
    write_rank_snapshot(tmp_path, 0, tensors, 1 << 30)
    write_version_file(tmp_path, "1")
    source = SnapshotSource(tmp_path, 0)
    assert source.manifest()["w"].checksum == digest(tensors["w"])
    source.verify()
    assert CHECKSUM_KEY in source._files[0].metadata
    source.close()


def _legacy_snapshot(folder, tensors, crcs) -> None:
    """A rank file as written before xxh3: CRC-32s under the old metadata key."""
    chunk = {n: (a, "float32") for n, a in tensors.items()}
    write_safetensors(
        folder / f"{base_name(0)}.safetensors", chunk, {LEGACY_CRC_KEY: json.dumps(crcs)}
    )
    write_version_file(folder, "1")


def test_legacy_crc32_snapshots_are_still_verified(tmp_path):
    tensors = {"w": _full((3000, 1024)), "b": _full((5,))}  # w: 12 MiB, CRC of 8 MiB chunks
    crcs = {n: legacy_crc32(a) for n, a in tensors.items()}
    _legacy_snapshot(tmp_path, tensors, crcs)
    source = SnapshotSource(tmp_path, 0)
    # CRC-32s are not digests: the manifest offers none, so the manager checks before
    # writing (verify) rather than after.
    assert all(meta.checksum is None for meta in source.manifest().values())
    source.verify()
    source.close()

    bad = tmp_path / "bad"
    bad.mkdir()
    _legacy_snapshot(bad, tensors, {**crcs, "b": crcs["b"] ^ 1})
    source = SnapshotSource(bad, 0)
    with pytest.raises(ChecksumError, match="'b' does not match its checksum .*crc32"):
        source.verify()
    source.close()


def test_copy_and_digests_copies_each_slice_and_returns_the_digests_of_the_sources():
    rng = np.random.default_rng(3)
    src = rng.standard_normal((300, 2048), dtype=np.float32)  # several blocks a slice
    dst = np.zeros_like(src)
    halves = [np.s_[:, :1024], np.s_[:, 1024:]]  # column slices: strided views
    got = copy_and_digests([dst[h] for h in halves], [src[h] for h in halves])
    np.testing.assert_array_equal(dst, src)
    assert got == [digest(src[h]) for h in halves]
