"""The baselines `fd-ray-sync bench` compares with: the naive Ray push (the whole state dict
as one object), FastDeploy-style per-rank `.pdparams` files, and Ray Direct Transport over
gloo. Their ranks are plain paddle parameters of their slices, no transaction."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import ray

from fd_ray_sync.bench_setup import WARMUP, OnRound, Setup, no_round, wait_store_drained
from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine.synthetic import SyntheticEngine, synthetic_shapes, synthetic_weights
from fd_ray_sync.memwatch import AnonPeak
from fd_ray_sync.sharding import take_shard
from fd_ray_sync.tensors import contiguous


class _PlainRank:
    """A rank of the baselines: paddle parameters of its slices, loaded the usual ways."""

    def __init__(self, total_bytes: int, tp: int, rank: int):
        import paddle

        paddle.disable_signal_handler()
        parallel = ParallelConfig(tp=tp, rank=rank % tp)  # any replica: its TP rank's slices
        self.engine = SyntheticEngine(total_bytes, parallel, _NoGroups())
        self.params = self.engine.models()[0].state_dict()
        self.plan = self.engine.shard_plan()
        self._watch: AnonPeak | None = None

    def watch(self) -> None:
        self._watch = AnonPeak()

    def peak(self) -> int:
        return self._watch.stop()

    def load_object(self, wrapped: list) -> None:
        """Naive Ray: get the whole state dict, set_value each slice."""
        state = ray.get(wrapped[0])
        for name, param in self.params.items():
            param.set_value(contiguous(take_shard(state[name], self.plan[name])))

    def load_pdparams(self, path: str) -> None:
        """FastDeploy-style: paddle.load of a pickle this benchmark wrote itself."""
        import paddle

        state = paddle.load(path)  # the one place pickle is loaded: our own bench files
        for name, param in self.params.items():
            param.set_value(state[name])

    def fingerprint(self) -> str:
        from fd_ray_sync.params import read_param

        return fingerprint((n, "float32", read_param(p)) for n, p in self.params.items())


PlainRank = ray.remote(num_cpus=1)(_PlainRank)


class _NoGroups:
    """The baselines' ranks run no collectives: an always-up stand-in for CommGroups."""

    up = True

    def start(self) -> None:
        pass


def naive_push(full: dict, ranks: list) -> None:
    """Naive Ray: the whole state dict as one object; every rank gets it and set_values."""
    ref = ray.put(full)
    ray.get([r.load_object.remote([ref]) for r in ranks])


def run_baseline(setup: Setup, runs: int, how: str, on_round: OnRound = no_round) -> dict:
    world = setup.tp * setup.dp
    ranks = [PlainRank.remote(setup.total_bytes, setup.tp, r) for r in range(world)]
    ray.get([r.watch.remote() for r in ranks])
    ray.get([r.peak.remote() for r in ranks])
    folder = tempfile.mkdtemp(prefix="fdrs-pdparams-")
    times, extra = [], {}
    try:
        for run in range(runs + WARMUP):
            seed = run + 1
            full = dict(setup.weights(seed))
            wait_store_drained(64 << 20)
            ray.get([r.watch.remote() for r in ranks])
            trainer = AnonPeak()
            start = time.perf_counter()
            if how == "naive_ray":
                naive_push(full, ranks)
            else:  # fastdeploy_pdparams: per-rank paddle.save, then paddle.load on each rank
                import paddle

                paths = []
                for r in range(setup.tp):
                    local = {
                        n: paddle.to_tensor(contiguous(take_shard(a, setup.plans[r][n])))
                        for n, a in full.items()
                    }
                    paths.append(os.path.join(folder, f"model_state.tp{r}.pdparams"))
                    paddle.save(local, paths[-1])
                    del local
                ray.get(
                    [rk.load_pdparams.remote(paths[i % setup.tp]) for i, rk in enumerate(ranks)]
                )
            dt = time.perf_counter() - start
            trainer_extra = trainer.stop()
            del full
            rank_extra = ray.get([r.peak.remote() for r in ranks])
            if run >= WARMUP:
                times.append(dt)
            on_round(run + 1)
        ok = setup.holds(ranks, runs + WARMUP)
    finally:
        for r in ranks:
            ray.kill(r)
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "times": times,
        "trainer_extra": trainer_extra,
        "rank_extra": rank_extra,
        "bit_identical": ok,
        **extra,
    }


def _rdt_actors():
    """The RDT actor classes, defined only once torch is known to be there: Ray checks the
    tensor transport when a method is declared."""
    import torch

    @ray.remote(num_cpus=0, enable_tensor_transport=True)
    class RdtTrainer:
        def __init__(self, total_bytes: int):
            self.shapes = synthetic_shapes(total_bytes)

        @ray.method(tensor_transport="gloo")
        def weights(self, seed: int) -> dict:
            return {n: torch.from_numpy(a) for n, a in synthetic_weights(self.shapes, seed)}

    @ray.remote(num_cpus=1, enable_tensor_transport=True)
    class RdtRank(_PlainRank):
        def load(self, state: dict) -> None:
            for name, param in self.params.items():
                full = state[name].numpy()
                param.set_value(contiguous(take_shard(full, self.plan[name])))

    return RdtTrainer, RdtRank


def run_rdt(setup: Setup, runs: int, on_round: OnRound = no_round) -> dict:
    """Ray Direct Transport over gloo: a trainer actor returns torch tensors through the
    collective group and each rank receives them (new tensors on every receive) and copies
    its slices into its parameters."""
    try:
        import torch  # noqa: F401
        from ray.experimental.collective import create_collective_group, destroy_collective_group
    except ImportError as e:
        return {"error": f"{type(e).__name__}: {e} (RDT's gloo transport moves torch tensors)"}
    world = setup.tp * setup.dp
    RdtTrainer, RdtRank = _rdt_actors()  # noqa: N806 - classes
    trainer = RdtTrainer.remote(setup.total_bytes)
    ranks = [RdtRank.remote(setup.total_bytes, setup.tp, r) for r in range(world)]
    group = None
    times, trainer_extra = [], 0
    try:
        group = create_collective_group([trainer, *ranks], backend="torch_gloo")
        for run in range(runs + WARMUP):
            seed = run + 1
            ray.get([r.watch.remote() for r in ranks])
            start = time.perf_counter()
            ref = trainer.weights.remote(seed)
            ray.get([r.load.remote(ref) for r in ranks])
            dt = time.perf_counter() - start
            rank_extra = ray.get([r.peak.remote() for r in ranks])
            del ref
            if run >= WARMUP:
                times.append(dt)
            on_round(run + 1)
        ok = setup.holds(ranks, runs + WARMUP)
    except Exception as e:  # noqa: BLE001 - RDT is alpha: report how it failed, exactly
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if group is not None:
            destroy_collective_group(group)
        for actor in (trainer, *ranks):
            ray.kill(actor)
    return {
        "times": times,
        "trainer_extra": trainer_extra,
        "rank_extra": rank_extra,
        "bit_identical": ok,
        "note": "trainer memory not sampled (it is an actor process)",
    }
