"""The one-GPU check (fd_ray_sync/gpucheck.py) run as its users run it: a subprocess starting a
trainer and two ranks. Here on CPU over shared memory; on a GPU machine, the small GPU run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "fd_ray_sync" / "gpucheck.py"
CPU_SMALL = ["--device", "cpu", "--gib", "0.02", "--updates", "2"]
# `-m` imports fd_ray_sync/__init__ (Ray, pydantic) first; a bare GPU machine has neither and
# runs the file by its path, which needs torch only.
PACKAGE_IMPORTS = all(importlib.util.find_spec(m) for m in ("ray", "pydantic"))


def run_check(tmp_path, args, timeout, module=False):
    out = tmp_path / "gpucheck.json"
    entry = ["-m", "fd_ray_sync.gpucheck"] if module else [str(SCRIPT)]
    cmd = [sys.executable, *entry, *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


def explain(proc):
    return f"rc={proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


def test_cpu_smoke_every_method_is_bit_identical_and_a_reallocation_is_refused(tmp_path):
    args = [*CPU_SMALL, "--timeout-s", "150"]
    proc, report = run_check(tmp_path, args, 180, module=PACKAGE_IMPORTS)
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


def test_the_module_needs_neither_ray_nor_paddle_nor_pydantic():
    """A bare GPU machine has torch and numpy only: the file must import and run without the
    package (whose __init__ imports Ray and pydantic)."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('gpucheck', 'fd_ray_sync/gpucheck.py')\n"
        "sys.modules['gpucheck'] = module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(sorted(m for m in ('ray', 'paddle', 'pydantic') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    usage = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--inject-fault" in usage.stdout


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
    args = [*CPU_SMALL, "--timeout-s", "20", "--inject-fault", "rank0:ring:hang"]
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
