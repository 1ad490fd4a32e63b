"""Sleep and wake of one rank (DynamicWeightManager on the reference engine, in this process),
and the pure tag/level checks they share with the fleet."""

import numpy as np
import pytest

from fd_ray_sync.config import LoadConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import ConfigError, StateError, VerificationError
from fd_ray_sync.manager import DynamicWeightManager
from fd_ray_sync.params import is_initialized, read_param
from fd_ray_sync.sleep import TAGS, deepened, describe, sleep_level, sleep_tags
from fd_ray_sync.status import KVCacheStatus, ModelWeightsStatus

TINY = preset("tiny")
PROMPTS = ["sleep ", "wake"]


@pytest.fixture
def manager():
    engine = ReferenceEngine(TINY)
    m = DynamicWeightManager(engine, LoadConfig())
    m.update_from_state_dict(init_full_state_dict(TINY, seed=1), version="1")
    m.finalize_update()
    return m


def test_tags_and_levels_are_checked_before_anything():
    assert sleep_tags(None) == TAGS
    assert sleep_tags("kv_cache, weights") == ("weights", "kv_cache")
    assert sleep_tags(["kv_cache"]) == ("kv_cache",)
    with pytest.raises(ConfigError, match="'weight'.*known: weights, kv_cache"):
        sleep_tags("weight,kv_cache")
    with pytest.raises(ConfigError, match="no sleep tag"):
        sleep_tags([])
    assert sleep_level(2) == 2
    for bad in (0, 3, True, "1"):
        with pytest.raises(ConfigError, match="sleep level"):
            sleep_level(bad)
    assert deepened({"weights": 2}, 1, ["weights", "kv_cache"]) == {"weights": 2, "kv_cache": 1}
    assert "wake_up()" in describe({"weights": 1, "kv_cache": 1})
    assert "update the weights, then wake_up(tags=['kv_cache'])" in describe(
        {"weights": 2, "kv_cache": 2}
    )


def test_level_1_keeps_the_weights_on_the_host_and_brings_them_back_bit_identical(manager):
    engine = manager.engine
    before = {n: np.array(read_param(p)) for n, p in manager.params.items()}
    fingerprint, text = manager.fingerprint(), engine.generate(PROMPTS, 8)
    manager.sleep(1)
    assert manager.asleep == {"weights": 1, "kv_cache": 1}
    assert manager.status == ModelWeightsStatus.CLEARED
    assert engine.kv_cache_status == KVCacheStatus.CLEARED
    assert not any(is_initialized(p) for p in manager.params.values())
    with pytest.raises(StateError, match="wake_up"):
        manager.update_from_state_dict(init_full_state_dict(TINY, seed=2), version="2")
    manager.wake_up(["kv_cache"])  # one tag at a time
    assert manager.asleep == {"weights": 1}
    manager.wake_up()
    assert manager.asleep == {} and manager.status == ModelWeightsStatus.NORMAL
    assert manager.version == "1" and manager.fingerprint() == fingerprint
    for name, param in manager.params.items():
        np.testing.assert_array_equal(read_param(param), before[name], err_msg=name)
    assert engine.generate(PROMPTS, 8) == text


def test_a_host_copy_that_changed_is_refused_at_wake(manager):
    manager.sleep(1, "weights")
    manager._host["embed.weight"][3, 5] += 1  # stands in for host memory gone bad
    with pytest.raises(VerificationError, match="stay asleep"):
        manager.wake_up()
    assert manager.asleep == {"weights": 1} and manager.status == ModelWeightsStatus.CLEARED
    assert not any(is_initialized(p) for p in manager.params.values())


def test_level_2_discards_and_the_next_update_loads_while_the_kv_cache_sleeps(manager):
    manager.sleep(2)
    assert manager.version is None and not manager._host
    manager.wake_up(["weights"])  # nothing to give back: still empty
    assert manager.status == ModelWeightsStatus.CLEARED and manager.asleep == {"kv_cache": 2}
    state = init_full_state_dict(TINY, seed=3)
    manager.update_parameters(iter_source(state), version="3")
    manager.finalize_update()
    assert manager.engine.kv_cache_status == KVCacheStatus.CLEARED  # the update left it asleep
    manager.wake_up(["kv_cache"])
    assert manager.asleep == {} and manager.version == "3"
    reference = ReferenceEngine(TINY)
    reference.load_full_state_dict(state)
    assert manager.engine.generate(PROMPTS, 8) == reference.generate(PROMPTS, 8)


def test_sleeping_deeper_drops_the_host_copy_and_lighter_changes_nothing(manager):
    manager.sleep(1, ["weights"])
    manager.sleep(2, ["weights"])
    assert manager.asleep == {"weights": 2} and not manager._host and manager.version is None
    manager.sleep(1, ["weights"])
    assert manager.asleep == {"weights": 2}


def iter_source(state):
    from fd_ray_sync.sources.memory import StateDictSource

    return StateDictSource(state)
