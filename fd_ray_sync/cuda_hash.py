"""Checksums of device tensors computed on their GPU: the same numbers as `checksum.digest`.

A checked update over the ipc transport on GPUs used to read every byte back to the host to
hash it (the trainer its slices, each rank what it wrote): PCIe-bound, tens of times the
device copy. Here each block of the blocked digest (`checksum.block_ranges`: at most
`checksum.BLOCK` bytes of a tensor in C order) is hashed with xxh3-64 by one GPU thread, every
block of a batch of tensors in one launch; the host reads back 8 bytes a block and combines
them exactly as `checksum.digest` does (`checksum.digest_of_blocks`). The digest does not
depend on where it was taken, so a device-side checksum meets a host-side one (a snapshot's,
an object-store bucket's) and fingerprints stay comparable across replicas and sources.

The kernel's xxh3-64 (seed 0, the default secret) is written in C that compiles both with
NVRTC and with a host C compiler: the test suite builds it with gcc and checks it against the
`xxhash` package for every length path, and replays whole digests through it (no GPU needed);
the launch itself runs only on a GPU. A strided tensor (a column slice) is first made
contiguous on its device (a temporary the size of the slice). Loaded once per process through
NVRTC and the driver API (`fd_ray_sync.cuda_kernels`); where it cannot load, digests are
taken on the host as before, with one warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fd_ray_sync import checksum
from fd_ray_sync.tensors import on_cuda, to_host

THREADS = 32  # a warp per thread block: a 256 MiB chunk's 1,024 blocks reach 32 SMs
STAGING_BYTES = 256 << 20  # at most this much in contiguous copies of strided slices at once

SOURCE = r"""
#ifdef __CUDACC__
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned char u8;
typedef unsigned long long uintptr_t;
#define FN __device__ static __forceinline__
#define SECRET_SPACE __constant__
#else
#include <stdint.h>
typedef uint64_t u64;
typedef uint32_t u32;
typedef uint8_t u8;
#define FN static inline
#define SECRET_SPACE static const
#endif

/* xxh3-64 with seed 0 and the default 192-byte secret. */
SECRET_SPACE u8 SECRET[192] = {
  0xb8,0xfe,0x6c,0x39,0x23,0xa4,0x4b,0xbe,0x7c,0x01,0x81,0x2c,0xf7,0x21,0xad,0x1c,
  0xde,0xd4,0x6d,0xe9,0x83,0x90,0x97,0xdb,0x72,0x40,0xa4,0xa4,0xb7,0xb3,0x67,0x1f,
  0xcb,0x79,0xe6,0x4e,0xcc,0xc0,0xe5,0x78,0x82,0x5a,0xd0,0x7d,0xcc,0xff,0x72,0x21,
  0xb8,0x08,0x46,0x74,0xf7,0x43,0x24,0x8e,0xe0,0x35,0x90,0xe6,0x81,0x3a,0x26,0x4c,
  0x3c,0x28,0x52,0xbb,0x91,0xc3,0x00,0xcb,0x88,0xd0,0x65,0x8b,0x1b,0x53,0x2e,0xa3,
  0x71,0x64,0x48,0x97,0xa2,0x0d,0xf9,0x4e,0x38,0x19,0xef,0x46,0xa9,0xde,0xac,0xd8,
  0xa8,0xfa,0x76,0x3f,0xe3,0x9c,0x34,0x3f,0xf9,0xdc,0xbb,0xc7,0xc7,0x0b,0x4f,0x1d,
  0x8a,0x51,0xe0,0x4b,0xcd,0xb4,0x59,0x31,0xc8,0x9f,0x7e,0xc9,0xd9,0x78,0x73,0x64,
  0xea,0xc5,0xac,0x83,0x34,0xd3,0xeb,0xc3,0xc5,0x81,0xa0,0xff,0xfa,0x13,0x63,0xeb,
  0x17,0x0d,0xdd,0x51,0xb7,0xf0,0xda,0x49,0xd3,0x16,0x55,0x26,0x29,0xd4,0x68,0x9e,
  0x2b,0x16,0xbe,0x58,0x7d,0x47,0xa1,0xfc,0x8f,0xf8,0xb8,0xd1,0x7a,0xd0,0x31,0xce,
  0x45,0xcb,0x3a,0x8f,0x95,0x16,0x04,0x28,0xaf,0xd7,0xfb,0xca,0xbb,0x4b,0x40,0x7e,
};

#define PRIME32_1 0x9E3779B1ULL
#define PRIME32_2 0x85EBCA77ULL
#define PRIME32_3 0xC2B2AE3DULL
#define PRIME64_1 0x9E3779B185EBCA87ULL
#define PRIME64_2 0xC2B2AE3D27D4EB4FULL
#define PRIME64_3 0x165667B19E3779F9ULL
#define PRIME64_4 0x85EBCA77C2B2AE63ULL
#define PRIME64_5 0x27D4EB2F165667C5ULL
#define MIX_1 0x165667919E3779F9ULL
#define MIX_2 0x9FB21C651E98DF25ULL

