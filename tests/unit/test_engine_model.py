"""The reference LM and engine in one process: tokenizer, shapes and shard plans, generation,
the KV-cache lifecycle, and training with autograd. Real paddle, no mocks."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine import tokenizer
from fd_ray_sync.engine.model import DecoderLM, next_token_loss
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import (
    ModelConfig,
    full_shapes,
    lora_names,
    param_bytes,
    preset,
    shard_plan,
)
from fd_ray_sync.errors import ConfigError, StateError, WeightMismatchError
from fd_ray_sync.status import KVCacheStatus

TINY = preset("tiny")


def _shapes(model: DecoderLM) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def test_tokenizer_round_trip() -> None:
    text = "héllo, wörld ✓ 0"
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == text
    # A model can emit bytes that are not UTF-8; decoding must not raise.
    assert tokenizer.decode([0xFF, ord("a")]) == "\ufffda"


def test_large_preset_holds_a_gibibyte_of_weights() -> None:
    assert param_bytes(preset("large_1g")) >= 1 << 30


def test_param_bytes_and_full_shapes_match_a_built_model() -> None:
    model = DecoderLM(TINY)
    assert list(model.state_dict()) == list(full_shapes(TINY))
    assert _shapes(model) == full_shapes(TINY)
    assert param_bytes(TINY) == sum(4 * int(np.prod(p.shape)) for p in model.parameters())


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "tp2-ep2"])
@pytest.mark.parametrize("rank", [0, 1])
def test_shard_plan_gives_each_rank_models_shapes(rank: int, expert_parallel: bool) -> None:
    parallel = ParallelConfig(tp=2, rank=rank, enable_expert_parallel=expert_parallel)
    model = DecoderLM(TINY, parallel)  # building needs no process group
    full, plan = full_shapes(TINY), shard_plan(TINY, parallel)
    assert plan.keys() == full.keys()
    assert _shapes(model) == {name: plan[name].local_shape(full[name]) for name in full}
    assert plan["layers.0.attn.qkv.weight"].index == rank
    assert plan["layers.1.mlp.w1"].is_replicated is not expert_parallel


def test_layout_that_does_not_split_names_the_field() -> None:
    with pytest.raises(ConfigError, match="n_heads=4 .* tp=3"):
        DecoderLM(TINY, ParallelConfig(tp=3))
    with pytest.raises(ConfigError, match="d_ff"):
        shard_plan(ModelConfig(n_heads=4, d_ff=130), ParallelConfig(tp=4))
    with pytest.raises(ConfigError, match="n_experts=4 .* ep_size=8"):
        shard_plan(
            TINY.model_copy(update={"n_heads": 8, "d_ff": 256}),
            ParallelConfig(tp=8, enable_expert_parallel=True),
        )
    with pytest.raises(ConfigError, match="known: large_1g, tiny"):
        preset("huge")


def test_forward_over_tp_without_groups_is_a_state_error() -> None:
    model = DecoderLM(TINY, ParallelConfig(tp=2, rank=0))
    with pytest.raises(StateError, match="TP group"):
        model(paddle.to_tensor([[1, 2, 3]]))


def test_generation_is_deterministic_and_truncates_long_prompts() -> None:
    first = ReferenceEngine(TINY, seed=7)
    second = ReferenceEngine(TINY, seed=7)
    prompts = ["The quick brown fox", "", "x" * 500]
    out = first.generate(prompts, max_new_tokens=12)
    assert out == second.generate(prompts, max_new_tokens=12)
    assert out == first.generate(prompts, max_new_tokens=12)
    assert len(first.model.generate_ids(tokenizer.encode("x" * 500), 12)) == 12
    assert first.generate(prompts, max_new_tokens=0) == ["", "", ""]


def test_kv_cache_decoding_matches_a_full_pass() -> None:
    engine = ReferenceEngine(TINY, seed=1)
    ids = tokenizer.encode("kv cache check")
    with paddle.no_grad():
        prefill = engine.model(paddle.to_tensor([ids[:6]]), start=0, use_cache=True)
        steps = [
            engine.model(paddle.to_tensor([[t]]), start=6 + i, use_cache=True)[0, -1].numpy()
            for i, t in enumerate(ids[6:])
        ]
    decoded = np.concatenate([prefill[0].numpy(), np.stack(steps)])
    np.testing.assert_allclose(decoded, engine.logits(ids), atol=1e-5)


def test_freed_kv_cache_refuses_generation_until_reallocated() -> None:
    engine = ReferenceEngine(TINY, seed=3)
    before = engine.generate(["hi"], 8)
    engine.free_kv_cache()
    assert engine.kv_cache_status is KVCacheStatus.CLEARED
    with pytest.raises(StateError, match="KV cache"):
        engine.generate(["hi"], 8)
    engine.alloc_kv_cache()
    assert engine.kv_cache_status is KVCacheStatus.NORMAL
    assert engine.generate(["hi"], 8) == before


def test_cleared_parameters_can_be_refilled() -> None:
    engine = ReferenceEngine(TINY, seed=5)
    before = engine.generate(["refill"], 8)
    for param in engine.model.parameters():
        param._clear_data()
    assert not any(p._is_initialized() for p in engine.model.parameters())
    engine.load_full_state_dict(init_full_state_dict(TINY, 5))
    assert engine.generate(["refill"], 8) == before


def test_loading_a_wrong_state_dict_names_the_parameter() -> None:
    engine = ReferenceEngine(TINY)
    full = init_full_state_dict(TINY, 0)
    with pytest.raises(WeightMismatchError, match="lm_head.weight"):
        engine.load_full_state_dict({**full, "lm_head.weight": np.zeros((3, 3), np.float32)})
    del full["ln_f.bias"]
    with pytest.raises(WeightMismatchError, match="missing \\['ln_f.bias'\\]"):
        engine.load_full_state_dict(full)


def test_ep_buffer_is_released_and_recreated() -> None:
    assert not ReferenceEngine(TINY).ep_buffer_allocated
    engine = ReferenceEngine(TINY, ParallelConfig(enable_expert_parallel=True))
    assert engine.ep_buffer_allocated
    engine.clear_ep_buffer()
    assert not engine.ep_buffer_allocated
    engine.recreate_ep_buffer()
    assert engine.ep_buffer_allocated


def test_a_few_adam_steps_reduce_the_loss() -> None:
    paddle.seed(0)
    model = DecoderLM(TINY)
    tokens = paddle.to_tensor([tokenizer.encode("the cat sat on the mat. " * 3)])
    optimizer = paddle.optimizer.Adam(learning_rate=3e-3, parameters=model.parameters())
    losses = []
    for _ in range(8):
        loss = next_token_loss(model(tokens), tokens)
        loss.backward()
        # Gradients reach the routed experts and the gate, not only the dense path.
        for name in ("layers.1.mlp.w1", "layers.1.mlp.gate.weight"):
            assert float(model.state_dict()[name].grad.abs().sum()) > 0
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


# --- LoRA adapters ---------------------------------------------------------------------------

TINY_LORA = preset("tiny_lora")


def test_lora_pairs_follow_their_projection_in_shapes_and_state_dict_order() -> None:
    model = DecoderLM(TINY_LORA)
    assert list(model.state_dict()) == list(full_shapes(TINY_LORA))
    assert _shapes(model) == full_shapes(TINY_LORA)
    names = lora_names(TINY_LORA)
    # qkv, out, up, down in the dense layer 0; qkv, out in the MoE layer 1.
    assert len(names) == 12 and "layers.1.mlp.up.lora_A" not in names
    assert full_shapes(TINY_LORA)["layers.0.attn.qkv.lora_B"] == (4, 3 * TINY_LORA.d_model)
    base = {n: s for n, s in full_shapes(TINY_LORA).items() if n not in names}
    assert base == full_shapes(TINY)


@pytest.mark.parametrize("rank", [0, 1])
def test_lora_shards_split_like_their_base_projection(rank: int) -> None:
    parallel = ParallelConfig(tp=2, rank=rank)
    model = DecoderLM(TINY_LORA, parallel)
    full, plan = full_shapes(TINY_LORA), shard_plan(TINY_LORA, parallel)
    assert _shapes(model) == {name: plan[name].local_shape(full[name]) for name in full}
    p = "layers.0."
    assert plan[p + "attn.qkv.lora_A"].is_replicated and plan[p + "mlp.down.lora_B"].is_replicated
    assert (plan[p + "attn.qkv.lora_B"].axis, plan[p + "attn.qkv.lora_B"].index) == (1, rank)
    assert (plan[p + "attn.out.lora_A"].axis, plan[p + "attn.out.lora_A"].index) == (0, rank)


def test_zero_adapters_serve_the_base_and_trained_ones_change_it() -> None:
    base = init_full_state_dict(TINY, seed=3)
    with_lora = init_full_state_dict(TINY_LORA, seed=3)
    assert all(not with_lora[n].any() for n in lora_names(TINY_LORA) if n.endswith("lora_B"))
    plain, adapted = ReferenceEngine(TINY), ReferenceEngine(TINY_LORA)
    plain.load_full_state_dict(base)
    adapted.load_full_state_dict({**with_lora, **base})
    ids = tokenizer.encode("adapters")
    np.testing.assert_array_equal(plain.logits(ids), adapted.logits(ids))
    bumped = {n: np.full_like(with_lora[n], 0.05) for n in lora_names(TINY_LORA)}
    adapted.load_full_state_dict({**with_lora, **base, **bumped})
    assert not np.allclose(plain.logits(ids), adapted.logits(ids))


def test_training_only_the_adapters_moves_only_them() -> None:
    paddle.seed(0)
    model = DecoderLM(TINY_LORA)
    adapters = set(lora_names(TINY_LORA))
    params = model.state_dict()
    for name, p in params.items():
        p.stop_gradient = name not in adapters
    before = {n: p.numpy().copy() for n, p in params.items()}
    tokens = paddle.to_tensor([tokenizer.encode("the cat sat on the mat. " * 3)])
    optimizer = paddle.optimizer.Adam(
        learning_rate=1e-2, parameters=[params[n] for n in sorted(adapters)]
    )
    for _ in range(3):
        next_token_loss(model(tokens), tokens).backward()
        optimizer.step()
        optimizer.clear_grad()
    moved = {n for n, p in params.items() if not np.array_equal(p.numpy(), before[n])}
    assert moved == adapters


def test_a_stop_asked_mid_generation_ends_it_at_that_token() -> None:
    engine = ReferenceEngine(TINY, seed=3)
    full = engine.generate(["The trainer "], 20)[0]
    asked = []

    def stop() -> bool:  # true from the fifth token on
        asked.append(1)
        return len(asked) >= 5

    short = engine.generate(["The trainer "], 20, stop)[0]
    assert len(asked) == 5 and short == full[:5]  # the same tokens, cut where it was asked
    assert engine.generate(["The trainer "], 20, lambda: False)[0] == full
