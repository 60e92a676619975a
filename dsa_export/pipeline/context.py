"""What the stages of one build share: the options, the target GPU, where everything goes (Layout), and the config
and eager models, loaded lazily and once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from dsa_export.models.config import DSAConfig, model_dtype
from dsa_export.pipeline.options import Options
from dsa_export.targets import GPUTarget, get_target

@dataclass(frozen=True)
class Layout:
    """build/<target>/ (design.md): every path a stage writes, relative to the build directory."""
    root: Path

    checkpoint = Path("checkpoint")
    onnx = ("model.onnx", "io.json", "config.json")  # + the external data files (exporter/weights.py)
    parity = Path("parity")
    cost = Path("cost")
    engine = Path("engine")
    model_repository = Path("model_repository")

    @staticmethod
    def kernels(arch: str) -> Path:
        return Path("kernels") / arch

    def __truediv__(self, relative) -> Path:
        return self.root / relative


@dataclass
class BuildContext:
    options: Options
    log: Callable[[str], None] = print
    _models: dict = field(default_factory=dict)

    @cached_property
    def target(self) -> GPUTarget:
        return get_target(self.options.gpu)

    @cached_property
    def layout(self) -> Layout:
        return Layout(Path(self.options.out) if self.options.out else Path("build") / self.target.name)

    @property
    def checkpoint_dir(self) -> Path:
        """The checkpoint the build reads: the given one, or the one the checkpoint stage writes from the preset."""
        return self.options.checkpoint if self.options.checkpoint is not None else self.layout / Layout.checkpoint

    @cached_property
    def config(self) -> DSAConfig:
        from dsa_export.models.presets import resolve_source

        config, _ = resolve_source(self.options.checkpoint if self.options.checkpoint is not None
                                   else self.options.preset)
        return config

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.options.dtype)

    def model(self, dtype: torch.dtype | None = None):
        """The eager model from the build's checkpoint, through the dsa:: ops; one per dtype."""
        dtype = dtype or self.dtype
        if dtype not in self._models:
            from dsa_export.kernels import use_custom_ops
            from dsa_export.models import load_checkpoint

            self._models[dtype] = use_custom_ops(load_checkpoint(self.checkpoint_dir, dtype=dtype))
        return self._models[dtype]

    @property
    def engine_shapes(self):
        from dsa_export.exporter.engine import EngineShapes

        o = self.options
        return EngineShapes(max_batch=o.max_batch, prefill_batch=o.prefill_batch, max_prefill=o.max_prefill)

    def experts_fp8(self) -> bool:
        """The export keeps the routed experts FP8: the checkpoint stores them so (a preset not yet written: its
        config is FP8-quantised) and --dequantize-experts is not given."""
        from dsa_export.models.checkpoint import open_checkpoint

        if self.options.dequantize_experts:
            return False
        if (self.checkpoint_dir / "config.json").is_file():
            return open_checkpoint(self.checkpoint_dir).experts_fp8
        return self.config.fp8_block is not None

    def pipeline_plan(self):
        """The pipeline stages for the target's GPUs (exporter/partition.py); they may not fit."""
        from dsa_export.exporter.partition import plan_pipeline

        o = self.options
        return plan_pipeline(self.config, self.target, self.dtype, self.experts_fp8(), o.capacity, self.engine_shapes,
                             o.workspace_gb, o.last_logits_only, o.gpus)

    @cached_property
    def plan(self):
        """`pipeline_plan`, refused (with the shortfall) if a stage cannot fit its GPU."""
        from dsa_export.exporter.partition import check_plan

        plan = self.pipeline_plan()
        check_plan(plan)
        return plan

    def stage_dirs(self) -> list[Path]:
        """Where the export's graphs are (the build directory, or one stage-*/ per GPU)."""
        from dsa_export.exporter.graph_io import stage_dirs

        return stage_dirs(self.layout.root)

    def required(self, stage: str) -> bool:
        """A stage the user demanded: not being able to run it here is an error, not a skip."""
        return stage == "engine" and self.options.require_engine

    def tool_versions(self) -> dict:
        import onnx
        import onnxruntime
        import triton

        return {"torch": torch.__version__, "triton": triton.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__}

    def target_json(self) -> dict:
        return dataclasses.asdict(self.target)

    def inputs_json(self) -> dict:
        return {"checkpoint": str(self.checkpoint_dir),
                "source": f"preset '{self.options.preset}', seed {self.options.seed}"
                if self.options.checkpoint is None else "given"}
