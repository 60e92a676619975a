"""Writing outputs safely: checked output directories, and atomic writes (temp file beside it, then rename), so an
interrupted run never leaves a half-written file that looks complete."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from dsa_export.errors import DSAExportError


def ensure_output_dir(path: str | Path) -> Path:
    """Create `path` if needed; one-line error if it is a file, cannot be created or is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DSAExportError(f"{path}: output path exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DSAExportError(f"{path}: cannot create output directory ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise DSAExportError(f"{path}: output directory is not writable")
    return path


def write_atomic(path: str | Path, data: bytes | str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
