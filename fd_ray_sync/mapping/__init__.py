"""Name and layout mapping: what the trainer holds -> what the engine holds.

- `rules`: the mapping itself, as data (`WeightMapping` of `Rename`, `Table`, `Fuse`,
  `Split` rules), its checks and its lazy application (`MappedState`, `CheckedMappings`);
  its docstring shows the rules.
- `ops`: the layout operations a rule applies (`Reshape`, `Transpose`, `Cast`).
- `llama`: a ready mapping, Hugging Face Llama / Mixtral -> the reference engine
  (`llama_to_reference`).

Everything is importable from here, `from fd_ray_sync.mapping import llama_to_reference`.
"""

from fd_ray_sync.mapping.llama import llama_to_reference
from fd_ray_sync.mapping.ops import Cast, Op, Reshape, Transpose, cast
from fd_ray_sync.mapping.rules import (
    CheckedMappings,
    Fuse,
    Manifest,
    MappedState,
    Rename,
    Rule,
    Split,
    Table,
    WeightMapping,
    manifest_of,
)

__all__ = [
    "Cast",
    "CheckedMappings",
    "Fuse",
    "Manifest",
    "MappedState",
    "Op",
    "Rename",
    "Reshape",
    "Rule",
    "Split",
    "Table",
    "Transpose",
    "WeightMapping",
    "cast",
    "llama_to_reference",
    "manifest_of",
]
