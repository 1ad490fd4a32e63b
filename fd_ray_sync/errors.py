"""One small exception hierarchy; every message names the rank, phase, parameter or file."""

from __future__ import annotations


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


class PhaseTimeout(WeightSyncError, TimeoutError):
    """A phase did not finish on every rank within its timeout."""


class RankFailed(WeightSyncError):
    """One or more ranks failed a phase.

    `failures` maps rank -> message; `errors` maps rank -> the exception it raised, where
    there was one (a rank that timed out or died has a message only).
    """

    def __init__(
        self,
        phase: str,
        failures: dict[int, str],
        errors: dict[int, BaseException] | None = None,
    ):
        self.phase = phase
        self.failures = dict(sorted(failures.items()))
        self.errors = dict(errors or {})
        lines = "; ".join(f"rank {r}: {msg}" for r, msg in self.failures.items())
        super().__init__(f"phase '{phase}' failed on rank(s) {list(self.failures)}: {lines}")

    def __reduce__(self):
        # Crosses Ray as itself: rebuild from the constructor's arguments, not the message.
        return (type(self), (self.phase, self.failures, self.errors))


# Raised by a rank before it writes a byte: the weights it had still stand.
REFUSED_BEFORE_WRITE = (WeightMismatchError, SnapshotError, VersionError)
