"""Weight versions: validation, ordering and the `version.yaml` file (`step: <version>`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from fd_ray_sync.errors import VersionError

VERSION_FILE = "version.yaml"
# Versions end up in file names, logs and object names: keep them to a safe alphabet so one
# can never name a path outside its folder.
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_version(version: object) -> str:
    """`version` as a string, or VersionError if it is empty, too long or path-like."""
    if isinstance(version, bool) or not isinstance(version, (str, int)):
        raise VersionError(f"version must be a string or an int, got {type(version).__name__}")
    text = str(version)
    if not _VERSION_RE.fullmatch(text) or ".." in text:
        raise VersionError(
            f"invalid version {text!r}: use 1-128 characters of letters, digits, '.', '_' "
            "or '-', starting with a letter or digit, and no '..'"
        )
    return text


def _key(version: str) -> tuple:
    # Natural order: "step-10" sorts after "step-9"; plain integers compare as numbers.
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", version))


def is_newer(candidate: str, current: str | None) -> bool:
    """True when `candidate` sorts after `current` in natural order (or nothing is current)."""
    return current is None or _key(candidate) > _key(current)


def read_version_file(folder: str | os.PathLike) -> str:
    """The `step` of `folder/version.yaml`, with an error naming the file and what is wrong."""
    path = Path(folder) / VERSION_FILE
    try:
        with open(path, encoding="utf-8") as f:
            info = yaml.safe_load(f)
    except FileNotFoundError:
        raise VersionError(
            f"no version given and {path} does not exist: pass a version or write "
            f"'step: <version>' to {path}"
        ) from None
    except (OSError, yaml.YAMLError) as e:
        raise VersionError(f"cannot read {path}: {e}") from e
    if not isinstance(info, dict):
        raise VersionError(f"{path} is not a mapping (expected 'step: <version>')")
    if info.get("step") is None:
        raise VersionError(f"{path} has no 'step' field")
    return validate_version(info["step"])


def write_version_file(folder: str | os.PathLike, version: str) -> Path:
    """Write `folder/version.yaml` atomically."""
    path = Path(folder) / VERSION_FILE
    tmp = path.with_name(f".{VERSION_FILE}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump({"step": validate_version(version)}), encoding="utf-8")
    os.replace(tmp, path)
    return path
