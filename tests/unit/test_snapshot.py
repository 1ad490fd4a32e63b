import numpy as np
import pytest

from fd_ray_sync.buckets import plan_parts
from fd_ray_sync.errors import ChecksumError, SnapshotError, VersionError
from fd_ray_sync.safetensors_io import write_safetensors
from fd_ray_sync.sharding import ShardSpec
from fd_ray_sync.sources.snapshot import (
    SnapshotSource,
    find_snapshot_files,
    write_rank_snapshot,
    write_snapshot,
)
from fd_ray_sync.version import (
    is_newer,
    read_version_file,
    validate_version,
    write_version_file,
)


def _state(n=6, size=100):
    rng = np.random.default_rng(1)
    return {f"layer{i}.w": rng.standard_normal(size).astype(np.float32) for i in range(n)}


def _loaded(source):
    out = {}
    for _, chunk in source.chunks():
        out.update({n: np.array(a) for n, (a, _) in chunk.items()})
    return out


def test_plan_parts_packs_in_order():
    assert plan_parts({"a": 4, "b": 4, "c": 4}, 8) == [["a", "b"], ["c"]]
    assert plan_parts({"big": 20, "a": 1}, 8) == [["big"], ["a"]]
    assert plan_parts({}, 8) == []


def test_parts_load_in_numeric_order_with_one_part_mapped_at_a_time(tmp_path):
    state = _state(12)
    paths = write_rank_snapshot(tmp_path, 0, state, part_bytes=400 * 1 + 1)
    assert len(paths) == 12  # 400-byte tensors, one per part: part0..part11
    assert [p.name for p in paths][10] == "model_state.tp0.0.part10.safetensors"
    source = SnapshotSource(tmp_path, tp_rank=0)
    # Numeric, not lexicographic, order: part2 comes before part10.
    assert [p.name.split(".")[3] for p in source.paths][:3] == ["part0", "part1", "part2"]
    labels = [label for label, _ in source.chunks()]
    assert labels == [p.name for p in paths]
    source.verify()
    got = _loaded(SnapshotSource(tmp_path, 0))
    assert set(got) == set(state)
    for name in state:
        np.testing.assert_array_equal(got[name], state[name])


def test_misnamed_part_files_are_warned_and_ignored(tmp_path, caplog):
    state = _state(2)
    write_rank_snapshot(tmp_path, 0, state, part_bytes=400)
    (tmp_path / "model_state.tp0.0.partX.safetensors").write_bytes(b"junk")
    (tmp_path / "model_state.tp0.0.part1.bak").write_bytes(b"junk")
    with caplog.at_level("WARNING"):
        source = SnapshotSource(tmp_path, 0)
    assert len(source.paths) == 2
    assert "partX.safetensors" in caplog.text and "part1.bak" in caplog.text


def test_gap_in_part_numbers_is_refused(tmp_path):
    write_rank_snapshot(tmp_path, 0, _state(3), part_bytes=400)
    (tmp_path / "model_state.tp0.0.part1.safetensors").unlink()
    with pytest.raises(SnapshotError, match=r"gap: part\(s\) \[1\] missing"):
        SnapshotSource(tmp_path, 0)


def test_priority_parts_then_full_then_legacy_then_fallback(tmp_path):
    folder, fallback = tmp_path / "m", tmp_path / "shared"
    folder.mkdir()
    fallback.mkdir()
    one = {"w": (np.ones(3, np.float32), "float32")}
    two = {"w": (np.full(3, 2, np.float32), "float32")}
    three = {"w": (np.full(3, 3, np.float32), "float32")}
    four = {"w": (np.full(3, 4, np.float32), "float32")}
    write_safetensors(fallback / "model_state.tp1.0.safetensors", four)
    assert find_snapshot_files(folder, 1, 0, fallback)[0].parent == fallback
    write_safetensors(folder / "model_state.tp00.pdparams", three)  # legacy name
    assert find_snapshot_files(folder, 1, 0, fallback)[0].name == "model_state.tp00.pdparams"
    write_safetensors(folder / "model_state.tp1.0.pdparams", two)  # FastDeploy's extension
    assert find_snapshot_files(folder, 1, 0, fallback)[0].name == "model_state.tp1.0.pdparams"
    write_safetensors(folder / "model_state.tp1.0.part0.safetensors", one)
    source = SnapshotSource(folder, 1, 0, fallback)
    np.testing.assert_array_equal(_loaded(source)["w"], np.ones(3))


def test_missing_snapshot_names_every_place_checked(tmp_path):
    with pytest.raises(SnapshotError, match=r"no snapshot found for model_state\.tp3\.7"):
        SnapshotSource(tmp_path, tp_rank=3, snapshot_id=7, fallback_dir=tmp_path / "fb")
    with pytest.raises(SnapshotError, match="does not exist"):
        SnapshotSource(tmp_path / "nope", 0)


