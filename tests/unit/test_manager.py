"""DynamicWeightManager against a small real paddle engine in this process."""

import logging

import numpy as np
import paddle
import pytest

from fd_ray_sync.checksum import digest, fingerprint
from fd_ray_sync.comm import CommGroups
from fd_ray_sync.config import LoadConfig, ParallelConfig
from fd_ray_sync.engine.base import InferenceEngine
from fd_ray_sync.errors import (
    ChecksumError,
    PartialUpdateError,
    StateError,
    VerificationError,
    VersionError,
    WeightMismatchError,
)
from fd_ray_sync.manager import DynamicWeightManager
from fd_ray_sync.params import read_param
from fd_ray_sync.sharding import ShardSpec
from fd_ray_sync.sources.snapshot import SnapshotSource, write_rank_snapshot
from fd_ray_sync.status import KVCacheStatus, ModelWeightsStatus
from fd_ray_sync.version import write_version_file


class Named(paddle.nn.Layer):
    def __init__(self, name, d_in, d_out):
        super().__init__()
        setattr(self, name, paddle.nn.Linear(d_in, d_out))
        self._inner = name

    def forward(self, x):
        return getattr(self, self._inner)(x)


class TwoModelEngine(InferenceEngine):
    """Two paddle models: a FastDeploy runner can hand its manager several."""

    def __init__(self, models=None, expert_parallel=False):
        self.parallel = ParallelConfig(enable_expert_parallel=expert_parallel)
        self.groups = CommGroups(self.parallel)
        self.groups.start()
        paddle.seed(0)
        self._models = models or [Named("enc", 4, 6), Named("head", 6, 2)]
        self._kv = KVCacheStatus.NORMAL
        self.ep_buffer = paddle.zeros([8]) if expert_parallel else None
        self.cleared_requests = 0

    def models(self):
        return self._models

    def shard_plan(self):
        return {name: ShardSpec() for name in self.full_shapes()}

    def full_shapes(self):
        return {n: tuple(p.shape) for m in self._models for n, p in m.state_dict().items()}

    def generate(self, prompts, max_new_tokens):
        out = self._models[1](self._models[0](paddle.ones([1, 4])))
        return [f"{float(out.sum()):.4f}" for _ in prompts]

    @property
    def kv_cache_status(self):
        return self._kv

    def clear_requests(self):
        self.cleared_requests += 1

    def free_kv_cache(self):
        self._kv = KVCacheStatus.CLEARED

    def alloc_kv_cache(self):
        self._kv = KVCacheStatus.NORMAL

    def clear_ep_buffer(self):
        self.ep_buffer = None

    def recreate_ep_buffer(self):
        self.ep_buffer = paddle.zeros([8])


def _values(manager):
    return {n: np.array(p.numpy()) for n, p in manager.params.items()}


def _shifted(manager, offset=1.0):
    return {n: v + offset for n, v in _values(manager).items()}


@pytest.fixture
def manager():
    return DynamicWeightManager(TwoModelEngine(), LoadConfig())


def test_captures_the_parameters_of_every_model(manager):
    assert set(manager.params) == {"enc.weight", "enc.bias", "head.weight", "head.bias"}
    assert manager.status == ModelWeightsStatus.NORMAL and manager.first_load


def test_a_name_owned_by_two_models_is_refused():
    engine = TwoModelEngine(models=[Named("x", 2, 2), Named("x", 2, 2)])
    with pytest.raises(StateError, match="'x.weight' is owned by two"):
        DynamicWeightManager(engine, LoadConfig())


