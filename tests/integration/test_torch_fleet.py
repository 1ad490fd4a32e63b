"""A fleet serving the torch reference LM (TorchEngine), updated from a torch trainer's
`state_dict()`: exact bits on every rank, generation following the weights, and refusals
that name the parameter. With tp=2 the row-parallel sums cross the paddle gloo groups."""

import functools

import pytest
import torch

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine import tokenizer
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.torch_engine import torch_lm_engine
from fd_ray_sync.engine.torch_model import TINY_DENSE, TorchDecoderLM
from fd_ray_sync.errors import RankFailed
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.sharding import take_shard

pytestmark = pytest.mark.slow

PROMPTS = ["The trainer ", "fleet"]
FACTORY = functools.partial(torch_lm_engine, config=TINY_DENSE)


def launch(name, tp):
    return Fleet.launch(FleetConfig(name=name, tp=tp, dp=1), engine_factory=FACTORY)


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    fleet = launch("torch-fleet", tp=1)
    yield fleet
    fleet.shutdown()


def trainer(seed):
    """The trainer's torch module, holding the reference numbers of `seed`."""
    module = TorchDecoderLM(TINY_DENSE)
    full = init_full_state_dict(TINY_DENSE, seed)
    module.load_state_dict({n: torch.from_numpy(a) for n, a in full.items()})
    return module


def expected_fingerprints(fleet, state):
    """Each rank's slice of the trainer's tensors, hashed here independently of Fleet."""
    return {
        rank: fingerprint((n, "float32", take_shard(t.numpy(), plan[n])) for n, t in state.items())
        for rank, plan in fleet.shard_plans().items()
    }


def held(fleet):
    return {r["rank"]: r["fingerprint"] for r in fleet.status()["ranks"]}


def paddle_generation(seed, tokens=12):
    engine = ReferenceEngine(TINY_DENSE)
    engine.load_full_state_dict(init_full_state_dict(TINY_DENSE, seed))
    return engine.generate(PROMPTS, tokens)


def test_torch_weights_land_bit_for_bit_and_generation_follows_them(fleet):
    texts = {}
    for version, seed in ((1, 1), (2, 2)):
        module = trainer(seed)
        report = fleet.update(module.state_dict(), version=version)
        assert report.version == str(version)
        assert held(fleet) == expected_fingerprints(fleet, module.state_dict())
        results = fleet.generate(PROMPTS, 12)
        assert [r.version for r in results] == [str(version)] * len(PROMPTS)
        texts[version] = [r.text for r in results]
        local = [tokenizer.decode(module.generate_ids(tokenizer.encode(p), 12)) for p in PROMPTS]
        assert texts[version] == local  # the trainer's own module says the same
        assert texts[version] == paddle_generation(seed)  # the same LM in either framework
    assert texts[1] != texts[2]


def test_a_wrong_shape_is_refused_naming_the_parameter(fleet):
    module = trainer(3)
    fleet.update(module.state_dict(), version=10)
    before = held(fleet)
    bad = dict(module.state_dict())
    bad["lm_head.weight"] = bad["lm_head.weight"][:, :100]
    with pytest.raises(RankFailed, match=r"lm_head.weight: shape \(64, 100\)") as err:
        fleet.update(bad, version=11)
    assert err.value.phase == "prepare"
    status = fleet.status()
    assert status["version"] == "10" and status["serving"] and held(fleet) == before


def test_tensor_parallel_torch_ranks_match_the_full_model(ray_cluster):
    fleet = launch("torch-fleet-tp2", tp=2)
    try:
        module = trainer(4)
        fleet.update(module.state_dict(), version=1)
        want = expected_fingerprints(fleet, module.state_dict())
        assert want[0] != want[1]  # the ranks really hold different slices
        assert held(fleet) == want
        assert [r.text for r in fleet.generate(PROMPTS, 12)] == paddle_generation(4)
    finally:
        fleet.shutdown()
