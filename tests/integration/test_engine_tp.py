"""Two real processes with gloo groups serve the tiny model split over TP (and EP); their
logits and greedy text must match the full model in one process."""

from __future__ import annotations

import numpy as np
import pytest
from procs import run_ranks

from fd_ray_sync.comm import CommGroups, init_world
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine import tokenizer
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import StateError

SEED = 11
TOKENS = tokenizer.encode("tensor parallel check")
PROMPTS = ["Once upon a time", "ray + paddle"]
NEW_TOKENS = 10


def rank_worker(rank: int, endpoints: list[str], expert_parallel: bool) -> dict:
    """One rank: join the world, load its slice of the seeded weights, report what it computes.

    Then tears the groups down and brings them back (the layers must find the new groups,
    not the destroyed ones), clears every parameter and refills it with `seed_weights`,
    which must cut the same slices as `load_full_state_dict`.
    """
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
    return {
        "logits": logits,
        "texts": texts,
        "refused_without_groups": refused,
        "logits_after_refill": engine.logits(TOKENS),
    }


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "tp2-ep2"])
def test_two_ranks_match_the_full_model(expert_parallel: bool) -> None:
    results = run_ranks(rank_worker, 2, expert_parallel)

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
