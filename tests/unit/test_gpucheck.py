"""The one-GPU check (``python -m fd_ray_sync.gpucheck``) run as its users run it: a subprocess
starting a trainer and two ranks. Here on CPU over shared memory; on a GPU machine, the small GPU
run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fd_ray_sync.gpucheck import plan as gc
from fd_ray_sync.params import wide_pair

ROOT = Path(__file__).resolve().parents[2]
CPU_SMALL = ["--device", "cpu", "--gib", "0.02", "--updates", "2"]
MODULES = (
    *("plan", "proc", "floor", "trainer", "rank", "tree", "report", "parent", "fleet_path"),
    "__main__",
)


def test_the_synthetic_model_is_900_tensors_of_about_the_asked_size_split_evenly():
    for gib in (0.02, 1.0, 16.0):
        specs = gc.model_specs(gib)
        assert len(specs) == 900
        total = sum(s.nbytes for s in specs)
        assert abs(total / gc.GiB - gib) / gib < 0.15  # h is a multiple of 16
        assert {s.split for s in specs} == {"row", "col", "rep"}
        row = sum(s.nbytes for s in specs if s.split == "row")
        assert row == sum(s.nbytes for s in specs if s.split == "col")  # half by rows, half by cols
        for s in specs:  # every TP slice is whole
            assert 2 * math.prod(s.rank_shape()) * (1 if s.split == "rep" else 2) == s.nbytes


def test_rank_slices_are_views_rows_contiguous_columns_strided():
    spec = gc.TensorSpec("w", (4, 6), "col")
    full = torch.arange(24, dtype=torch.float32).reshape(4, 6).to(torch.bfloat16)
    right = spec.rank_slice(full, 1)
    assert right.shape == (4, 3) and not right.is_contiguous()
    assert right.data_ptr() == full.data_ptr() + 3 * 2  # a view, not a copy
    rows = gc.TensorSpec("w", (4, 6), "row").rank_slice(full, 1)
    assert rows.is_contiguous() and torch.equal(rows, full[2:])


def test_bucket_plans_align_fill_in_order_and_refuse_an_item_too_big():
    plan = gc.plan_buckets([100, 300, 200, 1000, 10], bucket_bytes=1024)
    assert plan == [[(0, 0), (1, 256), (2, 768)], [(3, 0)], [(4, 0)]]
    for bucket in plan:
        assert all(off % gc.ALIGN == 0 for _, off in bucket)
    with pytest.raises(ValueError, match="raise --bucket-mib"):
        gc.plan_buckets([10, 2048], bucket_bytes=1024)
    specs = gc.model_specs(0.02)
    parts = gc.host_parts(specs)
    assert len(parts) == sum(1 if s.split == "rep" else 2 for s in specs)


def test_the_checksum_ignores_layout_and_sees_swapped_rows_or_columns():
    x = torch.randint(0, gc.VALUE_MASK + 1, (64, 48), dtype=torch.int16).view(torch.bfloat16)
    wide = torch.zeros(64, 96, dtype=torch.bfloat16)
    wide[:, 48:] = x
    assert int(gc.checksum(wide[:, 48:])) == int(gc.checksum(x))  # strided view, same values
    assert gc.equal_bits(wide[:, 48:], x)
    assert int(gc.checksum(x[[1, 0, *range(2, 64)]])) != int(gc.checksum(x))
    assert int(gc.checksum(x[:, [1, 0, *range(2, 48)]])) != int(gc.checksum(x))
    y = x.clone()
    y.view(torch.int16)[5, 7] ^= 1
    assert not gc.equal_bits(x, y)


def run_check(tmp_path, args, timeout):
    out = tmp_path / "gpucheck.json"
    cmd = [sys.executable, "-m", "fd_ray_sync.gpucheck", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def explain(proc):
    return f"rc={proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


def test_a_strided_slice_is_copied_as_wider_integers_with_the_same_bits():
    full = torch.arange(8 * 24, dtype=torch.int16).view(torch.bfloat16).view(8, 24)
    for cols, want in ((slice(12, 24), torch.int64), (slice(6, 12), torch.int32)):
        dst = torch.zeros(8, cols.stop - cols.start, dtype=torch.bfloat16)
        d, s = wide_pair(dst, full[:, cols])
        assert d.dtype == s.dtype == want
        d.copy_(s)
        assert torch.equal(dst.view(torch.int16), full[:, cols].view(torch.int16))
    odd = torch.zeros(8, 3, dtype=torch.bfloat16)  # 6-byte rows: kept as they are
    assert wide_pair(odd, full[:, 3:6])[1].dtype == torch.bfloat16


def test_the_batched_copy_tiles_cover_every_byte_and_nothing_else():
    """The tile table of ``--copies batched``, replayed row by row with memmove (what the kernel
    does with 16-byte words): every destination byte right, the canary around them untouched,
    and a copy the kernel cannot take (6-byte rows) left to torch."""
    import ctypes

    from fd_ray_sync import cuda_copy as batched

    specs = gc.model_specs(0.02)
    model = [torch.randint(-(2**15), 2**15, s.shape, dtype=torch.int16) for s in specs]
    model.append(torch.randint(-(2**15), 2**15, (batched.CHUNK * 2 + 48,), dtype=torch.int16))
    model.append(torch.randint(-(2**15), 2**15, (4, 6), dtype=torch.int16))
    views = [s.rank_slice(t, 1) for s, t in zip(specs, model)] + [model[-2], model[-1][:, 3:]]
    gap = 64  # bytes of canary between destinations
    offsets, at = [], gap
    for v in views:
        offsets.append(at)
        at = gc.align(at + 2 * v.numel()) + gap
    arena = torch.full((at,), 0xA5, dtype=torch.uint8)
    dsts = [
        arena[o : o + 2 * v.numel()].view(torch.int16).view(v.shape) for o, v in zip(offsets, views)
    ]
    pairs = [wide_pair(d, v) for d, v in zip(dsts, views)]
    table, rest = batched.plan_tiles(pairs)
    assert [d.shape for d, _ in rest] == [(4, 3)]  # only the 6-byte rows
    assert len(table) > len(pairs)  # big copies are cut into tiles
    assert (table["rows"].astype(int) * table["vecs"] * batched.WORD <= batched.TILE_BYTES).all()
    for t in table:
        for r in range(int(t["rows"])):
            src, dst = int(t["src"]) + r * int(t["spitch"]), int(t["dst"]) + r * int(t["dpitch"])
            ctypes.memmove(dst, src, int(t["vecs"]) * batched.WORD)
    for d, s in rest:
        d.copy_(s)
    for d, v in zip(dsts, views):
        assert torch.equal(d, v)
    canary = torch.ones(at, dtype=torch.bool)
    for o, v in zip(offsets, views):
        canary[o : o + 2 * v.numel()] = False
    assert (arena[canary] == 0xA5).all()


def test_cpu_smoke_every_method_is_bit_identical_and_a_reallocation_is_refused(tmp_path):
    args = [*CPU_SMALL, "--timeout-s", "150"]
    proc, report = run_check(tmp_path, args, 180)
    assert proc.returncode == 0, explain(proc)
    methods = report["methods"]
    for name in ("floor", "floor_sliced", "ring", "registered", "host"):
        assert methods[name]["bit_identical"] is True, (name, methods[name])
        assert methods[name]["best_s"] > 0
    refusal = report["refusal"]
    assert refusal["seen"] and refusal["confirmed_after_reregister"], refusal
    assert len(refusal["messages"]) == 2
    assert all("reallocated since they were registered" in m for m in refusal["messages"])
    assert "reallocation refusal seen: yes" in proc.stdout


def test_the_package_needs_neither_ray_nor_paddle_nor_pydantic():  # in a fresh interpreter
    """A bare GPU machine has torch and numpy only: every module of the package must import (and
    the check start) with Ray, paddle and pydantic unimportable."""
    block = (
        "import importlib, importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'paddle', 'pydantic'):\n"
        "            raise ImportError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    imports = "".join(f"importlib.import_module('fd_ray_sync.gpucheck.{m}')\n" for m in MODULES)
    imports += "importlib.import_module('fd_ray_sync.cuda_copy')\n"
    check = "print(sorted(m for m in ('ray', 'paddle', 'pydantic') if m in sys.modules))\n"
    code = block + imports + check
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    run = "import runpy; sys.argv = ['gpucheck', '--help']\n"
    run += "runpy.run_module('fd_ray_sync.gpucheck', run_name='__main__')\n"
    usage = subprocess.run(
        [sys.executable, "-c", block + run], cwd=ROOT, capture_output=True, text=True
    )
    assert usage.returncode == 0 and "--inject-fault" in usage.stdout, usage.stderr


def test_a_dead_rank_or_a_raising_trainer_fails_only_that_method(tmp_path):
    faults = ["--inject-fault", "rank1:ring:exit", "--inject-fault", "trainer:registered:raise"]
    proc, report = run_check(tmp_path, [*CPU_SMALL, "--timeout-s", "150", *faults], 180)
    assert proc.returncode == 1, explain(proc)
    methods = report["methods"]
    assert "rank1: died with exit code 7" in methods["ring"]["error"]
    assert "injected fault in trainer, registered update 1" in methods["registered"]["error"]
    assert methods["host"]["bit_identical"] is True  # on a fresh trainer and ranks
    assert "injected fault in trainer" in proc.stdout  # the traceback, in the parent's log


def test_a_hang_ends_at_the_global_timeout_with_stacks_and_the_partial_table(tmp_path):
    args = [*CPU_SMALL, "--timeout-s", "30", "--inject-fault", "rank0:ring:hang"]
    proc, report = run_check(tmp_path, args, 120)
    assert proc.returncode == 3, explain(proc)
    methods = report["methods"]
    assert methods["floor"]["bit_identical"] is True
    assert "rank0: no answer to 'ring' before the deadline" in methods["ring"]["error"]
    assert methods["host"]["error"] == "not run: global timeout"
    assert "in maybe_fault" in proc.stderr  # the hung rank's stack, asked for before the kill
    assert "FAILED: not run: global timeout" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"
)
def test_gpu_small_run_is_bit_identical_and_ranks_write_in_place(tmp_path):
    args = ["--device", "cuda", "--gib", "1", "--updates", "2", "--bucket-mib", "64"]
    proc, report = run_check(tmp_path, [*args, "--timeout-s", "300"], 360)
    assert proc.returncode == 0, explain(proc)
    methods = report["methods"]
    for name in ("floor", "ring", "ring_hostsync", "registered", "host"):
        assert methods[name]["bit_identical"] is True, (name, methods[name])
    for name in ("ring", "ring_hostsync", "registered", "host"):
        assert all(m is not None and m < 64 for m in methods[name]["rank_extra_mib"]), methods[name]
    assert report["refusal"]["seen"] and report["refusal"]["confirmed_after_reregister"]
