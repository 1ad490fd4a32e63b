"""Sleep and wake: the tags and levels a rank or a fleet sleeps with (vLLM's `sleep(level)` /
`wake_up(tags)`, FastDeploy's `/v1/sleep?tags=weights,kv_cache`).

    tag        level 1                                   level 2
    weights    copied to host memory, device storage     discarded (like clear): wake gives
               freed; wake writes them back (no          nothing back, an update loads them
               trainer push), checked against the
               fingerprint taken before sleeping
    kv_cache   freed; wake allocates it again             the same

Pure checks, shared by the rank (`DynamicWeightManager.sleep`), the coordinator
(`actors/sleep.py`) and the driver (`Fleet.sleep`), so a bad tag or level is refused the
same way wherever it is given, before anything changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fd_ray_sync.errors import ConfigError

TAGS = ("weights", "kv_cache")
LEVELS = (1, 2)

Tags = str | Iterable[str] | None


def sleep_tags(tags: Tags) -> tuple[str, ...]:
    """`tags` as a tuple in `TAGS` order: None means both; a string may list several, comma
    separated (`"weights,kv_cache"`, as FastDeploy's query parameter). Raises ConfigError
    naming every unknown tag, and for an empty list."""
    if tags is None:
        return TAGS
    if isinstance(tags, str):
        tags = tags.split(",")
    given = [t.strip() if isinstance(t, str) else t for t in tags]
    unknown = [t for t in given if t not in TAGS]
    if unknown:
        raise ConfigError(
            f"unknown sleep tag(s) {', '.join(map(repr, unknown))}; known: {', '.join(TAGS)}"
        )
    if not given:
        raise ConfigError(f"no sleep tag given; known: {', '.join(TAGS)} (None means both)")
    return tuple(t for t in TAGS if t in given)


def sleep_level(level: int) -> int:
    """`level` if it is 1 or 2, else ConfigError naming it."""
    if isinstance(level, bool) or level not in LEVELS:
        raise ConfigError(
            f"unknown sleep level {level!r}: 1 keeps the weights in host memory, 2 discards them"
        )
    return int(level)


def deepened(asleep: Mapping[str, int], level: int, tags: Iterable[str]) -> dict[str, int]:
    """The sleep state after sleeping `tags` at `level`: a tag already asleep keeps the deeper
    of its two levels (weights discarded cannot come back by sleeping lighter)."""
    return {**asleep, **{t: max(level, asleep.get(t, 0)) for t in tags}}


def describe(asleep: Mapping[str, int], discarded: bool = False) -> str:
    """One line a refused caller reads: what sleeps and how to serve again. `discarded`: the
    weights hold nothing although they do not sleep (woken after level 2, or cleared)."""
    if not asleep:
        return "awake"
    parts = []
    level = asleep.get("weights", 2 if discarded else None)
    if level == 1:
        parts.append("weights in host memory (level 1)")
    elif level == 2:
        parts.append("weights discarded")
    if "kv_cache" in asleep:
        parts.append("KV cache freed")
    if level != 2:
        todo = "wake_up()"
    elif "kv_cache" in asleep:
        todo = "update the weights, then wake_up(tags=['kv_cache'])"
    else:
        todo = "update the weights"
    return f"asleep: {', '.join(parts)}; {todo} to serve again"
