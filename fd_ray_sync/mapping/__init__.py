"""Name and layout mapping: what the trainer holds -> what the engine holds.

- `rules`: the mapping itself, as data (`WeightMapping` of `Rename`, `Table`, `Fuse`,
  `Split` rules with `Reshape`, `Transpose`, `Cast` ops), its checks and its lazy
  application (`MappedState`, `CheckedMappings`); its docstring shows the rules.
- `llama`: a ready mapping, Hugging Face Llama / Mixtral -> the reference engine
  (`llama_to_reference`).

Everything is importable from here, `from fd_ray_sync.mapping import llama_to_reference`.
"""

from fd_ray_sync.mapping.llama import llama_to_reference
from fd_ray_sync.mapping.rules import (
    Cast,
    CheckedMappings,
    Fuse,
    Manifest,
    MappedState,
    Op,
    Rename,
    Reshape,
    Rule,
    Split,
    Table,
    Transpose,
    WeightMapping,
    cast,
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
