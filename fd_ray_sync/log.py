"""The one logging helper: a logger whose lines carry the rank."""

from __future__ import annotations

import logging


class _PrefixAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"{self.extra['prefix']} {msg}", kwargs


def get_logger(name: str, rank: int | str | None = None) -> logging.LoggerAdapter:
    """Logger for `name` whose lines start with `[rank N]`, `[<role>]` for a string, or
    `[driver]` without either."""
    if rank is None:
        prefix = "[driver]"
    elif isinstance(rank, str):
        prefix = f"[{rank}]"
    else:
        prefix = f"[rank {rank}]"
    return _PrefixAdapter(logging.getLogger(name), {"prefix": prefix})
