"""An in-process state dict (or a stream of `(name, tensor)` pairs) as a weight source."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from fd_ray_sync.checksum import digest
from fd_ray_sync.errors import ChecksumError, WeightMismatchError
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.sources.base import Chunk, WeightSource
from fd_ray_sync.tensors import to_host


class StateDictSource(WeightSource):
    """Tensors already in this process (paddle, torch or numpy), cut to this rank's slice.

    A stream of pairs is drained into host memory first: every name, shape and dtype must be
    known before the first write (FastDeploy's `update_weights_by_rdma` does the same).
    `checksums` maps name -> `fd_ray_sync.checksum.digest` of the tensor, checked by
    `verify()`.
    """

    name = "state_dict"

    def __init__(
        self,
        tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
        checksums: Mapping[str, int] | None = None,
        label: str = "state_dict",
    ):
        pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
        self._chunk: Chunk = {}
        for name, tensor in pairs:
            if name in self._chunk:
                raise WeightMismatchError(f"parameter {name!r} appears twice in the update")
            self._chunk[name] = to_host(tensor)
        self._checksums = dict(checksums or {})
        self._label = label

    def manifest(self) -> dict[str, TensorMeta]:
        return {
            n: TensorMeta(
                name=n, shape=a.shape, dtype=d, nbytes=a.nbytes, checksum=self._checksums.get(n)
            )
            for n, (a, d) in self._chunk.items()
        }

    def verify(self) -> None:
        for name, want in self._checksums.items():
            if name not in self._chunk:
                raise ChecksumError(f"checksum given for {name!r}, which is not in the update")
            if digest(self._chunk[name][0]) != want:
                raise ChecksumError(f"parameter {name!r} does not match its checksum")

    def chunks(self) -> Iterator[tuple[str, Chunk]]:
        yield self._label, self._chunk
