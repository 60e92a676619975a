"""Writing outputs safely: checked output directories, atomic writes (temp file or directory beside the target, then
rename), so an interrupted run never leaves a half-written file that looks complete; and outputs readable as `cp`
would leave them (0644/0755 under the usual umask: the temp files Python creates are 0600/0700), so that a serving
account can read a whole build."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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


def default_mode(directory: bool = False) -> int:
    """The mode a new file (0666) or directory (0777) gets under the process umask, as `cp` or `mkdir` would."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def make_readable(root: Path) -> None:
    """Give `root` and everything in it the modes `cp` would (some writers, safetensors among them, create 0600)."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():  # a link has no mode of its own (and may point at what is not built yet)
            os.chmod(path, default_mode(directory=path.is_dir()))


def write_atomic(path: str | Path, data: bytes | str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary directory beside `path`; when the block completes it replaces `path` whole (the old
    one is removed after the swap); if the block fails or is interrupted, it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        make_readable(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
