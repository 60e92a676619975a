"""The Triton Inference Server model repository of a build, generated from its io.json (never hand-typed I/O):

    model_repository/
      dsa_generate/  Python backend, decoupled: token ids or text in, one response per new token (TOKEN, INDEX,
                     TEXT, LOGPROB), many requests at once (triton_generate.py + scheduler.py + generation.py)
      dsa_stage_<i>/ a build on several nodes: stage i, on node n > 0 (serving/triton_stage.py), stepped by the first
                     node's dsa_generate over gRPC

The model runs the export's graphs itself, in process, one per pipeline stage in layer order: the TensorRT engines
where the build has them (stage i on GPU i; the `tensorrt` and `torch` Python packages in the server's Python), else
the ONNX graphs with ONNX Runtime on the CPU (a float32 build). Its scheduler batches every running request into each
step over paged cache pools allocated once at load (serving/scheduler.py); its parameters size them: max_batch
sequences and max_tokens tokens per step, pool_tokens cache rows per stage (an engine's, as it was built: its profile
and pool are fixed). The files come from serving/ (its SHIPPED table); the model reads the export (graphs, io.json,
config.json, the tokenizer files, the engines) from the build directory by the relative paths its parameters give, so
the repository is served in place: mount the whole build directory.

Why the graphs are not models of their own (a `tensorrt_plan` or step model called by BLS): a step of a batch needs
the block tables of its sequences and writes their rows into pools that must stay where they are between steps.
Triton's TensorRT backend binds a state input and its output to two buffers of its own and copies the state around
every step (it never asks the engine which outputs alias inputs): about 2 x 11 GB per step at 128K tokens on the 671B
shapes, and the in-place write of dsa::WriteCache would not even land. A step model reachable by clients would also let
a client step another client's sequence. Run in process, the pools are allocated once and bound as both the input and
the output of every step, and no client can name anything but its own request.

Configs are built as `model_config_pb2.ModelConfig` messages (tritonclient's own schema) and written as text.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from dsa_export.errors import DSAExportError
from dsa_export.exporter.artifacts import ExportDir, as_export
from dsa_export.exporter.plan import EngineShapes
from dsa_export.files import atomic_dir, write_atomic
from dsa_export.plugins.onnx_ops import onnxruntime_cpu_graph
from dsa_export.serving import shipped_files
from dsa_export.serving.io_spec import BLOCK_TABLES, HIDDEN_OUT, LOGPROBS, NEXT_TOKENS
from dsa_export.serving.stages import KEY_FILE, stage_model

GENERATE = "dsa_generate"
CPU_GRAPH = "stage_{}.cpu.onnx"  # stage i as ONNX Runtime runs it on the CPU, beside the config of its model
MAX_WAITING = 256  # requests queued for cache blocks (or the tokenizer) before more are refused as busy
DRAIN_SECONDS = 60  # on shutdown, running requests finish for up to this long


def _parameters(**values) -> dict:
    from tritonclient.grpc import model_config_pb2 as mc

    return {k: mc.ModelParameter(string_value=str(v)) for k, v in values.items()}


def generate_config(parameters: dict):
    """The generation model: decoupled, one instance (it holds the pools and runs every request's steps), on the
    host as far as Triton knows (it places the stages on the GPUs itself)."""
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
        parameters=_parameters(**parameters))


def stage_config(name: str, io, parameters: dict):
    """A stage on a node after the first (serving/triton_stage.py): one instance that holds the stage's pools and
    runs the steps the first node's scheduler sends, in order; its inputs and outputs are the graph's step tensors
    (io.json's), the epoch beside them."""
    from tritonclient.grpc import model_config_pb2 as mc

    from dsa_export.serving.stages import EPOCH, TRITON_DTYPES

    def dims(tensor):  # block tables come without the blocks no sequence has reached (stages.wire_block_tables)
        return [-1, -1] if tensor.name == BLOCK_TABLES else [d if isinstance(d, int) else -1 for d in tensor.dims]

    wanted = json.loads(parameters["outputs"])
    return mc.ModelConfig(
        name=name, backend="python", max_batch_size=0,
        input=[mc.ModelInput(name=t.name, data_type=mc.DataType.Value(f"TYPE_{TRITON_DTYPES[t.dtype]}"), dims=dims(t))
               for t in io.step_inputs],
        output=[mc.ModelOutput(name=t.name, data_type=mc.DataType.Value(f"TYPE_{TRITON_DTYPES[t.dtype]}"),
                               dims=dims(t)) for t in io.step_outputs if t.name in wanted]
        + [mc.ModelOutput(name=EPOCH, data_type=mc.DataType.TYPE_INT64, dims=[1])],
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
        parameters=_parameters(**parameters))


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


def serving_parameters(repository: str | Path) -> dict[str, str]:
    """The generation model's parameters (runtime, stages, max_batch, ...) as written by write_repository."""
    config = read_config(Path(repository) / GENERATE / "config.pbtxt")
    return {k: v.string_value for k, v in config.parameters.items()}


def serving_shapes(export: ExportDir, shapes: EngineShapes | None = None) -> EngineShapes:
    """What the server batches and how large its pools are: the engines' (their profile and pool are built in),
    else `shapes` (the build's options), else the defaults."""
    if export.has_engines:
        recorded = export.first.engine_record.get("shapes")
        if recorded:
            return EngineShapes(**recorded)
    return shapes or EngineShapes()


def write_repository(export: ExportDir | str | Path, repository: str | Path | None = None,
                     served_from: str | Path | None = None, shapes: EngineShapes | None = None,
                     gpus_per_node: int | None = None) -> dict:
    """Write the model repository of an export (default: <export root>/model_repository), atomically. served_from:
    where it will be served from, if it is written elsewhere first (the model finds the export relative to that);
    shapes: the steps and pool to serve with (serving_shapes); gpus_per_node: the stages go to nodes in order, this
    many to a node (default: all on one). A build on several nodes gets one repository for all of them: the first
    node's server loads dsa_generate (its stages run in process), node n's loads the dsa_stage_<i> of its stages
    (`dsa-export serve --node n`); a key drawn here (KEY_FILE beside each config) lets only that scheduler step
    those models."""
    export = as_export(export)
    repository = Path(repository) if repository is not None else export.root / "model_repository"
    location = Path(served_from) if served_from is not None else repository
    engine = export.has_engines
    shapes = serving_shapes(export, shapes)
    capacity = export.io.capacity
    per_node = gpus_per_node or len(export.stages)

    def relative(path: Path) -> str:  # the build directory moves (or is mounted) as a whole; every model directory
        return os.path.relpath(path.resolve(), (location / GENERATE).resolve())  # is a sibling of dsa_generate's

    key = secrets.token_hex(16)
    stages, stage_models, cpu_graphs = [], {}, {}
    for index, stage in enumerate(export.stages):
        node, gpu = divmod(index, per_node)
        files = {"io_file": relative(stage.io_path), "model_file": relative(stage.model_path)}
        if engine:
            files |= {"plan_file": relative(stage.plan_path), "engine_json": relative(stage.engine_json_path)}
        else:  # the graph as ONNX Runtime runs it on the CPU (no weights: they stay beside model_file)
            model, file = GENERATE if node == 0 else stage_model(index), CPU_GRAPH.format(index)
            cpu_graphs.setdefault(model, {})[file] = onnxruntime_cpu_graph(stage.graph).SerializeToString()
            files["cpu_graph"] = f"../{model}/{file}"  # the model directories are siblings
        if node == 0:
            stages.append({**files, "gpu": gpu})
            continue
        stages.append({"io_file": files["io_file"], "node": node, "gpu": gpu})
        outputs = [NEXT_TOKENS, LOGPROBS] if stage.io.last else [HIDDEN_OUT]
        stage_models[stage_model(index)] = stage_config(stage_model(index), stage.io, {
            "runtime": "tensorrt" if engine else "onnxruntime", "stage": json.dumps(files), "gpu": gpu,
            "pool_tokens": shapes.pool_rows(capacity), "outputs": json.dumps(outputs)})
    parameters = {"runtime": "tensorrt" if engine else "onnxruntime", "stages": json.dumps(stages),
                  "config_file": relative(export.stages[0].config_path), "tokenizer_dir": relative(export.root),
                  "max_batch": shapes.max_batch, "max_tokens": shapes.step_tokens(capacity),
                  "pool_tokens": shapes.pool_rows(capacity), "max_waiting": MAX_WAITING,
                  "drain_seconds": DRAIN_SECONDS}
    configs = {GENERATE: (generate_config(parameters), "generate"),
               **{name: (config, "stage") for name, config in stage_models.items()}}
    with atomic_dir(repository) as tmp:
        for name, (config, kind) in configs.items():
            (tmp / name / "1").mkdir(parents=True)
            write_atomic(tmp / name / "config.pbtxt", config_text(config))
            for source, target in shipped_files(kind):
                shutil.copyfile(source, tmp / name / "1" / target)
            for file, graph in cpu_graphs.get(name, {}).items():
                write_atomic(tmp / name / file, graph)
            if stage_models:  # the key only the first node's scheduler and the stage models know
                write_atomic(tmp / name / KEY_FILE, key + "\n")
                (tmp / name / KEY_FILE).chmod(0o600)
    nodes = node_models(stages)
    runtime = "TensorRT engines" if engine else "ONNX Runtime (CPU)"
    note = (f"{GENERATE} runs {len(export.stages)} stage(s) by {runtime}: up to {shapes.max_batch} sequences and "
            f"{parameters['max_tokens']} tokens per step, a pool of {parameters['pool_tokens']:,} tokens; "
            f"serve: dsa-export serve {export.root}")
    if len(nodes) > 1:
        note += (f" --node-address N=ADDRESS:PORT for each N of 1-{len(nodes) - 1}, after `dsa-export serve "
                 f"{export.root} --node N --grpc-host ADDRESS` on each of those nodes")
    if not engine and export.io.cache_dtype != "float32":
        note = (f"{GENERATE} runs ONNX Runtime on the CPU, which runs float32 exports only: serve this "
                f"{export.io.cache_dtype} build on a GPU once its engine is built (then deploy again)")
    return {"path": str(repository), "models": list(configs), "nodes": nodes, "runtime": parameters["runtime"],
            "engine": engine, "stages": len(export.stages), "max_batch": shapes.max_batch,
            "max_tokens": parameters["max_tokens"], "pool_tokens": parameters["pool_tokens"], "note": note}


def node_models(stages: list[dict]) -> list[list[str]]:
    """The models each node's server loads, from dsa_generate's `stages` parameter: the first node dsa_generate,
    node n the dsa_stage_<i> of its stages."""
    nodes = [[GENERATE]]
    for index, stage in enumerate(stages):
        node = stage.get("node", 0)
        if node:
            nodes += [[] for _ in range(node + 1 - len(nodes))]
            nodes[node].append(stage_model(index))
    return nodes
