"""Progress of long steps (loading and writing weights, compiling kernels, tracing, parity): tqdm bars on stderr on
a terminal; elsewhere (a CI log, a pipe) plain lines on stdout, beside the steps' own lines, once something has run
for PROGRESS_SECONDS and then every PROGRESS_SECONDS, so that an hour-long export is never a silent log while short
steps stay quiet (stderr keeps only errors). `dsa-export -q` turns it off."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
import time
from typing import Iterator

# seconds between two plain lines when stderr is not a terminal (an environment variable changes it: tests)
PROGRESS_SECONDS = float(os.environ.get("DSA_EXPORT_PROGRESS_SECONDS", "30"))
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


class _Lines(io.TextIOBase):
    """What tqdm draws with carriage returns, as one plain line per update."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm progress bar (kwargs: tqdm's: desc, total, unit, unit_scale ...): drawn on a terminal, plain lines
    elsewhere, nothing when quiet or not `enabled`."""
    from tqdm import tqdm

    if _quiet or not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, leave=False, **kwargs)
    return tqdm(iterable, file=_Lines(sys.stdout), delay=PROGRESS_SECONDS, mininterval=PROGRESS_SECONDS,
                maxinterval=PROGRESS_SECONDS, ncols=100, ascii=True, **kwargs)


@contextlib.contextmanager
def heartbeat(what: str) -> Iterator[None]:
    """For a long call that reports nothing itself (tracing a graph): a line every PROGRESS_SECONDS saying it is
    still running and for how long."""
    if _quiet:
        yield
        return
    done = threading.Event()
    started = time.monotonic()

    stream = sys.stderr if sys.stderr.isatty() else sys.stdout

    def beat() -> None:
        while not done.wait(PROGRESS_SECONDS):
            stream.write(f"{what} ... {time.monotonic() - started:.0f} s\n")
            stream.flush()

    thread = threading.Thread(target=beat, daemon=True, name="dsa-progress")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
