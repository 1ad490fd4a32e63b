"""The rules of a name and layout mapping: what the trainer holds -> what the engine holds.

A `WeightMapping` is data (frozen models, no callables), so it can be logged, compared and
cached. Each rule claims source names by regex (full match) and says what they become:

    Rename(source=r"model\\.norm\\.(weight|bias)", target=r"ln_f.\\1")           1 -> 1
    Table(names={"lm_head.weight": "lm_head.weight"}, ops=(Transpose(axes=(1, 0)),))
    Fuse(sources=(r"(.*)\\.q", r"(.*)\\.k", r"(.*)\\.v"), target=r"\\1.qkv", axis=0)   n -> 1
    Split(source=r"(.*)\\.qkv", targets=(r"\\1.q", r"\\1.k", r"\\1.v"), axis=0)       1 -> n

and `ops` (Reshape, Transpose, Cast) re-lay the tensor: after a fuse joins its sources,
before a split cuts its one. Sources of one fuse are grouped by the target they expand to.

`check(source, engine)` runs on names, shapes and dtypes only and lists every problem at
once: a source name no rule claims or two rules claim, an engine name produced by nothing or
twice, a produced name the engine lacks, a shape or dtype that does not come out as the
engine holds it. `apply(state)` then yields `(engine_name, tensor)` one rule at a time,
reading only that rule's sources, so a trainer holds its own weights plus one mapped tensor.

Tensors are handled as (storage array, dtype string) pairs like `fd_ray_sync.tensors`: a
bfloat16 tensor is its uint16 bits, which concatenate, reshape and transpose like any other;
a bfloat16 result is handed on as a torch (else paddle) tensor viewing those bits, because
numpy has no bfloat16 and the update path reads dtypes from tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, ItemsView, Iterator, Mapping, Sequence, ValuesView
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fd_ray_sync.errors import ConfigError, WeightMismatchError
from fd_ray_sync.mapping.ops import Op, ops_shape, run_ops
from fd_ray_sync.tensors import shape_and_dtype, to_host

Manifest = Mapping[str, tuple[tuple[int, ...], str]]
"""Name -> (full shape, dtype string)."""

_FROZEN = ConfigDict(frozen=True, extra="forbid")

# --- rules ----------------------------------------------------------------------------------


class _Step(BaseModel):
    """One application of a rule: these sources, in order, make these targets."""

    model_config = _FROZEN
    rule: int
    sources: tuple[str, ...]
    targets: tuple[str, ...]


class Rename(BaseModel):
    """Each source name fully matching `source` becomes `target` (a `re.Match.expand`
    template: `\\1`, `\\g<name>`), re-laid by `ops`."""

    model_config = _FROZEN
    kind: Literal["rename"] = "rename"
    source: str
    target: str
    ops: tuple[Op, ...] = ()

    def claims(self, names: Sequence[str]) -> tuple[list[tuple[tuple, tuple]], list[str]]:
        pattern, steps = re.compile(self.source), []
        for name in names:
            if m := pattern.fullmatch(name):
                steps.append(((name,), (m.expand(self.target),)))
        return steps, []

    def shapes(self, shapes: list[tuple], dtypes: list[str]) -> list[tuple[tuple, str]]:
        return [ops_shape(self.ops, shapes[0], dtypes[0])]

    def run(self, arrays: list[tuple[np.ndarray, str]]) -> list[tuple[np.ndarray, str]]:
        return [run_ops(self.ops, *arrays[0])]


class Table(BaseModel):
    """Exact names: source -> target, re-laid by `ops`."""

    model_config = _FROZEN
    kind: Literal["table"] = "table"
    names: dict[str, str]
    ops: tuple[Op, ...] = ()

    def __hash__(self) -> int:
        return hash((self.kind, tuple(self.names.items()), self.ops))

    def claims(self, names: Sequence[str]) -> tuple[list[tuple[tuple, tuple]], list[str]]:
        return [((n,), (self.names[n],)) for n in names if n in self.names], []

    shapes = Rename.shapes
    run = Rename.run


class Fuse(BaseModel):
    """One name from each of `sources` (matches expanding to the same `target`) joined along
    `axis`: concatenated, or stacked on a new axis there (`stack`), then `ops`."""

    model_config = _FROZEN
    kind: Literal["fuse"] = "fuse"
    sources: tuple[str, ...] = Field(min_length=1)
    target: str
    axis: int = 0
    stack: bool = False
    ops: tuple[Op, ...] = ()

    def claims(self, names: Sequence[str]) -> tuple[list[tuple[tuple, tuple]], list[str]]:
        patterns = [re.compile(p) for p in self.sources]
        groups: dict[str, list[str | None]] = {}
        problems = []
        for name in names:
            for i, pattern in enumerate(patterns):
                if m := pattern.fullmatch(name):
                    slot = groups.setdefault(m.expand(self.target), [None] * len(patterns))
                    if slot[i] is not None:
                        problems.append(f"{slot[i]!r} and {name!r} both fuse into the same place")
                    slot[i] = name
        steps = []
        for target, slot in groups.items():
            if None in slot:
                lacking = [self.sources[i] for i, n in enumerate(slot) if n is None]
                problems.append(f"{target!r} is fused from {slot} but lacks {lacking}")
            else:
                steps.append((tuple(slot), (target,)))
        return steps, problems

    def shapes(self, shapes: list[tuple], dtypes: list[str]) -> list[tuple[tuple, str]]:
        if len(set(dtypes)) > 1:
            raise ValueError(f"sources of different dtypes {dtypes}")
        first = shapes[0]
        if self.stack:
            if len(set(shapes)) > 1:
                raise ValueError(f"cannot stack shapes {shapes}")
            if not 0 <= self.axis <= len(first):
                raise ValueError(f"axis {self.axis} out of range for stacking {first}")
            joined = (*first[: self.axis], len(shapes), *first[self.axis :])
        else:
            if not 0 <= self.axis < len(first):
                raise ValueError(f"axis {self.axis} out of range for {first}")
            rest = {s[: self.axis] + s[self.axis + 1 :] for s in shapes}
            if len(rest) > 1 or len({len(s) for s in shapes}) > 1:
                raise ValueError(f"cannot concatenate shapes {shapes} along axis {self.axis}")
            joined = list(first)
            joined[self.axis] = sum(s[self.axis] for s in shapes)
        return [ops_shape(self.ops, tuple(joined), dtypes[0])]

    def run(self, arrays: list[tuple[np.ndarray, str]]) -> list[tuple[np.ndarray, str]]:
        join = np.stack if self.stack else np.concatenate
        return [run_ops(self.ops, join([a for a, _ in arrays], axis=self.axis), arrays[0][1])]


class Split(BaseModel):
    """Each name matching `source`, re-laid by `ops`, cut along `axis` into `targets`:
    by `sizes`, or in equal parts."""

    model_config = _FROZEN
    kind: Literal["split"] = "split"
    source: str
    targets: tuple[str, ...] = Field(min_length=1)
    axis: int = 0
    sizes: tuple[int, ...] | None = None
    ops: tuple[Op, ...] = ()

    def claims(self, names: Sequence[str]) -> tuple[list[tuple[tuple, tuple]], list[str]]:
        pattern, steps = re.compile(self.source), []
        for name in names:
            if m := pattern.fullmatch(name):
                steps.append(((name,), tuple(m.expand(t) for t in self.targets)))
        return steps, []

    def _sizes(self, length: int) -> tuple[int, ...]:
        if self.sizes is not None:
            if len(self.sizes) != len(self.targets) or sum(self.sizes) != length:
                raise ValueError(
                    f"sizes {self.sizes} do not cut {length} into {len(self.targets)} parts"
                )
            return self.sizes
        if length % len(self.targets):
            raise ValueError(f"{length} does not split into {len(self.targets)} equal parts")
        return (length // len(self.targets),) * len(self.targets)

    def shapes(self, shapes: list[tuple], dtypes: list[str]) -> list[tuple[tuple, str]]:
        shape, dtype = ops_shape(self.ops, shapes[0], dtypes[0])
        if not 0 <= self.axis < len(shape):
            raise ValueError(f"axis {self.axis} out of range for {shape}")
        return [
            ((*shape[: self.axis], n, *shape[self.axis + 1 :]), dtype)
            for n in self._sizes(shape[self.axis])
        ]

    def run(self, arrays: list[tuple[np.ndarray, str]]) -> list[tuple[np.ndarray, str]]:
        array, dtype = run_ops(self.ops, *arrays[0])
        cuts = np.cumsum(self._sizes(array.shape[self.axis]))[:-1]
        return [(part, dtype) for part in np.split(array, cuts, axis=self.axis)]


Rule = Annotated[Rename | Table | Fuse | Split, Field(discriminator="kind")]


# --- the mapping ----------------------------------------------------------------------------


class WeightMapping(BaseModel):
    """Rules from the trainer's names and layouts to the engine's. Every source name must be
    claimed by exactly one rule, and every engine name made exactly once (`check`)."""

    model_config = _FROZEN
    rules: tuple[Rule, ...]

    def plan(self, names: Sequence[str]) -> tuple[list[_Step], list[str]]:
        """The steps over `names` (in the order of each step's first source) and the naming
        problems: unclaimed, doubly claimed, half-fused sources; targets made twice."""
        problems: list[str] = []
        steps: list[_Step] = []
        claimed: dict[str, list[int]] = {}
        for i, rule in enumerate(self.rules):
            found, trouble = rule.claims(names)
            problems += [f"rule {i} ({rule.kind}): {p}" for p in trouble]
            for sources, targets in found:
                steps.append(_Step(rule=i, sources=sources, targets=targets))
                for s in sources:
                    claimed.setdefault(s, []).append(i)
        unmapped = [n for n in names if n not in claimed]
        if unmapped:
            problems.append(f"mapped by no rule: {unmapped}")
        doubly = {n: r for n, r in claimed.items() if len(r) > 1}
        if doubly:
            problems.append(
                "mapped twice: "
                + ", ".join(f"{n!r} (rules {r})" for n, r in sorted(doubly.items()))
            )
        made: dict[str, list[tuple[str, ...]]] = {}
        for step in steps:
            for t in step.targets:
                made.setdefault(t, []).append(step.sources)
        twice = {t: s for t, s in made.items() if len(s) > 1}
        if twice:
            problems.append(
                "engine names made twice: "
                + ", ".join(f"{t!r} (from {[list(s) for s in v]})" for t, v in twice.items())
            )
        order = {n: k for k, n in enumerate(names)}
        steps.sort(key=lambda s: order[s.sources[0]])
        return steps, problems

    def check(self, source: Manifest, engine: Manifest) -> None:
        """Raise WeightMismatchError listing every problem of mapping `source` onto `engine`
        (both name -> (shape, dtype)); nothing is read but names, shapes and dtypes."""
        steps, problems = self.plan(list(source))
        made: set[str] = set()
        for step in steps:
            made.update(step.targets)
            rule = self.rules[step.rule]
            try:
                outs = rule.shapes(
                    [tuple(source[s][0]) for s in step.sources],
                    [source[s][1] for s in step.sources],
                )
            except ValueError as e:
                problems.append(f"{list(step.targets)} from {list(step.sources)}: {e}")
                continue
            for target, (shape, dtype) in zip(step.targets, outs):
                if target not in engine:
                    continue  # listed once below
                want_shape, want_dtype = tuple(engine[target][0]), engine[target][1]
                if (tuple(shape), dtype) != (want_shape, want_dtype):
                    problems.append(
                        f"{target!r} from {list(step.sources)} comes out {dtype} {tuple(shape)}, "
                        f"the engine holds {want_dtype} {want_shape}"
                    )
        unknown = sorted(made - set(engine))
        if unknown:
            problems.append(f"made but not in the engine: {unknown}")
        missing = [n for n in engine if n not in made]
        if missing:
            problems.append(f"engine names made by nothing: {missing}")
        if problems:
            raise WeightMismatchError("weight mapping refused: " + "; ".join(problems))

    def apply(self, state: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
        """`(engine_name, tensor)` pairs, one rule application at a time (lazily; only its
        sources are read). Tensors: numpy arrays, or torch/paddle for bfloat16."""
        return iter(self.mapped(state).items())

    def mapped(self, state: Mapping[str, Any]) -> MappedState:
        """`state` as a read-only mapping of engine names, computed on access."""
        return MappedState(self, state)


def manifest_of(state: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of paddle, torch or numpy tensors, reading no data."""
    return {name: shape_and_dtype(t) for name, t in state.items()}


class CheckedMappings:
    """The mappings one fleet handle has checked: the engine's manifest is asked for once
    (on first use), each (mapping, source manifest) pair checked once, so a trainer pushing
    the same layout every step pays for the check on its first update only."""

    def __init__(self, engine_manifest: Callable[[], Manifest]):
        self._ask = engine_manifest
        self._engine: Manifest | None = None
        self._passed: set[tuple] = set()

    def mapped(self, weights: Any, mapping: WeightMapping) -> MappedState:
        """`weights` (a mapping or `(name, tensor)` pairs) mapped, after the check."""
        if not isinstance(weights, Mapping):
            try:
                weights = dict(weights)
            except (TypeError, ValueError):
                raise ConfigError(
                    "a weight mapping takes a mapping or (name, tensor) pairs, "
                    f"not a {type(weights).__name__}"
                ) from None
        source = manifest_of(weights)
        key = (mapping, tuple(source.items()))
        if key not in self._passed:
            if self._engine is None:
                self._engine = {n: (tuple(s), d) for n, (s, d) in self._ask().items()}
            mapping.check(source, self._engine)
            self._passed.add(key)
        return mapping.mapped(weights)


class MappedState(Mapping):
    """The engine-named view of a trainer's state: nothing is computed until asked for,
    and nothing computed is kept. `items()` and `values()` run each rule once (a split's
    targets come from one read of its source); `state[name]` runs the one rule making it."""

    def __init__(self, mapping: WeightMapping, state: Mapping[str, Any]):
        self.mapping, self.state = mapping, state
        self.steps, problems = mapping.plan(list(state))
        if problems:
            raise WeightMismatchError("weight mapping refused: " + "; ".join(problems))
        self._step_of = {t: step for step in self.steps for t in step.targets}

    def _run(self, step: _Step) -> list[tuple[np.ndarray, str]]:
        return self.mapping.rules[step.rule].run([to_host(self.state[s]) for s in step.sources])

    def __getitem__(self, name: str) -> Any:
        step = self._step_of[name]
        out = dict(zip(step.targets, self._run(step)))
        return _tensor(*out[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._step_of)

    def __len__(self) -> int:
        return len(self._step_of)

    def _pairs(self) -> Iterator[tuple[str, Any]]:
        for step in self.steps:
            for target, (array, dtype) in zip(step.targets, self._run(step)):
                yield target, _tensor(array, dtype)

    def items(self) -> ItemsView:
        return _Items(self)

    def values(self) -> ValuesView:
        return _Values(self)


class _Items(ItemsView):
    def __iter__(self):
        return self._mapping._pairs()


class _Values(ValuesView):
    def __iter__(self):
        return (t for _, t in self._mapping._pairs())


def _tensor(array: np.ndarray, dtype: str) -> Any:
    """A storage array as a tensor the update path reads back as `dtype`."""
    if dtype != "bfloat16":
        return array
    bits = np.ascontiguousarray(array)
    try:
        import torch

        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    except ImportError:
        import paddle

        return paddle.to_tensor(bits).view(paddle.bfloat16)
