"""The export on disk, and its one owner: the only place the file names of an export exist.

    <root>/                     one graph (a single pipeline stage) ...
      model.onnx                the graph; its weights in external data files beside it
      model.onnx.data[.1 ...]   bounded data files (exporter/weights.py writes them)
      io.json, config.json      graph I/O (serving/io_spec.py) and the exported model's HF config
      engine/                   model.plan, engine.json, timing.cache: the TensorRT engine, where one was built
      tokenizer.json, ...       the checkpoint's tokenizer files (serving reads the export only)
    <root>/stage-0/, stage-1/   ... or one such directory per pipeline stage (a model cut across GPUs)

`StageDir` is one graph's directory, `ExportDir` the export (its stages in layer order). Each parses what it reads
once (io.json, config.json, the weightless graph, engine.json) and the rest of the package passes these objects
instead of paths: nothing else spells a file name of the export.
"""

from __future__ import annotations

import json
import shutil
from functools import cached_property
from pathlib import Path

from dsa_export.errors import DSAExportError
from dsa_export.serving.io_spec import GraphIO

MODEL, IO, CONFIG, DATA = "model.onnx", "io.json", "config.json", "model.onnx.data"
ENGINE_DIR, PLAN, ENGINE_JSON, TIMING_CACHE = "engine", "model.plan", "engine.json", "timing.cache"
STAGE_PREFIX = "stage-"


def data_file_name(index: int) -> str:
    """model.onnx.data, model.onnx.data.1, ..."""
    return DATA if index == 0 else f"{DATA}.{index}"


