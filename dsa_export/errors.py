"""The exception types for bad input, failed checks and interruptions.

DSAExportError is what the user gave us being wrong (config, checkpoint, options, arguments), stated in one line. It
is a ValueError, so the Python API raises ValueErrors; the CLI turns it into one line on stderr and exit code 2.
Anything else escaping is a bug and keeps its traceback.
"""

import contextlib
import signal
import threading


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


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM held while the body runs, delivered the moment it ends: for an import that must not be cut
    in half (matplotlib catches whatever stops its 3D toolkit's import, warns and carries on half-imported)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

