"""The stages of `dsa-export build` as data (pipeline/stages.py) and the runner that executes them
(pipeline/runner.py), over options declared once (pipeline/options.py)."""

from __future__ import annotations

from typing import Callable

from dsa_export.pipeline.context import BuildContext, Layout
from dsa_export.pipeline.options import Options
from dsa_export.pipeline.runner import Interrupted, Runner, Stage
from dsa_export.pipeline.stages import PIPELINE

STAGE_NAMES = tuple(s.name for s in PIPELINE)


def run_build(options: Options, only: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run every stage (or `only` these) for `options`; return the manifest (also written to <out>/manifest.json)."""
    return Runner(PIPELINE, log).run(BuildContext(options, log), only)


__all__ = ["BuildContext", "Interrupted", "Layout", "Options", "PIPELINE", "Runner", "STAGE_NAMES", "Stage",
           "run_build"]