class StageDir:
    """One exported graph: its files, and what they hold, each read once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"StageDir({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, StageDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # ---- where things are ------------------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        return self.path / MODEL

    @property
    def io_path(self) -> Path:
        return self.path / IO

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def engine_dir(self) -> Path:
        return self.path / ENGINE_DIR

    @property
    def plan_path(self) -> Path:
        return self.engine_dir / PLAN

    @property
    def engine_json_path(self) -> Path:
        return self.engine_dir / ENGINE_JSON

    @property
    def timing_cache_path(self) -> Path:
        return self.engine_dir / TIMING_CACHE

    def data_files(self) -> list[Path]:
        """The external data files, in order."""
        files, i = [], 0
        while (self.path / data_file_name(i)).exists():
            files.append(self.path / data_file_name(i))
            i += 1
        return files

    def files(self) -> list[Path]:
        """Every file of the graph (the engine apart): what reusing it needs."""
        return [self.model_path, self.io_path, self.config_path, *self.data_files()]

    def exists(self) -> bool:
        return self.model_path.is_file() and self.io_path.is_file()

    @property
    def has_engine(self) -> bool:
        return self.plan_path.is_file() and self.engine_json_path.is_file()

    # ---- what they hold (parsed once) -------------------------------------------------------------------------------
    @cached_property
    def io(self) -> GraphIO:
        try:
            return GraphIO.load(self.io_path)
        except ValueError as e:
            raise DSAExportError(str(e)) from None

    @cached_property
    def config(self):
        from dsa_export.models.config import load_config

        return load_config(self.config_path)

    @cached_property
    def graph(self):
        """model.onnx without its weights; one line naming the file if it does not parse."""
        import onnx

        try:
            return onnx.load(self.model_path, load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise DSAExportError(f"{self.model_path}: not a readable ONNX file ({type(e).__name__})") from None

    @cached_property
    def engine_record(self) -> dict:
        """engine.json: what the engine was built with (TensorRT version, profiles, shapes)."""
        try:
            return json.loads(self.engine_json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DSAExportError(f"{self.engine_json_path}: unreadable ({e}); run `dsa-export engine` again") from None

    @cached_property
    def tensorrt_graph(self):
        """The graph an engine is built from: `graph` with each LightningIndexer as its two TensorRT halves
        (plugins/onnx_ops.split_indexer)."""
        from dsa_export.plugins.onnx_ops import split_indexer

        return split_indexer(self.graph)

    def dsa_nodes(self) -> dict[str, str]:
        """ONNX node name → op type of every dsa:: node TensorRT parses (the layers that must become plugins)."""
        return {n.name: n.op_type for n in self.tensorrt_graph.graph.node if n.domain == "dsa"}

    def check(self, config=None) -> GraphIO:
        """A readable export of dsa-export, checked without loading its weights: io.json and config.json parse (and
        match `config` if given), model.onnx parses, every external tensor lies inside its data file (a truncated
        data file is caught here), graph and io.json agree on the inputs. One line naming the problem otherwise."""
        import onnx

        if not self.exists():
            raise DSAExportError(f"{self.path}: no exported model ({MODEL} + {IO}); run `dsa-export export` first")
        io = self.io
        if config is not None:
            ours, theirs = config.to_hf_dict(), self.config.to_hf_dict()
            differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
            if differ:
                raise DSAExportError(f"{self.path} was exported from a different model: "
                                     + ", ".join(f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in differ[:3]))
        else:
            self.config  # noqa: B018  (it must parse)
        for tensor in self.graph.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            where = {e.key: e.value for e in tensor.external_data}
            data = self.path / where.get("location", "")
            end = int(where.get("offset", 0)) + int(where.get("length", 0))
            if not data.is_file() or data.stat().st_size < end:
                raise DSAExportError(f"{data}: missing or truncated (tensor '{tensor.name}' ends at byte {end:,}); "
                                     f"re-run the export")
        from dsa_export.exporter.checks import check_io

        try:  # names, order, dtypes and dims (the capacity among them)
            check_io(self.graph.graph, io)
        except DSAExportError as e:
            raise DSAExportError(f"{self.io_path} does not describe {self.model_path.name} ({e}); re-run the "
                                 f"export") from None
        return io


class ExportDir:
    """An export: one graph at `root`, or one per pipeline stage in root/stage-i/, in layer order."""

    def __init__(self, root: str | Path, stages: list[StageDir] | None = None):
        self.root = Path(root)
        if stages is not None:
            self.__dict__["stages"] = stages

    def __repr__(self) -> str:
        return f"ExportDir({str(self.root)!r})"

    @staticmethod
    def stage_path(root: str | Path, stage: int, stages: int) -> Path:
        """Where pipeline stage `stage` of `stages` is exported: the root itself for a single stage."""
        return Path(root) if stages == 1 else Path(root) / f"{STAGE_PREFIX}{stage}"

    @cached_property
    def stages(self) -> list[StageDir]:
        """[root] for one graph (or none yet), else its stage-*/ directories."""
        if (self.root / MODEL).exists() or not (self.root / f"{STAGE_PREFIX}0").is_dir():
            return [StageDir(self.root)]
        dirs, i = [], 0
        while (self.root / f"{STAGE_PREFIX}{i}").is_dir():
            dirs.append(StageDir(self.root / f"{STAGE_PREFIX}{i}"))
            i += 1
        return dirs

    @property
    def first(self) -> StageDir:
        return self.stages[0]

    @property
    def last(self) -> StageDir:
        return self.stages[-1]

    @property
    def io(self) -> GraphIO:
        """The first stage's I/O (capacity, cache dtype, vocabulary are the same in every stage)."""
        return self.first.io

    def exists(self) -> bool:
        return self.first.exists()

    @property
    def has_engines(self) -> bool:
        return self.exists() and all(stage.has_engine for stage in self.stages)

    def files(self) -> list[Path]:
        """Every file of every stage's graph: what reusing the export needs."""
        return [f for stage in self.stages for f in stage.files()]

    def check(self, config=None) -> list[GraphIO]:
        """StageDir.check for every stage, and the stages run the model's layers in order, each once."""
        ios = [stage.check(config) for stage in self.stages]
        start = 0
        for stage, io in zip(self.stages, ios):
            if io.layers[0] != start or io.capacity != ios[0].capacity or io.cache_dtype != ios[0].cache_dtype:
                raise DSAExportError(f"{stage.path}: layers {io.layers[0]}:{io.layers[1]} (capacity {io.capacity}, "
                                     f"{io.cache_dtype}) do not continue the stages before it; re-run the export")
            start = io.layers[1]
        if start != ios[-1].model_layers:
            raise DSAExportError(f"{self.root}: the stages end at layer {start} of {ios[-1].model_layers}; re-run "
                                 f"the export")
        return ios

    def relocated(self, old_root: Path, new_root: Path) -> "ExportDir":
        """The same export moved from old_root to new_root (by the build's runner), what was read of it kept."""
        stages = []
        for stage in self.stages:
            moved = StageDir(Path(new_root) / stage.path.relative_to(old_root))
            moved.__dict__.update((k, v) for k, v in stage.__dict__.items() if k != "path")
            stages.append(moved)
        return ExportDir(new_root, stages)

    def prepare(self, stages: int) -> None:
        """Before exporting `stages` pipeline stages into root: remove what an export into other stages left there (a
        single graph at the root, or stage-*/ directories beyond these), so that no old graph is taken for the new."""
        root = self.root
        if stages > 1:
            (root / MODEL).unlink(missing_ok=True)  # first: without it, the rest is no export
            for path in [*StageDir(root).data_files(), root / IO, root / CONFIG]:
                path.unlink(missing_ok=True)
        stage = stages if stages > 1 else 0
        while (root / f"{STAGE_PREFIX}{stage}").is_dir():
            shutil.rmtree(root / f"{STAGE_PREFIX}{stage}")
            stage += 1
        self.__dict__.pop("stages", None)


def as_export(export: ExportDir | str | Path) -> ExportDir:
    """An ExportDir from itself or from its root directory (the Python API takes either)."""
    return export if isinstance(export, ExportDir) else ExportDir(export)
