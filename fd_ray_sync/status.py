"""Statuses with FastDeploy's numbering (`fastdeploy.inter_communicator`)."""

from __future__ import annotations

from enum import IntEnum


class ModelWeightsStatus(IntEnum):
    NORMAL = 0
    UPDATING = 1
    CLEARING = -1
    CLEARED = -2


class KVCacheStatus(IntEnum):
    NORMAL = 0
    UPDATING = 1
    CLEARING = -1
    CLEARED = -2


# The weight-status transitions a manager allows, written down in one place.
WEIGHT_TRANSITIONS: dict[ModelWeightsStatus, frozenset[ModelWeightsStatus]] = {
    ModelWeightsStatus.NORMAL: frozenset(
        {ModelWeightsStatus.UPDATING, ModelWeightsStatus.CLEARING}
    ),
    ModelWeightsStatus.UPDATING: frozenset(
        {ModelWeightsStatus.NORMAL, ModelWeightsStatus.CLEARING, ModelWeightsStatus.CLEARED}
    ),
    ModelWeightsStatus.CLEARING: frozenset({ModelWeightsStatus.CLEARED, ModelWeightsStatus.NORMAL}),
    ModelWeightsStatus.CLEARED: frozenset({ModelWeightsStatus.UPDATING}),
}
