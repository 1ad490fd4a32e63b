"""TorchEngine and the torch reference LM, in this process: the weight manager captures,
writes, clears and verifies torch modules as it does paddle ones."""

import functools
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import LoadConfig, ParallelConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import ModelConfig, full_shapes, shard_plan
from fd_ray_sync.engine.torch_engine import TorchEngine, torch_lm_engine
from fd_ray_sync.engine.torch_model import TINY_DENSE, TorchDecoderLM
from fd_ray_sync.errors import ConfigError, StateError, WeightMismatchError
from fd_ray_sync.manager import DynamicWeightManager
from fd_ray_sync.params import is_initialized, read_param
from fd_ray_sync.sharding import ShardSpec
from fd_ray_sync.status import ModelWeightsStatus

SMALL = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, n_experts=0)
PROMPTS = ["The trainer ", "fleet", ""]


def engine(config=SMALL, seed=None):
    return torch_lm_engine(ParallelConfig(), None, config=config, seed=seed)


def torch_state(config, seed):
    """A trainer's torch state dict: the full model loaded with the reference numbers."""
    model = TorchDecoderLM(config)
    full = init_full_state_dict(config, seed)
    model.load_state_dict({n: torch.from_numpy(a) for n, a in full.items()})
    return model.state_dict()


def test_the_torch_model_mirrors_the_paddle_one():
    model = TorchDecoderLM(SMALL)
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == full_shapes(SMALL)
    state = init_full_state_dict(SMALL, seed=1)
    reference = ReferenceEngine(SMALL)
    reference.load_full_state_dict(state)
    torch_engine = engine()
    torch_engine.module.load_state_dict({n: torch.from_numpy(a) for n, a in state.items()})
    tokens = list(b"hello there")
    with torch.no_grad():
        logits = torch_engine.module(torch.tensor([tokens])).numpy()[0]
    np.testing.assert_allclose(logits, reference.logits(tokens), rtol=1e-4, atol=1e-4)
    assert torch_engine.generate(PROMPTS, 10) == reference.generate(PROMPTS, 10)


def test_the_manager_writes_torch_weights_in_place_and_verifies_them():
    eng = engine()
    m = DynamicWeightManager(eng, LoadConfig())
    assert list(m.params) == list(eng.module.state_dict())
    pointers = {n: p.data_ptr() for n, p in m.params.items()}
    state = torch_state(SMALL, seed=2)
    before = eng.generate(PROMPTS, 8)
    report = m.update_from_state_dict(state, version="1")
    m.finalize_update()
    assert report.params_updated == len(state) and m.version == "1"
    assert {n: p.data_ptr() for n, p in m.params.items()} == pointers
    for name, tensor in state.items():
        np.testing.assert_array_equal(read_param(m.params[name]), tensor.numpy())
    assert m.fingerprint() == fingerprint((n, "float32", t.numpy()) for n, t in state.items())
    after = eng.generate(PROMPTS, 8)
    assert after != before
    assert after == engine(seed=2).generate(PROMPTS, 8)


def test_clear_and_reload_a_torch_engine():
    eng = engine(seed=3)
    m = DynamicWeightManager(eng, LoadConfig())
    module_params = dict(eng.module.named_parameters())
    expected = eng.generate(PROMPTS, 6)
    m.clear_parameters()
    assert m.status == ModelWeightsStatus.CLEARED
    assert not any(is_initialized(p) for p in m.params.values())
    m.verify_parameters("clearance")
    with pytest.raises(StateError, match="KV cache is freed"):
        eng.generate(PROMPTS, 6)
    m.update_parameters(m_source(torch_state(SMALL, seed=3)), version="7")
    m.finalize_update()
    assert dict(eng.module.named_parameters()) == module_params  # the same Parameters
    assert eng.generate(PROMPTS, 6) == expected


