"""The weight manager in two real rank processes joined by gloo (no Ray): snapshots written
from a single-process model load into a TP=2 (and TP=2 + EP) engine, bit for bit; clear,
verify cleared, reload with the groups torn down and rebuilt, verify."""

from __future__ import annotations

import numpy as np
import pytest
from procs import run_ranks

from fd_ray_sync.comm import CommGroups, init_world
from fd_ray_sync.config import LoadConfig, ParallelConfig
from fd_ray_sync.engine import tokenizer
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset, shard_plan
from fd_ray_sync.manager import DynamicWeightManager
from fd_ray_sync.sharding import take_shard
from fd_ray_sync.sources.snapshot import SnapshotSource, write_snapshot

pytestmark = pytest.mark.slow
TINY = preset("tiny")
TOKENS = tokenizer.encode("snapshot check")


def rank_worker(rank: int, endpoints: list[str], ep: bool, first: str, second: str) -> dict:
    parallel = ParallelConfig(tp=2, rank=rank, enable_expert_parallel=ep)
    init_world(parallel, endpoints)
    engine = ReferenceEngine(TINY, parallel, CommGroups(parallel))
    load = LoadConfig(model_dir=first)
    manager = DynamicWeightManager(engine, load)

    # Bootstrap: the version comes from version.yaml.
    report = manager.update_parameters(SnapshotSource.from_config(load, parallel))
    manager.finalize_update()
    out = {
        "version": report.version,
        "params": {n: np.array(p.numpy()) for n, p in manager.params.items()},
        "logits": engine.logits(TOKENS),
    }

    manager.clear_parameters(shutdown_comm_groups=True)
    manager.verify_parameters("clearance")
    out["cleared"] = (manager.status.name, manager.kv_cache_status.name, engine.groups.up)
    out["ep_buffer_after_clear"] = engine.ep_buffer_allocated

    # Not the first load: groups and the EP buffer come back before the weights.
    report = manager.update_parameters(
        SnapshotSource.from_config(load, parallel, second), version="2"
    )
    manager.finalize_update()
    manager.verify_parameters("update")
    out.update(
        reloaded=(manager.status.name, manager.kv_cache_status.name, engine.groups.up),
        ep_buffer_after_reload=engine.ep_buffer_allocated,
        version2=report.version,
        logits2=engine.logits(TOKENS),
        text2=engine.generate(["snap"], 8),
    )
    return out


def _full_model(state):
    engine = ReferenceEngine(TINY)
    engine.load_full_state_dict(state)
    return engine


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "tp2-ep2"])
def test_snapshots_load_into_two_gloo_ranks(tmp_path, ep):
    plans = {
        r: shard_plan(TINY, ParallelConfig(tp=2, rank=r, enable_expert_parallel=ep)) for r in (0, 1)
    }
    first, second = init_full_state_dict(TINY, 1), init_full_state_dict(TINY, 2)
    # Small parts, so each rank reads several numbered part files in order.
    write_snapshot(tmp_path / "v1", first, plans.__getitem__, 2, "1", part_bytes=32 << 10)
    write_snapshot(tmp_path / "v2", second, plans.__getitem__, 2, "2", part_bytes=1 << 30)
    assert len(list((tmp_path / "v1").glob("model_state.tp1.1.part*"))) > 2

    results = run_ranks(rank_worker, 2, ep, str(tmp_path / "v1"), str(tmp_path / "v2"))

    want1, want2 = _full_model(first), _full_model(second)
    for r in results:
        assert r["version"] == "1" and r["version2"] == "2"
        for name, value in r["params"].items():
            np.testing.assert_array_equal(value, take_shard(first[name], plans[r["rank"]][name]))
        np.testing.assert_allclose(r["logits"], want1.logits(TOKENS), atol=1e-4, rtol=0)
        assert r["cleared"] == ("CLEARED", "CLEARED", False)
        assert r["reloaded"] == ("NORMAL", "NORMAL", True)
        assert r["ep_buffer_after_clear"] is False and r["ep_buffer_after_reload"] is ep
        np.testing.assert_allclose(r["logits2"], want2.logits(TOKENS), atol=1e-4, rtol=0)
        assert r["text2"] == want2.generate(["snap"], 8)
    # The two ranks really hold different slices of the split parameters.
    assert results[0]["params"]["layers.0.mlp.up.weight"].shape == (64, 64)
    assert not np.array_equal(
        results[0]["params"]["layers.0.mlp.up.weight"],
        results[1]["params"]["layers.0.mlp.up.weight"],
    )
