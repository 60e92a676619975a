"""Writing outputs safely: checked output directories, atomic writes (temp file or directory beside the target, then
rename), so an interrupted run never leaves a half-written file that looks complete; and outputs readable as `cp`
would leave them (0644/0755 under the usual umask: the temp files Python creates are 0600/0700), so that a serving
account can read a whole build."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from dsa_export.errors import DSAExportError


def regular_file_inside(path: Path, directory: Path, what: str, error: type = DSAExportError) -> Path:
    """`path`, checked to be a regular file inside `directory`: no link or `..` out of it, no FIFO or device (a
    checkpoint names only its own files; reading a FIFO would hang)."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(directory).resolve()):
        raise error(f"{path}: {what} but outside {directory} (a link or `..` out of it)")
    if not resolved.exists():
        raise error(f"{path}: {what} but missing")
    if not resolved.is_file():
        raise error(f"{path}: {what} but not a regular file")
    return Path(path)


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


def write_atomic(path: str | Path, data: bytes | memoryview | str) -> None:
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


# ---- digests: what reuse checks -------------------------------------------------------------------------------------
DIGEST_CHUNK = 8 << 20
_KNOWN: dict[tuple, str] = {}  # (device, inode, size, mtime) → sha256, of files this process wrote or hashed


def stamp(path: Path) -> list[int]:
    """What changes whenever a file's contents may have: size, modification and change time, inode. The change time
    (ctime) cannot be set from user space: any write, copy or touch moves it."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _key(path: Path) -> tuple:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns  # a rename keeps these (it moves ctime)


def remember_digest(path: str | Path, sha256: str) -> None:
    """The sha256 of a file just written (computed as it was written): `digest` will not read it again."""
    _KNOWN[_key(Path(path))] = sha256


def digest(path: str | Path) -> str:
    """sha256 of a file's contents (read in chunks; once per process for a file that did not change)."""
    path = Path(path)
    key = _key(path)
    if key not in _KNOWN:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(DIGEST_CHUNK):
                h.update(chunk)
        _KNOWN[key] = h.hexdigest()
    return _KNOWN[key]


def tree_files(path: Path) -> list[Path]:
    """The regular files of an output (itself, or those under a directory), in order."""
    if path.is_dir() and not path.is_symlink():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return [path] if path.is_file() else []


@contextlib.contextmanager
def locked(directory: Path, what: str = "dsa-export run"):
    """Hold an exclusive lock on `directory` for the block (flock on the directory itself: no lock file is written
    into it); a second holder is refused with one line (it would write the same files)."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DSAExportError(f"{directory} is in use by another {what}: wait for it to finish, or use another "
                                 f"--out") from None
        yield
    finally:
        os.close(fd)  # releases the lock