def test_clear_frees_storage_kv_and_ep_buffer_then_reload_restores():
    engine = TwoModelEngine(expert_parallel=True)
    m = DynamicWeightManager(engine, LoadConfig())
    new = _shifted(m)
    m.clear_parameters()
    assert m.status == ModelWeightsStatus.CLEARED
    assert m.kv_cache_status == KVCacheStatus.CLEARED
    assert engine.ep_buffer is None and engine.cleared_requests == 1
    assert not any(p._is_initialized() for p in m.params.values())
    m.verify_parameters("clearance")
    with pytest.raises(VerificationError, match="uninitialized: enc.bias"):
        m.verify_parameters("update")
    assert m.clear_parameters() == 0.0  # clearing twice is harmless

    report = m.update_parameters(m_source(new), version="5")
    m.finalize_update()
    assert m.status == ModelWeightsStatus.NORMAL and m.version == "5" and not m.first_load
    assert m.kv_cache_status == KVCacheStatus.NORMAL
    assert report.params_updated == 4 and report.version == "5" and report.rank == 0
    assert report.total_s >= report.sync_s >= 0 and report.update_s >= 0
    for name, value in _values(m).items():
        np.testing.assert_array_equal(value, new[name])
    # Second clear/update cycle: now the EP buffer is recreated (not on the first load).
    m.clear_parameters()
    m.update_parameters(m_source(new), version="6")
    assert engine.ep_buffer is not None


def m_source(state, checksums=None):
    from fd_ray_sync.sources.memory import StateDictSource

    return StateDictSource(state, checksums)


def test_verify_clearance_names_a_parameter_still_holding_storage(manager):
    manager.clear_model_weight()
    manager.params["head.bias"].set_value(np.zeros(2, np.float32))  # (set_value re-allocates)
    with pytest.raises(VerificationError, match="still holding storage: head.bias"):
        manager.verify_parameters("clearance")


def test_initialized_parameters_are_written_in_place(manager):
    param = manager.params["enc.weight"]
    alias = param.detach()  # shares the parameter's buffer
    new = _shifted(manager, 2.0)
    manager.update_from_state_dict(new, version="1")
    np.testing.assert_array_equal(alias.numpy(), new["enc.weight"])


def test_a_name_the_model_lacks_is_refused_by_name_before_any_write(manager):
    before = {n: read_param(p).copy() for n, p in manager.params.items()}
    new = _shifted(manager)
    new["not.in.model"] = np.ones(3, np.float32)
    with pytest.raises(WeightMismatchError, match="not in the model: not.in.model"):
        manager.update_from_state_dict(new, version="1")
    assert manager.status == ModelWeightsStatus.NORMAL
    for name, param in manager.params.items():
        np.testing.assert_array_equal(read_param(param), before[name])


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            lambda s: s.update({"enc.weight": s["enc.weight"].astype(np.float64)}),
            "enc.weight: dtype",
        ),
        (lambda s: s.update({"head.bias": np.ones(3, np.float32)}), r"head.bias: shape \(3,\)"),
        (lambda s: s.pop("enc.bias"), "missing from the update: enc.bias"),
        (lambda s: s.clear(), "no parameter found"),
    ],
)
def test_bad_updates_are_refused_and_change_nothing(manager, corrupt, message):
    before = _values(manager)
    new = _shifted(manager)
    corrupt(new)
    with pytest.raises(WeightMismatchError, match=message):
        manager.update_from_state_dict(new, version="1")
    assert manager.status == ModelWeightsStatus.NORMAL and manager.version is None
    for name, value in _values(manager).items():
        np.testing.assert_array_equal(value, before[name])


def test_bad_updates_leave_a_cleared_model_cleared():
    m = DynamicWeightManager(TwoModelEngine(), LoadConfig())
    new = _shifted(m)
    m.clear_parameters()
    new["enc.bias"] = new["enc.bias"][:2]
    with pytest.raises(WeightMismatchError, match="enc.bias: shape"):
        m.update_from_state_dict(new, version="1")
    assert m.status == ModelWeightsStatus.CLEARED
    assert not any(p._is_initialized() for p in m.params.values())


def test_stride_mismatch_warns(manager, caplog):
    new = _shifted(manager)
    new["enc.weight"] = np.asfortranarray(new["enc.weight"])
    with caplog.at_level(logging.WARNING):
        manager.update_from_state_dict(new, version="1")
    assert "enc.weight: source strides" in caplog.text
    np.testing.assert_array_equal(manager.params["enc.weight"].numpy(), new["enc.weight"])


