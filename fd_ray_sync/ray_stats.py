"""Cluster figures the tests, the benchmark and the chaos run read from Ray."""

from __future__ import annotations

import ray


def object_store_bytes_used() -> int:
    """Bytes held in the object stores of all nodes right now."""
    import ray._private.internal_api as internal

    state = internal.get_state_from_address(ray.get_runtime_context().gcs_address)
    return internal.get_memory_info_reply(state).store_stats.object_store_bytes_used
