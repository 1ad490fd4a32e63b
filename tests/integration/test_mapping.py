"""Train in Hugging Face Llama-style names and layouts (fused qkv), serve in the reference
engine's: `Fleet.update(..., mapping=llama_to_reference(config))` on a tp=2 fleet."""

import numpy as np
import pytest

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.mapping import llama_to_reference
from fd_ray_sync.sharding import take_shard

pytestmark = pytest.mark.slow

PROMPTS = ["The trainer ", "fleet"]
TINY = preset("tiny")


@pytest.fixture(scope="module")
def fleet(ray_cluster):
    fleet = Fleet.launch(FleetConfig(name="test-mapping", tp=2, dp=1, enable_expert_parallel=True))
    yield fleet
    fleet.shutdown()


def to_llama(state, config):
    """The reference layout as a Hugging Face Llama-style checkpoint with a fused qkv_proj
    (rows [q; k; v], each [head][head_dim]) and [out, in] Linears; written index by index,
    independently of `fd_ray_sync.mapping`."""
    hd, heads = config.head_dim, config.n_heads
    out = {
        "logit_scale": state["logit_scale"],
        "model.embed_tokens.weight": state["embed.weight"],
        "model.embed_positions.weight": state["pos_embed.weight"],
    }
    for i in range(config.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for ref, hf in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            for p in ("weight", "bias"):
                out[dst + f"{hf}.{p}"] = state[src + f"{ref}.{p}"]
        w, b = state[src + "attn.qkv.weight"], state[src + "attn.qkv.bias"]

        def column(h, j):  # the engine's columns of head h's q (j=0), k (1) or v (2)
            return slice((3 * h + j) * hd, (3 * h + j + 1) * hd)

        out[dst + "self_attn.qkv_proj.weight"] = np.concatenate(
            [w[:, column(h, j)].T for j in range(3) for h in range(heads)]
        )
        out[dst + "self_attn.qkv_proj.bias"] = np.concatenate(
            [b[column(h, j)] for j in range(3) for h in range(heads)]
        )
        out[dst + "self_attn.o_proj.weight"] = state[src + "attn.out.weight"].T
        out[dst + "self_attn.o_proj.bias"] = state[src + "attn.out.bias"]
        if config.is_moe_layer(i):
            moe = dst + "block_sparse_moe."
            out[moe + "gate.weight"] = state[src + "mlp.gate.weight"].T
            for e in range(config.n_experts):
                out[moe + f"experts.{e}.w1.weight"] = state[src + "mlp.w1"][e].T
                out[moe + f"experts.{e}.w2.weight"] = state[src + "mlp.w2"][e].T
        else:
            for p in ("up", "down"):
                out[dst + f"mlp.{p}_proj.weight"] = state[src + f"mlp.{p}.weight"].T
                out[dst + f"mlp.{p}_proj.bias"] = state[src + f"mlp.{p}.bias"]
    out["model.norm.weight"], out["model.norm.bias"] = state["ln_f.weight"], state["ln_f.bias"]
    out["lm_head.weight"] = state["lm_head.weight"].T
    return {n: np.require(a, requirements="C") for n, a in out.items()}  # 0-d stays 0-d


def train(state, steps=3):
    """A few elementwise "optimizer steps": the same in any layout, so the reference-layout
    state trained alike is what the fleet must end up serving."""
    for _ in range(steps):
        state = {n: np.asarray(a - np.float32(0.2) * np.tanh(a)) for n, a in state.items()}
    return state


def reference_generation(state):
    engine = ReferenceEngine(TINY)
    engine.load_full_state_dict(state)
    return engine.generate(PROMPTS, 12)


def test_trained_in_llama_layout_served_in_the_reference_layout(fleet):
    start = init_full_state_dict(TINY, seed=7)
    hf = train(to_llama(start, TINY))
    assert "model.layers.0.self_attn.qkv_proj.weight" in hf and "layers.0.ln1.weight" not in hf
    want = train(start)  # the same steps in the engine's layout
    report = fleet.update(hf, version=1, mapping=llama_to_reference(TINY))
    assert report.version == "1"
    results = fleet.generate(PROMPTS, 12)
    assert [r.version for r in results] == ["1", "1"]
    assert [r.text for r in results] == reference_generation(want)
    assert reference_generation(want) != reference_generation(start)  # training showed
    # Every rank holds exactly its slice of the trained weights in the engine's layout.
    status = fleet.status()
    for rank in status["ranks"]:
        plan = fleet.shard_plans()[rank["rank"]]
        assert rank["fingerprint"] == fingerprint(
            (n, "float32", take_shard(a, plan[n])) for n, a in want.items()
        )


def test_unmapped_missing_or_doubly_mapped_names_are_refused_before_anything_moves(fleet):
    hf = to_llama(init_full_state_dict(TINY, seed=8), TINY)
    mapping = llama_to_reference(TINY)
    fleet.update(hf, version=2, mapping=mapping)
    before = fleet.status()

    extra = hf | {"model.layers.0.mlp.gate_proj.weight": hf["model.layers.0.mlp.up_proj.weight"]}
    missing = {n: a for n, a in hf.items() if n != "model.norm.bias"}
    d = TINY.d_model
    qkv = hf["model.layers.1.self_attn.qkv_proj.weight"]
    doubled = (
        hf
        | {  # layer 1's qkv both fused and as q, k, v: made twice
            f"model.layers.1.self_attn.{x}_proj.weight": qkv[j * d : (j + 1) * d]
            for j, x in enumerate("qkv")
        }
    )
    for state, named in (
        (extra, r"mapped by no rule: \['model.layers.0.mlp.gate_proj.weight'\]"),
        (missing, r"engine names made by nothing: \['ln_f.bias'\]"),
        (doubled, r"engine names made twice: 'layers.1.attn.qkv.weight'"),
    ):
        with pytest.raises(WeightMismatchError, match=named):
            fleet.update(state, version=3, mapping=mapping)
    after = fleet.status()
    assert after["version"] == "2"
    assert [r["fingerprint"] for r in after["ranks"]] == [r["fingerprint"] for r in before["ranks"]]
    # The refusals came from this process (a rank's would be RankFailed): version 3 is
    # still new to the fleet and loads.
    assert fleet.update(hf, version=3, mapping=mapping).version == "3"


def test_weights_trained_by_adam_then_exported_in_llama_layout_serve_the_same(fleet):
    from fd_ray_sync.trainer import TinyTrainer

    trainer = TinyTrainer(TINY, seed=3)
    before = {n: np.array(p.numpy()) for n, p in trainer.weights()}
    trainer.train(5)  # real paddle autograd and Adam steps
    trained = {n: np.array(p.numpy()) for n, p in trainer.weights()}
    assert any(not np.array_equal(before[n], trained[n]) for n in trained)
    version = int(fleet.status()["version"] or 0) + 1
    fleet.update(to_llama(trained, TINY), version=version, mapping=llama_to_reference(TINY))
    assert [r.text for r in fleet.generate(PROMPTS, 12)] == reference_generation(trained)
    for rank in fleet.status()["ranks"]:
        plan = fleet.shard_plans()[rank["rank"]]
        assert rank["fingerprint"] == fingerprint(
            (n, "float32", take_shard(a, plan[n])) for n, a in trained.items()
        )