/* Little-endian loads. On the device, aligned words only: an unaligned 8 bytes are cut from
   the two words holding them (each word holds a byte of the range, and an aligned word
   never leaves the 256-byte-aligned allocation that byte is in). The host build takes the
   same path with WORD_LOADS defined (the suite checks both). */
#if defined(__CUDACC__) || defined(WORD_LOADS)
#define ALIGNED_WORDS 1
#endif
FN u64 load64(const u8* p) {
#ifdef ALIGNED_WORDS
  const u64 at = (u64)(uintptr_t)p, shift = (at & 7) * 8;
  const u64* w = (const u64*)(at & ~7ULL);
  if (shift == 0) return w[0];
  return (w[0] >> shift) | (w[1] << (64 - shift));
#else
  u64 v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
#endif
}
FN u32 load32(const u8* p) {
  u32 v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
FN u64 key64(int at) {
  u64 v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | SECRET[at + i];
  return v;
}
FN u32 key32(int at) {
  u32 v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | SECRET[at + i];
  return v;
}

FN u64 shift_xor(u64 v, int s) { return v ^ (v >> s); }
FN u64 rotate(u64 v, int r) { return (v << r) | (v >> (64 - r)); }
FN u64 byteswap64(u64 v) {
  u64 r = 0;
  for (int i = 0; i < 8; ++i) { r = (r << 8) | (v & 0xff); v >>= 8; }
  return r;
}
/* The 128-bit product of a and b, its halves xor-ed together. */
FN u64 fold_product(u64 a, u64 b) {
#ifdef __CUDACC__
  return (a * b) ^ __umul64hi(a, b);
#else
  unsigned __int128 p = (unsigned __int128)a * b;
  return (u64)p ^ (u64)(p >> 64);
#endif
}
FN u64 finish64(u64 h) {  /* the xxh64 avalanche */
  h = shift_xor(h, 33) * PRIME64_2;
  h = shift_xor(h, 29) * PRIME64_3;
  return shift_xor(h, 32);
}
FN u64 finish3(u64 h) { return shift_xor(shift_xor(h, 37) * MIX_1, 32); }
FN u64 finish_4to8(u64 h, u64 len) {
  h ^= rotate(h, 49) ^ rotate(h, 24);
  h *= MIX_2;
  h ^= (h >> 35) + len;
  h *= MIX_2;
  return shift_xor(h, 28);
}
FN u64 mix16(const u8* p, int key) {
  return fold_product(load64(p) ^ key64(key), load64(p + 8) ^ key64(key + 8));
}

FN u64 hash_short(const u8* p, u64 len) {  /* 0 to 16 bytes */
  if (len > 8) {
    u64 lo = load64(p) ^ (key64(24) ^ key64(32));
    u64 hi = load64(p + len - 8) ^ (key64(40) ^ key64(48));
    return finish3(len + byteswap64(lo) + hi + fold_product(lo, hi));
  }
  if (len >= 4) {
    u64 both = (u64)load32(p + len - 4) + ((u64)load32(p) << 32);
    return finish_4to8(both ^ (key64(8) ^ key64(16)), len);
  }
  if (len > 0) {
    u32 packed = ((u32)p[0] << 16) | ((u32)p[len >> 1] << 24) | (u32)p[len - 1] | ((u32)len << 8);
    return finish64((u64)packed ^ (u64)(key32(0) ^ key32(4)));
  }
  return finish64(key64(56) ^ key64(64));
}

FN u64 hash_medium(const u8* p, u64 len) {  /* 17 to 240 bytes */
  u64 acc = len * PRIME64_1;
  if (len <= 128) {
    for (int i = (int)((len - 1) / 32); i >= 0; --i) {
      acc += mix16(p + 16 * i, 32 * i);
      acc += mix16(p + len - 16 * (i + 1), 32 * i + 16);
    }
    return finish3(acc);
  }
  for (int i = 0; i < 8; ++i) acc += mix16(p + 16 * i, 16 * i);
  acc = finish3(acc);
  u64 tail = mix16(p + len - 16, 136 - 17);
  for (int i = 8; i < (int)(len / 16); ++i) tail += mix16(p + 16 * i, 16 * (i - 8) + 3);
  return finish3(acc + tail);
}

FN void stripe(u64* acc, const u8* p, int key) {  /* 64 bytes into the 8 lanes */
  for (int lane = 0; lane < 8; ++lane) {
    u64 v = load64(p + 8 * lane);
    u64 k = v ^ key64(key + 8 * lane);
    acc[lane ^ 1] += v;
    acc[lane] += (k & 0xffffffffULL) * (k >> 32);
  }
}

FN u64 hash_long(const u8* p, u64 len) {  /* over 240 bytes: 1 KiB rounds of 16 stripes */
  u64 acc[8] = {PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3,
                PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1};
  u64 rounds = (len - 1) / 1024;
  for (u64 r = 0; r < rounds; ++r) {
    for (int s = 0; s < 16; ++s) stripe(acc, p + r * 1024 + 64 * s, 8 * s);
    for (int lane = 0; lane < 8; ++lane)
      acc[lane] = (shift_xor(acc[lane], 47) ^ key64(128 + 8 * lane)) * PRIME32_1;
  }
  int rest = (int)(((len - 1) - 1024 * rounds) / 64);
  for (int s = 0; s < rest; ++s) stripe(acc, p + rounds * 1024 + 64 * s, 8 * s);
  stripe(acc, p + len - 64, 192 - 64 - 7);
  u64 h = len * PRIME64_1;
  for (int i = 0; i < 4; ++i)
    h += fold_product(acc[2 * i] ^ key64(11 + 16 * i), acc[2 * i + 1] ^ key64(19 + 16 * i));
  return finish3(h);
}

FN u64 xxh3_64(const u8* p, u64 len) {
  if (len <= 16) return hash_short(p, len);
  if (len <= 240) return hash_medium(p, len);
  return hash_long(p, len);
}

/* ranges: n pairs (address, length); out: the xxh3-64 of each. */
#ifdef __CUDACC__
extern "C" __global__ void xxh3_ranges(const u64* ranges, u64 n, u64* out) {
  u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = xxh3_64((const u8*)ranges[2 * i], ranges[2 * i + 1]);
}
#else
void xxh3_ranges(const u64* ranges, u64 n, u64* out) {
  for (u64 i = 0; i < n; ++i)
    out[i] = xxh3_64((const u8*)(uintptr_t)ranges[2 * i], ranges[2 * i + 1]);
}
#endif
"""


def available(log=None) -> bool:
    """Whether the kernel loads in this process (tried once; `log` gets one warning if not)."""
    from fd_ray_sync import cuda_kernels

    return cuda_kernels.available(SOURCE, "xxh3_ranges", "hashing on the host", log)


def device_digests(tensors: Sequence[Any]) -> list[int]:
    """`checksum.digest` of each CUDA tensor (its bytes in C order), taken on its device:
    one kernel launch for every block of many tensors, on torch's current stream (after what
    that stream already wrote), then 8 bytes a block back to the host. A strided tensor is
    copied contiguous first; a launch takes tensors until those copies reach STAGING_BYTES."""
    import torch

    from fd_ray_sync import cuda_kernels

    out: list[int | None] = [None] * len(tensors)
    batches: list[tuple[Any, list[int]]] = []  # (device, indices): one launch each
    staged: dict[Any, int] = {}  # bytes of contiguous copies in each device's open batch
    open_batch: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        extra = 0 if t.is_contiguous() else t.numel() * t.element_size()
        if t.device in open_batch and staged[t.device] + extra > STAGING_BYTES:
            batches.append((t.device, open_batch.pop(t.device)))
        if t.device not in open_batch:
            open_batch[t.device], staged[t.device] = [], 0
        open_batch[t.device].append(i)
        staged[t.device] += extra
    batches += list(open_batch.items())
    for device, indices in batches:
        with torch.cuda.device(device):
            func = cuda_kernels.load(SOURCE, "xxh3_ranges")
            flat = [
                tensors[i] if tensors[i].is_contiguous() else tensors[i].contiguous()
                for i in indices
            ]
            tables = []
            for t in flat:
                table = checksum.block_ranges(tuple(t.shape), t.element_size()).copy()
                table[:, 0] += np.uint64(t.data_ptr())
                tables.append(table)
            counts = [len(table) for table in tables]
            table = np.concatenate(tables)
            ranges = torch.from_numpy(table.view(np.int64)).to(device)
            result = torch.empty(len(table), dtype=torch.int64, device=device)
            cuda_kernels.launch(
                func,
                -(-len(table) // THREADS),
                THREADS,
                ranges.data_ptr(),
                len(table),
                result.data_ptr(),
            )
            values = result.cpu().numpy().view(np.uint64)  # waits for the kernel; `flat` lives
            at = 0
            for i, t, count in zip(indices, flat, counts):
                blocks = values[at : at + count]
                out[i] = checksum.digest_of_blocks(tuple(t.shape), t.element_size(), blocks)
                at += count
    return out  # type: ignore[return-value]


def digests(arrays: Sequence[Any]) -> list[int]:
    """`checksum.digest` of each array: numpy arrays on the host, CUDA tensors on their device
    (read to the host when the kernel cannot load here)."""
    device = [i for i, a in enumerate(arrays) if on_cuda(a)]
    out = [None if on_cuda(a) else checksum.digest(_host(a)) for a in arrays]
    if device:
        if available():
            for i, value in zip(device, device_digests([arrays[i] for i in device])):
                out[i] = value
        else:
            for i in device:
                out[i] = checksum.digest(_host(arrays[i]))
    return out  # type: ignore[return-value]


def _host(array: Any) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else to_host(array)[0]
