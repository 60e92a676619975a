"""The exception types for bad input, failed checks and interruptions.

DSAExportError is what the user gave us being wrong (config, checkpoint, options, arguments), stated in one line. It
is a ValueError, so the Python API raises ValueErrors; the CLI turns it into one line on stderr and exit code 2.
Anything else escaping is a bug and keeps its traceback.
"""

import contextlib


class DSAExportError(ValueError):
    """A problem with what the user gave us, stated in one line."""


class CheckFailure(Exception):
    """A result check failed (a parity threshold, the build's smoke check): not bad input, so the CLI exits 1
    and names what failed."""


class Interrupted(BaseException):
    """The run was stopped by a signal (SIGTERM; SIGINT arrives as KeyboardInterrupt)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


_signals: list[str] = []  # the signals this process received (the command line's handlers note them)


def note_signal(name: str) -> None:
    _signals.append(name)


def forget_signals() -> None:
    """A new command starts (the CLI's main, called again in one process): no signal of an earlier one counts."""
    _signals.clear()


def signal_received() -> str | None:
    """The first signal this process received, if any: an exception raised while one was being handled (a library
    that failed half-way through) is reported as the interruption it is, not as a failure."""
    return _signals[0] if _signals else None


_deferring = [0]  # nesting depth of signals_deferred


def deferring() -> bool:
    """Whether a signal now is to be noted only (the command line's handlers ask)."""
    return _deferring[0] > 0


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM noted but not raised while the body runs, then raised as Interrupted the moment it ends: for
    library code that must not be cut by a Python exception (torch aborts the process from C++ when one unwinds its
    fake-tensor mode stack; matplotlib catches whatever stops its 3D toolkit's import and carries on half-imported).
    A mask would not do: Python runs its handlers in the main thread whichever thread the signal reached."""
    _deferring[0] += 1
    try:
        yield
    finally:
        _deferring[0] -= 1
    if not deferring() and _signals:
        raise Interrupted(_signals[0])