def test_a_wrong_shape_is_refused_naming_the_parameter_and_changes_nothing():
    eng = engine(seed=4)
    m = DynamicWeightManager(eng, LoadConfig())
    before = m.fingerprint()
    state = dict(torch_state(SMALL, seed=5))
    state["lm_head.weight"] = state["lm_head.weight"][:, :100]
    with pytest.raises(WeightMismatchError, match=r"lm_head.weight: shape \(32, 100\)"):
        m.update_from_state_dict(state, version="2")
    assert m.fingerprint() == before and m.status == ModelWeightsStatus.NORMAL


def test_tensor_parallel_shapes_follow_the_paddle_plan():
    # Building a rank's shard needs no process group (only its forward pass does).
    parallel = ParallelConfig(tp=2, rank=1)
    model = TorchDecoderLM(SMALL, parallel)
    plan, full = shard_plan(SMALL, parallel), full_shapes(SMALL)
    local = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert local == {n: plan[n].local_shape(full[n]) for n in full}
    assert local["layers.0.attn.qkv.weight"] == (32, 48)


class Bigram(torch.nn.Module):
    """A user's own module: logits from the last token only, no generate_ids."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(256, 256)

    def forward(self, ids):
        return self.table(ids)


def test_a_users_module_is_served_with_the_generic_greedy_loop():
    eng = TorchEngine(Bigram)  # a factory, built here
    m = DynamicWeightManager(eng, LoadConfig())
    table = np.zeros((256, 256), np.float32)
    table[np.arange(256), (np.arange(256) + 1) % 256] = 1.0  # each byte predicts the next
    m.update_from_state_dict({"table.weight": table}, version="1")
    assert eng.generate(["a"], 3) == ["bcd"]
    assert eng.full_shapes() == {"table.weight": (256, 256)}
    half = TorchEngine(Bigram(), plan={"table.weight": ShardSpec(axis=1, parts=2, index=1)})
    assert half.full_shapes() == {"table.weight": (256, 512)}


def test_a_plan_naming_unknown_tensors_is_refused():
    with pytest.raises(ConfigError, match="lacks: \\['nope'\\]"):
        TorchEngine(Bigram(), plan={"nope": ShardSpec(axis=0, parts=2, index=0)})
    with pytest.raises(ConfigError, match="no MoE"):
        TorchDecoderLM(ModelConfig(n_experts=4))


def test_the_factory_pickles():
    factory = functools.partial(torch_lm_engine, config=TINY_DENSE, seed=1)
    assert pickle.loads(pickle.dumps(factory)).keywords["config"] == TINY_DENSE


def m_source(state):
    from fd_ray_sync.sources.memory import StateDictSource

    return StateDictSource(state)


def test_a_torch_rank_of_a_one_rank_replica_runs_without_paddle():  # in a fresh interpreter
    """What a rank actor of a torch engine does with tp=1 (join its world, build the engine,
    load, barrier, restart its groups) never imports paddle: such a fleet runs where paddle
    is not installed (a GPU machine with torch only)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'paddle':\n"
        "            raise ModuleNotFoundError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import actors.weight_manager, fd_ray_sync.fleet\n"
        "from fd_ray_sync.comm import CommGroups, init_world\n"
        "from fd_ray_sync.config import LoadConfig, ParallelConfig\n"
        "from fd_ray_sync.engine.torch_engine import torch_lm_engine\n"
        "from fd_ray_sync.engine.torch_model import TorchDecoderLM\n"
        "from fd_ray_sync.manager import DynamicWeightManager\n"
        "init_world(ParallelConfig(), ['127.0.0.1:1'])\n"
        "groups = CommGroups(ParallelConfig())\n"
        "engine = torch_lm_engine(ParallelConfig(), groups)\n"
        "m = DynamicWeightManager(engine, LoadConfig())\n"
        "m.update_from_state_dict(TorchDecoderLM().state_dict(), version='2')\n"
        "groups.shutdown(); groups.restart(); groups.barrier('tp')\n"
        "print(engine.generate(['hi'], 2) is not None, 'paddle' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["True", "False"]
