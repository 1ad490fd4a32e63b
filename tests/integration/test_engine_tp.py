"""Two real processes with gloo groups serve the tiny model split over TP (and EP); their
logits and greedy text must match the full model in one process."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
import traceback
from queue import Empty

import numpy as np
import pytest

from fd_ray_sync.comm import CommGroups, init_world
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine import tokenizer
from fd_ray_sync.engine.model import preset
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.errors import StateError

SEED = 11
TOKENS = tokenizer.encode("tensor parallel check")
PROMPTS = ["Once upon a time", "ray + paddle"]
NEW_TOKENS = 10
TIMEOUT_S = 120


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all sockets held open until every port is taken)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def rank_worker(rank: int, endpoints: list[str], expert_parallel: bool, queue) -> None:
    """One rank: join the world, load its slice of the seeded weights, report what it computes.

    Then tears the groups down and brings them back (the layers must find the new groups,
    not the destroyed ones), clears every parameter and refills it with `seed_weights`,
    which must cut the same slices as `load_full_state_dict`.
    """
    try:
        parallel = ParallelConfig(tp=2, rank=rank, enable_expert_parallel=expert_parallel)
        init_world(parallel, endpoints)
        groups = CommGroups(parallel)
        engine = ReferenceEngine(preset("tiny"), parallel, groups)
        engine.load_full_state_dict(init_full_state_dict(preset("tiny"), SEED))
        logits = engine.logits(TOKENS)
        texts = engine.generate(PROMPTS, NEW_TOKENS)

        groups.shutdown()
        try:
            engine.logits(TOKENS)
            refused = False
        except StateError:
            refused = True
        groups.restart()
        for param in engine.model.parameters():
            param._clear_data()
        engine.seed_weights(SEED)
        queue.put(
            {
                "rank": rank,
                "logits": logits,
                "texts": texts,
                "refused_without_groups": refused,
                "logits_after_refill": engine.logits(TOKENS),
            }
        )
    except BaseException:
        queue.put({"rank": rank, "error": traceback.format_exc()})


def collect(queue, procs: list) -> list[dict]:
    """One report per process; fails fast when a process dies without reporting."""
    results: list[dict] = []
    deadline = time.monotonic() + TIMEOUT_S
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=1))
        except Empty:
            crashed = {p.pid: p.exitcode for p in procs if p.exitcode not in (None, 0)}
            assert not crashed, f"rank process(es) died without a report (pid: exit code) {crashed}"
            assert time.monotonic() < deadline, f"no report from every rank in {TIMEOUT_S} s"
    return results


def run_two_ranks(expert_parallel: bool) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    endpoints = [f"127.0.0.1:{port}" for port in free_ports(2)]
    procs = [
        ctx.Process(target=rank_worker, args=(rank, endpoints, expert_parallel, queue))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        results = collect(queue, procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    return sorted(results, key=lambda r: r["rank"])


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "tp2-ep2"])
def test_two_ranks_match_the_full_model(expert_parallel: bool) -> None:
    results = run_two_ranks(expert_parallel)

    full = ReferenceEngine(preset("tiny"))
    full.load_full_state_dict(init_full_state_dict(preset("tiny"), SEED))
    expected_logits = full.logits(TOKENS)
    expected_texts = full.generate(PROMPTS, NEW_TOKENS)

    for result in results:
        np.testing.assert_allclose(result["logits"], expected_logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(
            result["logits_after_refill"], expected_logits, atol=1e-4, rtol=0
        )
        assert result["texts"] == expected_texts
        assert result["refused_without_groups"]
