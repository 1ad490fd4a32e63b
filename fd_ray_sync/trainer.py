"""A small real trainer for the reference LM: the demo's (and examples') side of the RL loop.

It trains the full single-process model with paddle autograd and Adam on next-byte
prediction, and hands its weights out as `(name, tensor)` pairs for `Fleet.update`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import paddle

from fd_ray_sync.engine import tokenizer
from fd_ray_sync.engine.model import DecoderLM, assign_parameters, next_token_loss
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.engine.spec import ModelConfig, preset

DEMO_TEXT = (
    "The trainer learns and the fleet serves. Every step the new weights travel through "
    "the object store to every rank, all at once or not at all. "
)


class TinyTrainer:
    """The full reference model, trained on windows of a text."""

    def __init__(
        self,
        config: ModelConfig | None = None,
        text: str = DEMO_TEXT,
        seed: int = 0,
        lr: float = 3e-3,
        window: int = 48,
        batch: int = 16,
    ):
        self.config = config or preset("tiny")
        paddle.seed(seed)
        self.model = DecoderLM(self.config)
        assign_parameters(self.model, init_full_state_dict(self.config, seed))
        self.model.train()
        self.opt = paddle.optimizer.Adam(learning_rate=lr, parameters=self.model.parameters())
        self.data = np.array(tokenizer.encode(text * 4), dtype=np.int64)
        self.window = min(window, self.config.max_seq_len, len(self.data) - 1)
        self.batch = batch
        self.rng = np.random.default_rng(seed)

    def train(self, iterations: int) -> float:
        """`iterations` optimizer steps on random windows; returns the last loss."""
        loss = float("nan")
        for _ in range(iterations):
            starts = self.rng.integers(0, len(self.data) - self.window, size=self.batch)
            tokens = paddle.to_tensor(np.stack([self.data[s : s + self.window] for s in starts]))
            out = next_token_loss(self.model(tokens), tokens)
            out.backward()
            self.opt.step()
            self.opt.clear_grad()
            loss = float(out)
        return loss

    def weights(self) -> Iterator[tuple[str, paddle.Tensor]]:
        """The model's parameters as a stream of (name, tensor): no second copy is made."""
        for name, param in self.model.named_parameters():
            yield name, param.detach()
