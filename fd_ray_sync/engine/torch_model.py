"""The reference LM in torch: the paddle `DecoderLM`'s dense layers, names and layouts.

Parameter names and shapes are those of `fd_ray_sync.engine.spec.full_shapes` for a dense
config (no MoE), Linear weights included ([in_features, out_features], as paddle lays them
out), so the paddle model's `shard_plan` cuts this one too, and the same full weights give
the same greedy text through the byte tokenizer in either framework.

Tensor parallelism: column-parallel linears need no communication; a row-parallel linear
sums its partial products over the TP group. That all-reduce runs on the rank's paddle
`CommGroups` (gloo on CPU, NCCL on GPU), the partial sums crossing torch -> numpy -> paddle
and back: one group lifecycle for every engine, at the price of a host round trip per
reduce (fine for the reference model; a production torch engine reduces with
torch.distributed on its own groups).

No KV cache: each step runs the whole sequence again (a sequence is at most `max_seq_len`
tokens), so nothing derived from a parameter outlives a call and the weight manager may
clear and refill the parameters between calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fd_ray_sync.comm import CommGroups, GroupAllReduce
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine.spec import TINY_DENSE, ModelConfig
from fd_ray_sync.errors import ConfigError


class TPAllReduce:
    """Sums a torch tensor over this rank's TP group through the paddle `CommGroups`
    (identity when `size == 1`); the group is looked up on every call (see GroupAllReduce)."""

    def __init__(self, groups: CommGroups | None, size: int):
        self._reduce = GroupAllReduce(groups, "tp", size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._reduce.size == 1:
            return x
        import paddle

        partial = paddle.to_tensor(np.from_dlpack(x.detach().cpu().contiguous()))
        total = self._reduce(partial).numpy()
        return torch.from_numpy(total).to(x.device)


class Linear(nn.Module):
    """y = x @ W + b with W laid out [in_features, out_features] (paddle's layout)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, std=in_features**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


class RowParallelLinear(Linear):
    """y = all_reduce(x[shard] @ W[shard, :]) + b; the replicated bias is added once."""

    def __init__(self, in_features: int, out_features: int, reduce: TPAllReduce):
        super().__init__(in_features, out_features)
        self._reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(x @ self.weight) + self.bias


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: int, reduce: TPAllReduce):
        super().__init__()
        d = config.d_model
        self.local_heads, self.head_dim = config.n_heads // tp, config.head_dim
        # Columns per head as [head][q|k|v][head_dim]: a column chunk is whole heads.
        self.qkv = Linear(d, 3 * d // tp)
        self.out = RowParallelLinear(d // tp, d, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [b, heads, t, head_dim]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        mask = torch.triu(torch.full((t, t), float("-inf"), device=x.device), diagonal=1)
        attn = F.softmax(scores + mask, dim=-1) @ v
        return self.out(attn.transpose(1, 2).reshape(b, t, -1))


class DenseMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: int, reduce: TPAllReduce):
        super().__init__()
        self.up = Linear(config.d_model, config.d_ff // tp)
        self.down = RowParallelLinear(config.d_ff // tp, config.d_model, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, tp: int, reduce: TPAllReduce):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config, tp, reduce)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = DenseMLP(config, tp, reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchDecoderLM(nn.Module):
    """The full model (no `parallel`/`groups`: a trainer's) or one TP rank's shard of it."""

    def __init__(
        self,
        config: ModelConfig = TINY_DENSE,
        parallel: ParallelConfig | None = None,
        groups: CommGroups | None = None,
    ):
        super().__init__()
        parallel = parallel or ParallelConfig()
        if config.n_experts:
            raise ConfigError(
                f"the torch reference model has no MoE layers; got n_experts={config.n_experts}"
            )
        config.check_parallel(parallel)
        self.config = config
        reduce = TPAllReduce(groups, parallel.tp)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))  # 0-d, first, as in paddle's
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
        self.layers = nn.ModuleList(
            [Block(config, parallel.tp, reduce) for _ in range(config.n_layers)]
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [batch, t, vocab] of `tokens` [batch, t] (causal, positions from 0)."""
        t = tokens.shape[1]
        if t > self.config.max_seq_len:
            raise ValueError(f"{t} tokens exceed max_seq_len={self.config.max_seq_len}")
        x = self.embed(tokens) + self.pos_embed(torch.arange(t, device=tokens.device))
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.ln_f(x)) * self.logit_scale

    @torch.no_grad()
    def generate_ids(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation, with the paddle model's rules: the prompt keeps its last
        `max_seq_len - max_new_tokens` tokens (at least one), an empty one starts from byte
        0, and there is no stop token (every TP rank runs the same number of steps)."""
        if max_new_tokens <= 0:
            return []
        limit = self.config.max_seq_len
        seq = list(prompt)[-max(1, limit - max_new_tokens) :] or [0]
        device = self.embed.weight.device
        new: list[int] = []
        while True:
            logits = self(torch.tensor([seq], dtype=torch.int64, device=device))
            new.append(int(torch.argmax(logits[0, -1])))
            if len(new) == max_new_tokens or len(seq) == limit:
                return new
            seq.append(new[-1])