def test_streamed_update_checks_checksums_before_writing(manager):
    before = _values(manager)
    new = _shifted(manager)
    sums = {n: digest(v) for n, v in new.items()}
    stream = iter(list(new.items()))
    manager.update_from_state_dict(stream, version="2", checksums=sums)
    np.testing.assert_array_equal(manager.params["head.weight"].numpy(), new["head.weight"])

    newer = _shifted(manager)
    sums = {n: digest(v) for n, v in newer.items()}
    sums["head.bias"] ^= 1
    with pytest.raises(ChecksumError, match="'head.bias' does not match its checksum"):
        manager.update_from_state_dict(iter(newer.items()), version="3", checksums=sums)
    np.testing.assert_array_equal(manager.params["enc.weight"].numpy(), new["enc.weight"])
    assert before  # (the first update really changed things)


def test_nan_is_refused_when_the_check_is_on():
    m = DynamicWeightManager(TwoModelEngine(), LoadConfig(check_finite=True))
    new = _shifted(m)
    new["head.weight"][0, 0] = np.nan
    with pytest.raises(WeightMismatchError, match="head.weight .* NaN or Inf"):
        m.update_from_state_dict(new, version="1")


def test_bootstrap_version_comes_from_version_yaml(tmp_path):
    m = DynamicWeightManager(TwoModelEngine(), LoadConfig(model_dir=tmp_path))
    write_rank_snapshot(tmp_path, 0, _shifted(m), part_bytes=64)
    with pytest.raises(VersionError, match="version.yaml does not exist"):
        m.load_weights(SnapshotSource(tmp_path, 0))
    with pytest.raises(VersionError, match="does not exist"):
        m.read_model_version_from_file()
    write_version_file(tmp_path, "123")
    assert m.read_model_version_from_file() == "123"
    report = m.load_weights(SnapshotSource(tmp_path, 0))
    assert report.version == "123" and report.source == "snapshot"


def test_each_step_runs_on_its_own_and_is_timed():
    engine = TwoModelEngine(expert_parallel=True)
    m = DynamicWeightManager(engine, LoadConfig())
    new = _shifted(m)
    assert m.clear_ep_buffer() >= 0 and engine.ep_buffer is None
    assert m.clear_model_weight() >= 0
    m.verify_parameters("clearance")
    assert m.clear_communication_group() >= 0 and not m.groups.up
    assert m.restart_communication_group() == 0.0  # first load: FastDeploy skips it
    report = m.reload_model_weights(m_source(new), version="1")
    assert report.params_updated == 4
    m.finalize_update()
    assert m.restart_communication_group() >= 0 and m.groups.up
    assert m.recreate_ep_buffer() >= 0 and engine.ep_buffer is not None


def test_memory_stats_report_this_process(manager):
    assert manager.memory_stats()["max_rss_gb"] > 0.05  # paddle alone is larger than that


def test_fingerprint_tracks_values(manager):
    fp = manager.fingerprint()
    manager.update_from_state_dict(_shifted(manager), version="1")
    assert manager.fingerprint() != fp
    manager.clear_model_weight()
    with pytest.raises(StateError, match="cannot fingerprint cleared"):
        manager.fingerprint()


def test_checks_after_write_hash_each_parameter_as_it_is_copied(manager):
    from fd_ray_sync.checksum import fingerprint
    from fd_ray_sync.errors import PartialUpdateError
    from fd_ray_sync.params import param_dtype
    from fd_ray_sync.sources.memory import StateDictSource

    new = _shifted(manager)
    sums = {n: digest(v) for n, v in new.items()}
    manager.load_weights(StateDictSource(new, sums), "2", check_after_write=True)
    for name, value in new.items():
        np.testing.assert_array_equal(read_param(manager.params[name]), value)
    # The digests taken while copying are the fingerprint's: equal to reading every byte.
    want = fingerprint((n, param_dtype(p), value) for (n, p), value in _pairs(manager, new))
    assert manager.fingerprint() == want

    newer = _shifted(manager)
    sums = {n: digest(v) for n, v in newer.items()}
    sums["head.bias"] ^= 1
    with pytest.raises(PartialUpdateError, match="'head.bias' does not match its checksum"):
        manager.load_weights(StateDictSource(newer, sums), "3", check_after_write=True)


