"""One small exception hierarchy; every message names the rank, phase, parameter or file."""

from __future__ import annotations

from collections.abc import Iterable


class WeightSyncError(Exception):
    """Base of every error fd-ray-sync raises on purpose."""


class ConfigError(WeightSyncError, ValueError):
    """A configuration value is invalid."""


class WeightMismatchError(WeightSyncError, ValueError):
    """Incoming weights do not fit the model: names, shapes, dtypes or values."""


class ChecksumError(WeightMismatchError):
    """A bucket or tensor's bytes do not hash to the checksum sent with them."""


class SnapshotError(WeightSyncError):
    """A snapshot folder, file or version.yaml is missing, malformed or unsafe."""


class VersionError(WeightSyncError, ValueError):
    """A weight version is missing, malformed or not newer than the current one."""


class VerificationError(WeightSyncError, RuntimeError):
    """Parameters are not in the state a phase promised (initialized or cleared)."""


class StateError(WeightSyncError, RuntimeError):
    """An operation was asked for in a state that does not allow it."""


class PartialUpdateError(WeightSyncError, RuntimeError):
    """An update failed after it had started writing: this rank now holds mixed weights."""


class RestoreError(WeightSyncError, RuntimeError):
    """The committed version could not be put back as it was committed (its source is gone,
    changed, or was never kept): that replica stays down until the next update."""


class RequestAborted(WeightSyncError, RuntimeError):
    """A generation request was dropped by a pause in mode abort (an update, or a user's
    pause): nothing was answered for it; send it again."""


class RankFailed(WeightSyncError):
    """One or more ranks failed a phase.

    `failures` maps rank -> message; `errors` maps rank -> the exception it raised, where
    there was one; `lost` holds the ranks that died or did not answer in time (their
    replica must be rebuilt before it serves again).
    """

    def __init__(
        self,
        phase: str,
        failures: dict[int, str],
        errors: dict[int, BaseException] | None = None,
        lost: Iterable[int] = (),
    ):
        self.phase = phase
        self.failures = dict(sorted(failures.items()))
        self.errors = dict(errors or {})
        self.lost = frozenset(lost)
        lines = "; ".join(f"rank {r}: {msg}" for r, msg in self.failures.items())
        super().__init__(f"phase '{phase}' failed on rank(s) {list(self.failures)}: {lines}")

    def __reduce__(self):
        # Crosses Ray as itself: rebuild from the constructor's arguments, not the message.
        return (type(self), (self.phase, self.failures, self.errors, self.lost))


class PhaseTimeout(RankFailed, TimeoutError):
    """A phase did not finish on every rank within its timeout (the slow ranks are `lost`)."""
