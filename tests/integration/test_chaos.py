"""A bounded chaos run: the two figures that must be zero are zero."""

import pytest

from fd_ray_sync.chaos import ChaosConfig, run_chaos

pytestmark = pytest.mark.slow


def test_bounded_chaos_run_never_mixes_versions(ray_cluster):
    report = run_chaos(
        ChaosConfig(updates=6, dp=2, tp=2, kill_interval_s=3, step_s=0.5, phase_timeout_s=20)
    )
    assert report.mixed_version_results == 0
    assert report.params_not_matching_committed == 0, report.final_ranks
    assert report.ranks_killed >= 1 and report.ranks_recovered == report.ranks_killed
    assert report.coordinator_killed == 1 and report.coordinator_recovered == 1
    assert report.updates_committed >= 1 and report.requests_served >= 1
    assert report.updates_committed + report.updates_aborted == report.updates_tried == 6
