"""The Triton Inference Server model repository of a build, generated from its io.json (never hand-typed I/O):

    model_repository/
      dsa_generate/  Python backend, decoupled: token ids or text in, one response per new token (TOKEN, INDEX,
                     TEXT); runs each sequence through a step model by BLS (triton_generate.py + generation.py)
      dsa_onnx/      Python backend, KIND_CPU: one step of the exported graph with ONNX Runtime (triton_step.py +
                     ort_graph.py)
      dsa_engine/    Python backend, KIND_GPU: one step of the TensorRT engine, run in process (triton_step.py +
                     trt_graph.py); needs the `tensorrt` and `torch` Python packages in the server's Python

The step models take io.json's inputs (input_ids, positions) and return its logits; each keeps the caches of its
sequences (by correlation id) between steps, on the host or on the GPU, and the caches never cross the wire.
dsa_generate calls dsa_engine where the build has an engine, else dsa_onnx (its `step_models` parameter). The models'
files come from serving/ (its SHIPPED table); they read the export (the graph, io.json, config.json, the tokenizer
files, the engine) from the build directory by relative paths their parameters give, so the repository is served in
place: mount the whole build directory.

A build cut into pipeline stages across GPUs (stage-0/, stage-1/, ...) gets one step model per stage and runtime:
dsa_onnx_0, dsa_onnx_1, ... and dsa_engine_0, ... (stage i on GPU i by its instance group), each holding the caches
of its own layers; dsa_generate chains them for every step (BLS), passing the hidden state [1, S, H] from one stage to
the next (the only tensor that crosses between GPUs: 14 KB per token at the 671B shapes in bf16).

Why the engine is not a `platform: "tensorrt_plan"` model with the sequence batcher's implicit state: Triton's
TensorRT backend binds every state input and output to buffers of its own, two different ones for a cache and its
output (it never asks the engine which outputs alias inputs), and copies each state into its buffer before a step
and back after it. The engine updates its caches in place (KVCacheUpdate, which requires the cache input and output
at one device address), so that binding is not guaranteed to keep the new rows, and even if it did, every step would
copy every cache twice at full capacity: about 2 x 11 GB per sequence per step at 128K tokens on the 671B shapes,
more than the step itself. BLS with device tensors adds a third copy. Run in process, each sequence's caches are
allocated once on the GPU and bound as both the input and the output of every step: no copies, as the engine needs.

Configs are built as `model_config_pb2.ModelConfig` messages (tritonclient's own schema) and written as text.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dsa_export.errors import DSAExportError
from dsa_export.exporter.artifacts import ExportDir, StageDir, as_export
from dsa_export.files import atomic_dir, write_atomic
from dsa_export.formats import of
from dsa_export.serving import shipped_files
from dsa_export.serving.io_spec import HIDDEN_IN, HIDDEN_OUT, GraphIO, IOTensor

GENERATE, STEP_ONNX, STEP_ENGINE = "dsa_generate", "dsa_onnx", "dsa_engine"
SHIPPED_KIND = {GENERATE: "generate", STEP_ONNX: "onnxruntime", STEP_ENGINE: "tensorrt"}  # serving.SHIPPED
IDLE_SECONDS = 600  # a step model drops a sequence whose steps stopped this long ago (its client vanished)


def _tensors(message_type, tensors: list[IOTensor]):
    """io.json tensors as Triton's (named dims are -1). The hidden state between pipeline stages crosses in float32
    whatever the export dtype (numpy, which the Python models use, has no bfloat16; the step model casts it)."""
    from tritonclient.grpc import model_config_pb2 as mc

    def dtype(t: IOTensor) -> str:
        return of("float32" if t.name in (HIDDEN_IN, HIDDEN_OUT) else t.dtype).server

    return [message_type(name=t.name, data_type=mc.DataType.Value(dtype(t)),
                         dims=[d if isinstance(d, int) else -1 for d in t.dims]) for t in tensors]


def _parameters(**values: str) -> dict:
    from tritonclient.grpc import model_config_pb2 as mc

    return {k: mc.ModelParameter(string_value=str(v)) for k, v in values.items()}


def step_config(name: str, runtime: str, io: GraphIO, files: dict[str, str], gpu: int = 0):
    """A step model: unbatched ([1, S] per request), one instance (each sequence's caches live in it); dsa_onnx on
    the CPU with ONNX Runtime, dsa_engine on GPU `gpu` with TensorRT. files: parameter → path relative to the model's
    directory (io_file, model_file; plan_file and engine_json for the engine)."""
    from tritonclient.grpc import model_config_pb2 as mc

    engine = runtime == STEP_ENGINE
    kind = mc.ModelInstanceGroup.KIND_GPU if engine else mc.ModelInstanceGroup.KIND_CPU
    return mc.ModelConfig(
        name=name, backend="python", max_batch_size=0,
        input=_tensors(mc.ModelInput, list(io.inputs[:2])),
        output=_tensors(mc.ModelOutput, list(io.outputs[:1])),
        instance_group=[mc.ModelInstanceGroup(kind=kind, count=1, gpus=[gpu] if engine else [])],
        parameters=_parameters(runtime="tensorrt" if engine else "onnxruntime", idle_seconds=str(IDLE_SECONDS),
                               **files))


def generate_config(step_models: list[str], files: dict[str, str]):
    """The generation model; files: io_file and config_file of the first stage, tokenizer_dir (relative paths)."""
    from tritonclient.grpc import model_config_pb2 as mc

    from dsa_export.serving.generation import GENERATE_INPUTS, GENERATE_OUTPUTS

    return mc.ModelConfig(
        name=GENERATE, backend="python", max_batch_size=0,
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        input=[mc.ModelInput(name=name, data_type=mc.DataType.Value(dtype), dims=dims, optional=optional)
               for name, (dtype, dims, optional) in GENERATE_INPUTS.items()],
        output=[mc.ModelOutput(name=name, data_type=mc.DataType.Value(dtype), dims=dims)
                for name, (dtype, dims, _) in GENERATE_OUTPUTS.items()],
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
        parameters=_parameters(step_models=",".join(step_models), **files))


def config_text(config) -> str:
    from google.protobuf import text_format

    return (f"# {config.name}: generated by `dsa-export deploy` from io.json; edit the build, not this file\n"
            + text_format.MessageToString(config))


def read_config(path: str | Path):
    """A config.pbtxt parsed with Triton's own schema (ValueError naming the file if it does not parse)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(Path(path).read_text(encoding="utf-8"), mc.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise DSAExportError(f"{path}: not a valid Triton model config ({e})") from None


def step_models_of(repository: str | Path) -> list[str]:
    """The step models the repository's generation model calls, one per pipeline stage."""
    config = read_config(Path(repository) / GENERATE / "config.pbtxt")
    return config.parameters["step_models"].string_value.split(",")


def step_model_names(runtime: str, stages: int) -> list[str]:
    return [runtime] if stages == 1 else [f"{runtime}_{i}" for i in range(stages)]


def write_repository(export: ExportDir | str | Path, repository: str | Path | None = None,
                     served_from: str | Path | None = None) -> dict:
    """Write the model repository of an export (default: <export root>/model_repository), atomically. served_from:
    where it will be served from, if it is written elsewhere first (the models find the export relative to that)."""
    export = as_export(export)
    repository = Path(repository) if repository is not None else export.root / "model_repository"
    location = Path(served_from) if served_from is not None else repository
    stages = export.stages
    has_engine = export.has_engines
    step_models = step_model_names(STEP_ENGINE if has_engine else STEP_ONNX, len(stages))

    def relative(path: Path, model: str) -> str:  # the build directory moves (or is mounted) as a whole
        return os.path.relpath(path.resolve(), (location / model).resolve())

    def stage_files(stage: StageDir, model: str, runtime: str) -> dict[str, str]:
        files = {"io_file": relative(stage.io_path, model), "model_file": relative(stage.model_path, model)}
        if runtime == STEP_ENGINE:
            files |= {"plan_file": relative(stage.plan_path, model),
                      "engine_json": relative(stage.engine_json_path, model)}
        return files

    # model name → (its kind, config)
    configs = {GENERATE: (GENERATE, generate_config(step_models, {
        "io_file": relative(stages[0].io_path, GENERATE), "config_file": relative(stages[0].config_path, GENERATE),
        "tokenizer_dir": relative(export.root, GENERATE)}))}
    for runtime in (STEP_ONNX, STEP_ENGINE):
        for gpu, (name, stage) in enumerate(zip(step_model_names(runtime, len(stages)), stages)):
            configs[name] = (runtime, step_config(name, runtime, stage.io, stage_files(stage, name, runtime), gpu))
    with atomic_dir(repository) as tmp:
        for name, (kind, config) in configs.items():
            (tmp / name / "1").mkdir(parents=True)
            write_atomic(tmp / name / "config.pbtxt", config_text(config))
            for source, target in shipped_files(SHIPPED_KIND[kind]):
                shutil.copyfile(source, tmp / name / "1" / target)
    steps = " -> ".join(step_models)
    note = f"dsa_generate steps by {steps}; serve: dsa-export serve {export.root}"
    if not has_engine and export.io.cache_dtype != "float32":
        note = (f"dsa_generate steps by {steps}, which runs float32 exports only: serve this {export.io.cache_dtype} "
                f"build on a GPU once its engine is built (then deploy again)")
    return {"path": str(repository), "models": sorted(configs), "step_models": step_models, "engine": has_engine,
            "stages": len(stages), "note": note}
