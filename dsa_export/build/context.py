"""What the steps of one build share: the options, the target GPU, the build directory (`BuildDir`), and what is read
from it once: the config, the checkpoint (its headers), the export (exporter/artifacts.py), the eager models, the
backends that run the export here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from dsa_export.build.options import Options
from dsa_export.targets import GPUTarget, get_target


@dataclass(frozen=True)
class BuildDir:
    """build/<target>/ (design.md): where every step writes. The export's own files are exporter/artifacts.py's."""
    root: Path

    MANIFEST = "manifest.json"

    @property
    def manifest(self) -> Path:
        return self.root / self.MANIFEST

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    def kernels(self, arch: str) -> Path:
        return self.root / "kernels" / arch

    @property
    def parity(self) -> Path:
        return self.root / "parity"

    @property
    def cost(self) -> Path:
        return self.root / "cost"

    @property
    def model_repository(self) -> Path:
        return self.root / "model_repository"

    def relative(self, path: Path) -> Path:
        return Path(path).relative_to(self.root)


@dataclass
class BuildContext:
    options: Options
    log: Callable[[str], None] = print
    _models: dict = field(default_factory=dict)
    _out: BuildDir | None = None  # where the running step writes (the runner's staging), if not the build itself

    @cached_property
    def target(self) -> GPUTarget:
        return get_target(self.options.gpu)

    @cached_property
    def build(self) -> BuildDir:
        return BuildDir(self.options.build_root)

    @property
    def out(self) -> BuildDir:
        """Where the running step writes its outputs: a staging directory of the run (the runner moves them into the
        build directory when the step has succeeded). Steps read from `build`."""
        return self._out or self.build

    def stage_into(self, staging: Path | None) -> None:
        self._out = None if staging is None else BuildDir(staging)

    def committed(self, step: str, staging: Path) -> None:
        """The runner moved a step's outputs from `staging` into the build directory: read them from there."""
        if step == "checkpoint":
            self.forget("checkpoint")
        elif step == "export" and "export" in self.__dict__:
            self.export = self.export.relocated(staging, self.build.root)
            self.forget("backends")

    def input_paths(self) -> list[Path]:
        """What the build reads that it does not write: the checkpoint it was given."""
        return [self.options.checkpoint] if self.options.checkpoint is not None else []

    @staticmethod
    def signalled() -> str | None:
        from dsa_export.errors import signal_received

        return signal_received()

    @property
    def checkpoint_dir(self) -> Path:
        """The checkpoint the build reads: the given one, or the one the checkpoint step writes from the preset."""
        return self.options.checkpoint if self.options.checkpoint is not None else self.build.checkpoint

    @cached_property
    def config(self):
        from dsa_export.models.presets import resolve_source

        config, _ = resolve_source(self.options.checkpoint if self.options.checkpoint is not None
                                   else self.options.preset)
        return config

    @cached_property
    def checkpoint(self):
        """The checkpoint, its headers read and checked once (models/checkpoint.py `open_checkpoint`)."""
        from dsa_export.models.checkpoint import open_checkpoint

        return open_checkpoint(self.checkpoint_dir)

    @cached_property
    def export(self):
        """The build's export (exporter/artifacts.py): what is on disk, or what the export step just wrote."""
        from dsa_export.exporter.artifacts import ExportDir

        return ExportDir(self.build.root)

    def forget(self, *names: str) -> None:
        """Drop what was read of the build directory (a step rewrote it)."""
        for name in names:
            self.__dict__.pop(name, None)

    @property
    def dtype(self):
        from dsa_export.formats import model_dtype_name, torch_dtype

        return torch_dtype(model_dtype_name(self.options.dtype))

    def model(self, dtype=None):
        """The eager model from the build's checkpoint, through the dsa:: ops; one per dtype."""
        dtype = dtype or self.dtype
        if dtype not in self._models:
            from dsa_export.kernels import use_custom_ops
            from dsa_export.models.checkpoint import load_checkpoint

            self._models[dtype] = use_custom_ops(load_checkpoint(self.checkpoint, dtype=dtype))
        return self._models[dtype]

    @cached_property
    def backends(self) -> list:
        """The export's backends this machine runs (runtime.available_backends), created once: parity and the
        measured cost use the same sessions."""
        from dsa_export.runtime import available_backends

        return available_backends(self.export, self.target, record_indexer=True, log=self.log,
                                  threads=self.options.threads)

    @property
    def engine_shapes(self):
        from dsa_export.exporter.plan import EngineShapes

        o = self.options
        return EngineShapes(max_batch=o.max_batch, max_tokens=o.max_tokens, pool_tokens=o.pool_tokens)

    def experts_fp8(self) -> bool:
        """The export keeps the routed experts FP8: the checkpoint stores them so (a preset not yet written: its
        config is FP8-quantised) and --dequantize-experts is not given."""
        if self.options.dequantize_experts:
            return False
        if self.options.checkpoint is not None or self.build.checkpoint.joinpath("config.json").is_file():
            return self.checkpoint.experts_fp8
        return self.config.fp8_block is not None

    def pipeline_plan(self):
        """The pipeline stages for the target's GPUs (exporter/plan.py); they may not fit."""
        from dsa_export.exporter.plan import plan_pipeline

        o = self.options
        return plan_pipeline(self.config, self.target, self.dtype, self.experts_fp8(), o.capacity, self.engine_shapes,
                             o.workspace_gb, o.gpus, o.gpus_per_node)

    @cached_property
    def plan(self):
        """`pipeline_plan`, refused (with the shortfall) if a stage cannot fit its GPU."""
        from dsa_export.exporter.plan import check_plan

        plan = self.pipeline_plan()
        check_plan(plan)
        return plan

    def required(self, step: str) -> bool:
        """A step the user demanded: not being able to run it here is an error, not a skip."""
        return step == "engine" and self.options.require_engine

    def tool_versions(self) -> dict:
        import onnx
        import torch
        import triton

        from dsa_export.runtime.backends import onnxruntime_module

        return {"torch": torch.__version__, "triton": triton.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime_module().__version__}

    def target_json(self) -> dict:
        return dataclasses.asdict(self.target)

    def inputs_json(self) -> dict:
        return {"checkpoint": str(self.checkpoint_dir),
                "source": f"preset '{self.options.preset}', seed {self.options.seed}"
                if self.options.checkpoint is None else "given"}
