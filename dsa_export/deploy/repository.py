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
dsa_generate calls dsa_engine where the build has an engine, else dsa_onnx (its `step_model` parameter). The models
read the export (model.onnx, io.json, config.json, tokenizer files, engine/model.plan) from the build directory by a
relative path, so the repository is served in place: mount the whole build directory.

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
from dsa_export.exporter.engine import PLAN
from dsa_export.exporter.graph_io import GraphIO, IOTensor
from dsa_export.files import atomic_dir, write_atomic

GENERATE, STEP_ONNX, STEP_ENGINE = "dsa_generate", "dsa_onnx", "dsa_engine"
DEPLOY_DIR = Path(__file__).resolve().parent
RUNTIME_DIR = DEPLOY_DIR.parent / "runtime"
# model → its model.py and the standalone modules it imports, copied beside it
PYTHON_MODELS = {
    GENERATE: (DEPLOY_DIR / "triton_generate.py", (DEPLOY_DIR / "generation.py",)),
    STEP_ONNX: (DEPLOY_DIR / "triton_step.py", (RUNTIME_DIR / "ort_graph.py",)),
    STEP_ENGINE: (DEPLOY_DIR / "triton_step.py", (RUNTIME_DIR / "trt_graph.py",)),
}
TRITON_DTYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "bfloat16": "TYPE_BF16", "int32": "TYPE_INT32"}
IDLE_SECONDS = 600  # a step model drops a sequence whose steps stopped this long ago (its client vanished)


def _tensors(message_type, tensors: list[IOTensor]):
    """io.json tensors as Triton's (named dims are -1)."""
    from tritonclient.grpc import model_config_pb2 as mc

    return [message_type(name=t.name, data_type=mc.DataType.Value(TRITON_DTYPES[t.dtype]),
                         dims=[d if isinstance(d, int) else -1 for d in t.dims]) for t in tensors]


def _parameters(**values: str) -> dict:
    from tritonclient.grpc import model_config_pb2 as mc

    return {k: mc.ModelParameter(string_value=str(v)) for k, v in values.items()}


def step_config(name: str, io: GraphIO, build_dir: str):
    """A step model: unbatched ([1, S] per request), one instance (each sequence's caches live in it); dsa_onnx on
    the CPU with ONNX Runtime, dsa_engine on GPU 0 with TensorRT."""
    from tritonclient.grpc import model_config_pb2 as mc

    engine = name == STEP_ENGINE
    kind = mc.ModelInstanceGroup.KIND_GPU if engine else mc.ModelInstanceGroup.KIND_CPU
    return mc.ModelConfig(
        name=name, backend="python", max_batch_size=0,
        input=_tensors(mc.ModelInput, list(io.inputs[:2])),
        output=_tensors(mc.ModelOutput, list(io.outputs[:1])),
        instance_group=[mc.ModelInstanceGroup(kind=kind, count=1, gpus=[0] if engine else [])],
        parameters=_parameters(build_dir=build_dir, runtime="tensorrt" if engine else "onnxruntime",
                               idle_seconds=str(IDLE_SECONDS)))


def generate_config(step_model: str, build_dir: str):
    from tritonclient.grpc import model_config_pb2 as mc

    from dsa_export.deploy.generation import GENERATE_INPUTS, GENERATE_OUTPUTS

    return mc.ModelConfig(
        name=GENERATE, backend="python", max_batch_size=0,
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        input=[mc.ModelInput(name=name, data_type=mc.DataType.Value(dtype), dims=dims, optional=optional)
               for name, (dtype, dims, optional) in GENERATE_INPUTS.items()],
        output=[mc.ModelOutput(name=name, data_type=mc.DataType.Value(dtype), dims=dims)
                for name, (dtype, dims, _) in GENERATE_OUTPUTS.items()],
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
        parameters=_parameters(step_model=step_model, build_dir=build_dir))


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


def step_model_of(repository: str | Path) -> str:
    """The step model the repository's generation model calls."""
    return read_config(Path(repository) / GENERATE / "config.pbtxt").parameters["step_model"].string_value


def write_repository(build_dir: str | Path, repository: str | Path | None = None) -> dict:
    """Write the model repository of the export in build_dir (default: build_dir/model_repository), atomically."""
    build_dir = Path(build_dir)
    repository = Path(repository) if repository is not None else build_dir / "model_repository"
    io = GraphIO.load(build_dir / "io.json")
    has_engine = (build_dir / "engine" / PLAN).is_file()
    step_model = STEP_ENGINE if has_engine else STEP_ONNX
    with atomic_dir(repository) as tmp:
        for name, (model_py, modules) in PYTHON_MODELS.items():
            # relative: the build directory moves (or is mounted) as a whole
            build_dir_param = os.path.relpath(build_dir.resolve(), (repository / name).resolve())
            config = generate_config(step_model, build_dir_param) if name == GENERATE else \
                step_config(name, io, build_dir_param)
            (tmp / name / "1").mkdir(parents=True)
            write_atomic(tmp / name / "config.pbtxt", config_text(config))
            shutil.copyfile(model_py, tmp / name / "1" / "model.py")
            for module in modules:
                shutil.copyfile(module, tmp / name / "1" / module.name)
    return {"path": str(repository), "models": sorted(PYTHON_MODELS), "step_model": step_model, "engine": has_engine}
