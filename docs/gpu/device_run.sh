#!/usr/bin/env bash
# One call on the lent GPU machine (Python 3.12, torch, numpy, cuda-bindings, pytest; no Ray,
# no paddle, no network): the fleet's ipc path over CUDA IPC, then the gpu-marked tests.
# Here first, the few pure-Python dependencies it lacks (4 MB), into an ignored folder:
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     pydantic xxhash pyyaml -d .devwheels
# then: run(command="bash docs/gpu/device_run.sh", carry=[".devwheels"], timeout_s=540)
set -u
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python -m pip install -q --no-index --target /tmp/deps .devwheels/*.whl > "$OUT/pip.log" 2>&1
export PYTHONPATH=/tmp/deps:$PWD
for copies in torch batched; do
  timeout 150 python -m fd_ray_sync.gpucheck.fleet_path --copies $copies \
    --out "$OUT/fleet_path-$copies.json" > "$OUT/fleet_path-$copies.log" 2>&1
  echo "fleet_path --copies $copies exit $?"
  tail -c 1200 "$OUT/fleet_path-$copies.log"
done
timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_cuda_hash.py \
  tests/unit/test_cuda_ipc.py tests/unit/test_gpucheck.py > "$OUT/pytest_gpu.log" 2>&1
echo "pytest -m gpu exit $?"
tail -c 1500 "$OUT/pytest_gpu.log"
