"""The one exception type for bad user input (config, checkpoint, options).

The CLI turns it into a one-line message and exit code 2; anything else is a bug and keeps its traceback.
"""


class DSAExportError(Exception):
    """A problem with what the user gave us, stated in one line."""
