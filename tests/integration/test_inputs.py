"""Trainer tensors as users hold them go through `Fleet.update`: paddle and torch, float32
and bfloat16, whole and 0-d; each rank ends with its slice's exact bits."""

import functools

import numpy as np
import paddle
import pytest
import torch

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine.synthetic import SyntheticEngine, synthetic_shapes
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.sharding import take_shard
from fd_ray_sync.tensors import to_host

pytestmark = pytest.mark.slow
TOTAL = 2 << 20


@pytest.fixture(scope="module")
def bf16_fleet(ray_cluster):
    factory = functools.partial(SyntheticEngine, TOTAL, dtype="bfloat16")
    fleet = Fleet.launch(
        FleetConfig(name="bf16", tp=2, dp=1, enable_expert_parallel=False), engine_factory=factory
    )
    yield fleet
    fleet.shutdown()


def random_bits(seed):
    """bfloat16 weights as their uint16 bits: finite values of every magnitude."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in synthetic_shapes(TOTAL).items():
        scale = 10.0 ** int(rng.integers(-3, 3))
        values = (rng.standard_normal(shape) * scale).astype(np.float32)
        out[name] = (values.view(np.uint32) >> 16).astype(np.uint16)
    return out


def expected(fleet, bits):
    return {
        rank: fingerprint((n, "bfloat16", take_shard(a, plan[n])) for n, a in bits.items())
        for rank, plan in fleet.shard_plans().items()
    }


def held(fleet):
    return {r["rank"]: r["fingerprint"] for r in fleet.status()["ranks"]}


def test_paddle_bfloat16_tensors(bf16_fleet):
    bits = random_bits(1)
    weights = {n: paddle.to_tensor(a.view(np.int16)).view(paddle.bfloat16) for n, a in bits.items()}
    assert {to_host(t)[1] for t in weights.values()} == {"bfloat16"}
    bf16_fleet.update(weights, version=1)  # a mapping: pipelined
    assert held(bf16_fleet) == expected(bf16_fleet, bits)


def test_torch_bfloat16_tensors_streamed(bf16_fleet):
    bits = random_bits(2)
    weights = {
        n: torch.from_numpy(a.astype(np.int16)).view(torch.bfloat16) for n, a in bits.items()
    }
    bf16_fleet.update(iter(weights.items()), version=2)  # an iterator: gathered, then loaded
    assert held(bf16_fleet) == expected(bf16_fleet, bits)


def test_torch_float32_and_a_0d_tensor_reach_the_reference_engine(ray_cluster):
    from fd_ray_sync.engine.reference import init_full_state_dict
    from fd_ray_sync.engine.spec import preset

    tiny = preset("tiny")
    fleet = Fleet.launch(FleetConfig(name="torch-f32", tp=2, dp=1))
    try:
        state = init_full_state_dict(tiny, seed=3)
        assert state["logit_scale"].shape == ()
        fleet.update({n: torch.from_numpy(a) for n, a in state.items()}, version=1)
        want = {
            rank: fingerprint((n, "float32", take_shard(a, plan[n])) for n, a in state.items())
            for rank, plan in fleet.shard_plans().items()
        }
        assert held(fleet) == want
    finally:
        fleet.shutdown()
