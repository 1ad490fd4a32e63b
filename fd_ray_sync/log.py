"""The one logging helper: a logger whose lines carry the rank."""

from __future__ import annotations

import logging


class _PrefixAdapter(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"{self.extra['prefix']} {msg}", kwargs


def get_logger(name: str, rank: int | None = None) -> logging.LoggerAdapter:
    """Logger for `name` whose lines start with `[rank N]`, or `[driver]` without a rank."""
    prefix = "[driver]" if rank is None else f"[rank {rank}]"
    return _PrefixAdapter(logging.getLogger(name), {"prefix": prefix})