def _pairs(manager, values):
    return [((n, manager.params[n]), values[n]) for n in manager.params]


# --- partial updates ---------------------------------------------------------------------


def _partial(m, state, version, check_after_write=False):
    return m.write_prepared(m.prepare_load(m_source(state), version, check_after_write, True))


def test_a_partial_update_writes_its_subset_and_keeps_the_rest(manager):
    manager.update_from_state_dict(_shifted(manager), version="1")
    manager.finalize_update()
    before = _values(manager)
    head = {n: v + 5.0 for n, v in before.items() if n.startswith("head.")}
    with pytest.raises(WeightMismatchError, match="missing from the update: enc.bias, enc.weight"):
        manager.update_from_state_dict(head, version="2")  # the default: every parameter
    report = _partial(manager, head, "2", check_after_write=True)
    manager.finalize_update()
    assert report.params_updated == 2 and report.nbytes == sum(a.nbytes for a in head.values())
    after = _values(manager)
    for name, value in after.items():
        np.testing.assert_array_equal(value, head.get(name, before[name]))
    assert manager.version == "2"
    # The fingerprint covers the whole model (the kept checksums and the written ones).
    assert manager.fingerprint() == fingerprint((n, "float32", v) for n, v in after.items())


def test_a_partial_update_still_refuses_unknown_names_and_cleared_parameters(manager):
    head = {n: v for n, v in _shifted(manager).items() if n.startswith("head.")}
    with pytest.raises(WeightMismatchError, match="not in the model: typo.weight"):
        _partial(manager, {**head, "typo.weight": np.ones(2, np.float32)}, "1")
    manager.clear_model_weight()
    with pytest.raises(WeightMismatchError, match=r"hold nothing \(cleared\): enc.bias"):
        _partial(manager, head, "1")


def test_rollback_puts_back_exactly_the_tensors_a_partial_update_overwrote(manager):
    manager.update_from_state_dict(_shifted(manager), version="1")
    manager.finalize_update()
    before, fp = _values(manager), manager.fingerprint()
    head = {n: v + 5.0 for n, v in before.items() if n.startswith("head.")}
    _partial(manager, head, "2", check_after_write=True)
    assert manager.written_fingerprint() == fingerprint((n, "float32", v) for n, v in head.items())
    assert manager.rollback() == ["head.bias", "head.weight"]
    assert manager.status == ModelWeightsStatus.NORMAL and manager.version == "1"
    for name, value in _values(manager).items():
        np.testing.assert_array_equal(value, before[name])
    assert manager.fingerprint() == fp
    with pytest.raises(StateError, match="no partial load to roll back"):
        manager.rollback()


def test_a_partial_update_failing_mid_write_rolls_back_what_it_wrote(manager):
    manager.update_from_state_dict(_shifted(manager), version="1")
    manager.finalize_update()
    before = _values(manager)
    new = {n: v + 5.0 for n, v in before.items()}

    written = []

    def fail_on_second(name):
        written.append(name)
        if len(written) == 2:
            raise OSError("the disk went away")

    manager.on_write = fail_on_second
    with pytest.raises(PartialUpdateError, match="after writing 2 of 4 parameters"):
        _partial(manager, new, "2")
    manager.on_write = None
    assert len(manager.rollback()) == 2  # the two written, nothing else
    for name, value in _values(manager).items():
        np.testing.assert_array_equal(value, before[name])


def test_a_full_update_keeps_no_undo_copy(manager):
    manager.update_from_state_dict(_shifted(manager), version="1")
    with pytest.raises(StateError, match="no partial load"):
        manager.rollback()
    assert manager.written_fingerprint() is None
