"""Device checksums (fd_ray_sync.cuda_hash): the kernel's xxh3-64 and the block layout that
turns per-block hashes into `checksum.digest`.

The kernel's C source also compiles as host C: built with the machine's C compiler, it is
checked here against the xxhash package for every length path and unaligned starts, and
replayed over whole tensors through `checksum.block_ranges` / `digest_of_blocks`. The launch
on a GPU is the gpu-marked test."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import xxhash

from fd_ray_sync import checksum, cuda_hash
from fd_ray_sync.buckets import slice_checksums
from fd_ray_sync.sharding import ShardSpec, take_shard

SHAPES = [
    ((), np.float32),
    ((0,), np.float32),
    ((0, 7), np.uint16),
    ((3,), np.uint8),
    ((300, 4096), np.float32),  # rows of 16 KiB: blocks of 16 rows
    ((70_001,), np.float32),  # a long vector: one block per 256 KiB... of its one index
    ((4, 200, 1024), np.float32),  # an expert stack: each expert digested on its own
    ((3, 600, 700), np.uint16),
    ((2, 1, 300_000), np.uint8),  # nested twice
]


def _array(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return rng.integers(0, 256, n, dtype=np.uint8).view(dtype).reshape(shape)


@pytest.fixture(scope="module", params=["bytes", "words"])
def host_kernel(request, tmp_path_factory):
    """The kernel source built as a host library: xxh3_ranges(table, n, out); "words" takes
    the device's load path (aligned words, unaligned ones cut from two)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler on this machine to build the kernel's source for the host")
    folder = tmp_path_factory.mktemp("xxh3")
    source, lib = folder / "xxh3.c", folder / "xxh3.so"
    source.write_text(cuda_hash.SOURCE)
    args = [cc, "-O2", "-std=c11", "-Wall", "-Werror", "-shared", "-fPIC", "-x", "c"]
    args += ["-DWORD_LOADS"] if request.param == "words" else []
    done = subprocess.run([*args, str(source), "-o", str(lib)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    so = ctypes.CDLL(str(lib))
    so.xxh3_ranges.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p]

    def hash_ranges(table: list[tuple[int, int]]) -> np.ndarray:
        ranges = np.array(table, dtype=np.uint64).reshape(-1, 2)
        out = np.zeros(len(ranges), np.uint64)
        so.xxh3_ranges(ranges.ctypes.data, len(ranges), out.ctypes.data)
        return out

    return hash_ranges


def test_the_kernel_source_is_xxh3_64_at_every_length_and_alignment(host_kernel):
    data = _array((300_000,), np.uint8, seed=1)
    lengths = [*range(0, 1100), 2047, 2048, 2049, 4096, 65_535, 262_144, 299_000]
    for start in (0, 1, 3, 8):
        table = [(data.ctypes.data + start, n) for n in lengths]
        got = host_kernel(table)
        want = [xxhash.xxh3_64_intdigest(data[start : start + n].tobytes()) for n in lengths]
        bad = [n for n, g, w in zip(lengths, got, want) if int(g) != w]
        assert not bad, f"start {start}: lengths {bad[:10]} differ"


@pytest.mark.parametrize("shape,dtype", SHAPES, ids=str)
def test_block_hashes_combine_into_the_host_digest(shape, dtype, host_kernel):
    array = _array(shape, dtype)
    ranges = checksum.block_ranges(array.shape, array.itemsize)
    assert sum(size for _, size in ranges) == array.nbytes
    base = array.ctypes.data
    hashes = host_kernel([(base + offset, size) for offset, size in ranges])
    assert checksum.digest_of_blocks(array.shape, array.itemsize, hashes) == checksum.digest(array)
    other = array.copy().reshape(-1).view(np.uint8)
    if other.size:
        other[-1] ^= 1  # the last byte of the last block
        changed = host_kernel([(other.ctypes.data + o, n) for o, n in ranges])
        assert checksum.digest_of_blocks(array.shape, array.itemsize, changed) != checksum.digest(
            array
        )


def test_digests_of_host_arrays_are_the_host_digest():
    arrays = [_array(s, d, seed=i) for i, (s, d) in enumerate(SHAPES)]
    assert cuda_hash.digests(arrays) == [checksum.digest(a) for a in arrays]


torch = pytest.importorskip("torch")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_device_digests_equal_host_digests_and_slice_checksums_agree():
    from fd_ray_sync import cuda_kernels

    assert cuda_hash.available(), cuda_kernels.failed
    gen = torch.Generator(device="cuda").manual_seed(0)
    tensors = [
        torch.randn(4096, 3456, device="cuda", generator=gen).to(torch.bfloat16),
        torch.randn(8, 512, 1024, device="cuda", generator=gen),
        torch.randn(77, device="cuda", generator=gen),
        torch.empty(0, 5, device="cuda"),
        torch.randint(0, 255, (3,), device="cuda", dtype=torch.uint8),
    ]
    wide = tensors[0]
    column = wide[:, 1728:]  # a strided TP slice
    unaligned = wide.reshape(-1)[3:100_003]  # starts 6 bytes into the allocation
    device = tensors + [column, unaligned]
    host = [(t.view(torch.int16) if t.dtype == torch.bfloat16 else t).cpu().numpy() for t in device]
    assert cuda_hash.device_digests(device) == [checksum.digest(h) for h in host]
    specs = [ShardSpec(axis=1, parts=2, index=i) for i in range(2)]
    bits = wide.view(torch.int16)
    assert slice_checksums(bits, specs) == slice_checksums(bits.cpu().numpy(), specs)
    assert cuda_hash.digests([take_shard(bits, specs[1])]) == [
        checksum.digest(take_shard(bits.cpu().numpy(), specs[1]))
    ]
