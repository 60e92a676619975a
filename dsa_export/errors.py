"""The one exception type for bad user input (config, checkpoint, options).

The CLI turns it into a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""


class DSAExportError(Exception):
    """A problem with what the user gave us, stated in one line."""


class CheckFailure(Exception):
    """A result check failed (a parity threshold, the build's smoke check): not bad input, so the CLI exits 1
    and names what failed."""