def test_checksum_mismatch_is_named(tmp_path):
    paths = write_rank_snapshot(tmp_path, 0, _state(1), part_bytes=1 << 20)
    data = bytearray(paths[0].read_bytes())
    data[-1] ^= 0xFF
    paths[0].write_bytes(bytes(data))
    source = SnapshotSource(tmp_path, 0)
    with pytest.raises(ChecksumError, match="layer0.w' does not match its checksum"):
        source.verify()


def test_writer_cuts_each_rank_slice_and_writes_version_last(tmp_path):
    full = {"col": np.arange(24, dtype=np.float32).reshape(4, 6), "rep": np.ones(5, np.float32)}

    def plan(r):
        return {"col": ShardSpec(axis=1, parts=2, index=r)}

    written = write_snapshot(tmp_path, full, plan, tp=2, version="17", part_bytes=1 << 20)
    assert sorted(written) == [0, 1]
    assert read_version_file(tmp_path) == "17"
    for r in (0, 1):
        got = _loaded(SnapshotSource(tmp_path, r))
        np.testing.assert_array_equal(got["col"], full["col"][:, 3 * r : 3 * r + 3])
        np.testing.assert_array_equal(got["rep"], full["rep"])
    # Rewriting with fewer parts leaves no stale part behind.
    write_rank_snapshot(tmp_path, 0, _state(4), part_bytes=400)
    write_rank_snapshot(tmp_path, 0, _state(2), part_bytes=1 << 20)
    assert [p.name for p in tmp_path.glob("model_state.tp0.*")] == ["model_state.tp0.0.safetensors"]


def test_version_file_errors_are_clear(tmp_path):
    with pytest.raises(VersionError, match="version.yaml does not exist"):
        read_version_file(tmp_path)
    (tmp_path / "version.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(VersionError, match="is not a mapping"):
        read_version_file(tmp_path)
    (tmp_path / "version.yaml").write_text("other: 3\n")
    with pytest.raises(VersionError, match="has no 'step' field"):
        read_version_file(tmp_path)
    (tmp_path / "version.yaml").write_text("step: [unclosed\n")
    with pytest.raises(VersionError, match="cannot read"):
        read_version_file(tmp_path)
    write_version_file(tmp_path, "42")
    assert read_version_file(tmp_path) == "42"


def test_versions_are_validated_and_ordered():
    assert validate_version(7) == "7"
    for bad in ("", "../etc", "a/b", "x" * 200, ".hidden", True, None, "a..b"):
        with pytest.raises(VersionError):
            validate_version(bad)
    assert is_newer("10", "9") and not is_newer("9", "10") and not is_newer("3", "3")
    assert is_newer("step-10", "step-9") and is_newer("1", None)


def test_a_file_that_escapes_its_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write_rank_snapshot(outside, 0, _state(1), part_bytes=1 << 20)
    folder = tmp_path / "snap"
    folder.mkdir()
    (folder / "model_state.tp0.0.safetensors").symlink_to(outside / "model_state.tp0.0.safetensors")
    with pytest.raises(SnapshotError, match="outside the snapshot folder"):
        SnapshotSource(folder, 0)


def test_default_file_names_carry_each_ranks_own_id_as_fastdeploy_writes_them(tmp_path):
    # A FastDeploy tp=2 replica on GPUs 0 and 1 writes model_state.tp0.0 and model_state.tp1.1.
    write_safetensors(
        tmp_path / "model_state.tp0.0.pdparams", {"w": (np.zeros(2, "f4"), "float32")}
    )
    write_safetensors(tmp_path / "model_state.tp1.1.pdparams", {"w": (np.ones(2, "f4"), "float32")})
    assert _loaded(SnapshotSource(tmp_path, tp_rank=1))["w"].tolist() == [1.0, 1.0]
    assert _loaded(SnapshotSource(tmp_path, tp_rank=0))["w"].tolist() == [0.0, 0.0]
    out = tmp_path / "ours"
    write_snapshot(out, {"w": np.zeros(4, "f4")}, lambda r: {}, tp=2, version="1", part_bytes=64)
    assert sorted(p.name for p in out.glob("model_state.*")) == [
        "model_state.tp0.0.safetensors",
        "model_state.tp1.1.safetensors",
    ]


def test_a_zero_dim_tensor_keeps_its_shape_in_a_snapshot(tmp_path):
    write_rank_snapshot(tmp_path, 0, {"scale": np.asarray(1.5, np.float32)}, part_bytes=64)
    source = SnapshotSource(tmp_path, tp_rank=0)
    assert source.manifest()["scale"].shape == ()
    assert _loaded(source)["scale"].shape == ()


def test_a_header_shape_beyond_int64_is_a_snapshot_error(tmp_path):
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}})
    path = tmp_path / "model_state.tp0.0.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
    with pytest.raises(SnapshotError, match="more than any file can hold"):
        SnapshotSource(tmp_path, tp_rank=0)


def test_a_version_with_a_trailing_newline_is_refused():
    with pytest.raises(VersionError, match="invalid version"):
        validate_version("5\n")
