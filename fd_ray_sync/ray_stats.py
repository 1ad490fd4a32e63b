"""Cluster figures the tests, the benchmark and the chaos run read from Ray."""

from __future__ import annotations

import ray


def object_store_bytes_used() -> int:
    """Bytes held in the object stores of all nodes right now."""
    import ray._private.internal_api as internal

    state = internal.get_state_from_address(ray.get_runtime_context().gcs_address)
    return internal.get_memory_info_reply(state).store_stats.object_store_bytes_used


def local_store_room() -> int:
    """Bytes this process's node's object store can still take before it spills to disk."""
    import ray._private.internal_api as internal

    node = ray._private.worker.global_worker.node
    reply = internal.node_stats(
        node.node_ip_address, node.node_manager_port, include_memory_info=False
    )
    return reply.store_stats.object_store_bytes_avail - reply.store_stats.object_store_bytes_used
