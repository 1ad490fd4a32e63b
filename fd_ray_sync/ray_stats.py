"""Cluster figures the tests, the benchmark and the chaos run read from Ray."""

from __future__ import annotations

import os

import ray
from pydantic import BaseModel, ConfigDict


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


class ProcessRef(BaseModel):
    """Who a process is to Ray, so another process can ask whether it still lives: the
    actor (id and pid: a restarted actor is a new process) or else the driver's job."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    actor_id: str | None = None
    pid: int

    @classmethod
    def here(cls) -> ProcessRef:
        ctx = ray.get_runtime_context()
        return cls(job_id=ctx.get_job_id(), actor_id=ctx.get_actor_id(), pid=os.getpid())

    def __str__(self) -> str:
        who = f"actor {self.actor_id}" if self.actor_id else f"driver of job {self.job_id}"
        return f"{who}, pid {self.pid}"


def is_alive(process: ProcessRef) -> bool:
    """True while `process` runs, from the GCS's actor or job table (it learns of a death
    within ~50 ms, measured). Internal Ray API: both tables are read without the
    dashboard, which tests and small clusters run without."""
    from ray._private.state import state

    if process.actor_id is not None:
        info = state.actor_table(process.actor_id)
        return bool(info) and info.get("State") == "ALIVE" and info.get("Pid") == process.pid
    for job in state.job_table():
        if job.get("JobID") == process.job_id:
            return not job.get("IsDead", False)
    return False
