"""An RLHF-style loop as a Ray driver: a trainer actor learns, a TP=2 fleet serves its weights.

Each step: the fleet generates rollouts -> a rule-based reward scores them -> the trainer takes
a few Adam steps (reward-weighted likelihood of the rollouts plus a small supervised term on
built-in demonstrations) -> the trainer actor pushes its parameters to the fleet itself
(`Fleet.connect` inside it, then `fleet.update`): the weights go from its memory into the
object store once (or, with `--transport ipc`, into a ring of shared-memory buckets the ranks
copy from), never through the driver. Every rollout must come from the version pushed just
before it.

With `--lora`, the fleet serves the `tiny_lora` preset: the trainer freezes the base, trains
only the LoRA adapters, and after the first (full) push sends only them each step
(`fleet.update(adapters, version, partial=True)`); each step prints the bytes it sent against
the full model's.

    python examples/rlhf_loop.py --steps 3                  # starts (or joins) a local Ray
    python examples/rlhf_loop.py --steps 3 --lora           # adapters only after step 0
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \\
        -- python examples/rlhf_loop.py                     # inside an existing cluster

See examples/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

import numpy as np
import paddle
import paddle.nn.functional as F
import ray

from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine import tokenizer
from fd_ray_sync.engine.model import DecoderLM, assign_parameters
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.engine.spec import lora_names, param_bytes, preset
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.messages import UpdateReport

PROMPTS = ("Ray says: ", "The fleet: ", "Weights: ", "Step up: ")
# The reward: how much of a completion matches this pattern, position by position.
TARGET = "ray "
NAMESPACE = "fd_ray_sync"


def reward(completion: str, target: str = TARGET) -> float:
    """Fraction of the completion's characters that match `target` repeated."""
    if not completion:
        return 0.0
    pattern = (target * (len(completion) // len(target) + 1))[: len(completion)]
    return sum(a == b for a, b in zip(completion, pattern)) / len(completion)


@ray.remote(num_cpus=0)  # Fits next to the two rank actors on a 2-core machine.
class Trainer:
    """The full (TP=1) reference model with an Adam optimizer, in one process."""

    def __init__(self, model: str, seed: int, lr: float, new_tokens: int, lora: bool = False):
        paddle.seed(seed)
        config = preset(model)
        self.max_len = config.max_seq_len
        self.model = DecoderLM(config)
        assign_parameters(self.model, init_full_state_dict(config, seed))
        self.model.train()
        # LoRA: the base is frozen; only the adapters train (and are pushed after step 0).
        self.adapters = set(lora_names(config)) if lora else set()
        params = dict(self.model.named_parameters())
        for name, param in params.items():
            param.stop_gradient = bool(self.adapters) and name not in self.adapters
        trained = [params[n] for n in sorted(self.adapters)] or self.model.parameters()
        self.opt = paddle.optimizer.Adam(learning_rate=lr, parameters=trained)
        self.demo_len = new_tokens

    def connect(self, fleet: str, namespace: str) -> None:
        """Attach to the fleet by name: this actor is the process that pushes its weights."""
        self.fleet = Fleet.connect(fleet, namespace)

    def push(self, version: int, adapters_only: bool = False) -> UpdateReport:
        """The full weights, by the parameter names the fleet's ranks use, straight from
        the parameters (read in place, put once); returns when every rank committed. With
        `adapters_only`, only the LoRA adapters, as a partial update (the fleet keeps the
        base it holds)."""
        weights = dict(self.model.named_parameters())
        if adapters_only:
            weights = {n: p for n, p in weights.items() if n in self.adapters}
        return self.fleet.update(weights, version=version, partial=adapters_only)

    def _completion_logprob(self, prompt: str, completion: str) -> paddle.Tensor:
        """Mean over the completion's tokens of log p(token | everything before it)."""
        p_ids, c_ids = tokenizer.encode(prompt), tokenizer.encode(completion)
        ids = (p_ids + c_ids)[: self.max_len]
        tokens = paddle.to_tensor([ids], dtype="int64")
        logp = F.log_softmax(self.model(tokens)[0, :-1], axis=-1)  # predicts ids[1:]
        picked = paddle.take_along_axis(logp, tokens[0, 1:].unsqueeze(-1), axis=-1)
        return picked[len(p_ids) - 1 :].mean()

    def train_step(self, rollouts: list[tuple[str, str, float]], iters: int) -> float:
        """`iters` Adam steps on -(advantage-weighted rollout likelihood) + demo NLL."""
        rewards = np.array([r for _, _, r in rollouts], dtype=np.float32)
        advantages = rewards - rewards.mean()
        demos = [(p, (TARGET * self.demo_len)[: self.demo_len]) for p, _, _ in rollouts]
        for _ in range(iters):
            pg = sum(
                -float(a) * self._completion_logprob(p, c)
                for (p, c, _), a in zip(rollouts, advantages)
            )
            sft = sum(-self._completion_logprob(p, d) for p, d in demos)
            loss = (pg + sft) / len(rollouts)
            loss.backward()
            self.opt.step()
            self.opt.clear_grad()
        return float(loss)


def rollout(fleet: Fleet, version: int, new_tokens: int) -> list[tuple[str, str, float]]:
    """Generate from the fleet and score; every result must carry `version`."""
    results = fleet.generate(list(PROMPTS), max_new_tokens=new_tokens)
    stale = [r.version for r in results if r.version != str(version)]
    if stale:
        raise RuntimeError(f"expected every rollout from version {version}, got {stale}")
    return [(r.prompt, r.text, reward(r.text)) for r in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="Train/update steps.")
    parser.add_argument("--new-tokens", type=int, default=12, help="Tokens per rollout.")
    parser.add_argument("--iters", type=int, default=4, help="Adam steps per train step.")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate.")
    parser.add_argument("--seed", type=int, default=0, help="Initial weights' seed.")
    parser.add_argument(
        "--transport",
        choices=("object_store", "ipc"),
        default="object_store",
        help="How the trainer's weights reach the ranks: the object store, or shared memory "
        "(ipc: the trainer actor must run on the ranks' node, as on one machine).",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="Serve tiny_lora, train only its LoRA adapters and push only them each step.",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray address; default: RAY_ADDRESS (set by `ray job submit`), a running local "
        "cluster, or a new local one.",
    )
    args = parser.parse_args(argv)
    if args.steps < 0 or args.new_tokens < 1 or args.iters < 1:
        parser.error("--steps must be >= 0, --new-tokens and --iters >= 1")

    ray.init(address=args.address, namespace=NAMESPACE)
    name = f"rlhf-{uuid.uuid4().hex[:8]}"
    model = "tiny_lora" if args.lora else "tiny"
    full_bytes = param_bytes(preset(model))
    trainer = Trainer.remote(model, args.seed, args.lr, args.new_tokens, args.lora)
    load = LoadConfig(load_strategy=args.transport)
    config = FleetConfig(name=name, namespace=NAMESPACE, tp=2, dp=1, model=model, load=load)
    fleet = Fleet.launch(config)
    try:
        ray.get(trainer.connect.remote(name, NAMESPACE))
        # Version 0: the trainer's initial weights, so the fleet has something to serve.
        report = ray.get(trainer.push.remote(0))
        print(f"fleet {name} serving version {report.version}", flush=True)
        version = 0
        for step in range(1, args.steps + 1):
            rollouts = rollout(fleet, version, args.new_tokens)
            mean_reward = float(np.mean([r for _, _, r in rollouts]))
            loss = ray.get(trainer.train_step.remote(rollouts, args.iters))
            t = time.perf_counter()
            report = ray.get(trainer.push.remote(step, args.lora))
            update_s = time.perf_counter() - t
            version = step
            print(
                f"step {step}: reward {mean_reward:.3f} loss {loss:.3f} "
                f"version {report.version} update {update_s:.3f}s "
                f"({report.nbytes / 1e6:.3f} MB sent of the model's {full_bytes / 1e6:.3f} MB) "
                f"sample {rollouts[0][1]!r}",
                flush=True,
            )
        final = rollout(fleet, version, args.new_tokens)
        print(
            f"final: reward {np.mean([r for _, _, r in final]):.3f} version {version} "
            f"sample {final[0][1]!r}",
            flush=True,
        )
    finally:
        fleet.shutdown()
        ray.kill(trainer)
    print("rlhf loop done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
