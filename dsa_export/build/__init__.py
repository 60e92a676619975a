"""`dsa-export build`: its steps as data (build/steps.py), the runner that executes them (build/runner.py), over options
declared once (build/options.py) and a context the steps share (build/context.py).

Importing this package imports no torch (the command line registers its commands from it): the steps import the rooms
they call when they run.
"""

from __future__ import annotations

from typing import Callable

from dsa_export.build.context import BuildContext, BuildDir
from dsa_export.build.options import Options
from dsa_export.build.runner import Runner, Step
from dsa_export.build.steps import STEPS

STEP_NAMES = tuple(s.name for s in STEPS)


def run_build(options: Options, only: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every step (or `only` these) for `options`; return the manifest (also written to <out>/manifest.json)."""
    return Runner(STEPS, log).run(BuildContext(options, log), only)


__all__ = ["BuildContext", "BuildDir", "Options", "Runner", "STEPS", "STEP_NAMES", "Step", "run_build"]
