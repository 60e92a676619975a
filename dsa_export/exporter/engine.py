"""TensorRT engine from the export: `engine/model.plan`, with the dsa:: ops as ahead-of-time Triton plugins.

The build parses model.onnx (weights from its external data; each LightningIndexer node replaced by its two
TensorRT halves, IndexerChunks and IndexerMerge) into a strongly typed network (the flag is needed on
TensorRT 10.x and ignored by 11.x, where strong typing is always on: precision comes from the export's dtypes), then
refuses a network in which any dsa:: node was imported as its decomposition instead of our plugin. One optimisation
profile covers every step (a packed batch: up to --max-tokens tokens of up to --max-batch sequences, decode tokens and
prefill chunks mixed); the pools have the fixed size the memory plan gives them (--pool-tokens) and are written in
place (dsa::WriteCache's output aliases its pool, as RoutedExperts' aliases its `base` input). A timing cache is kept
beside the plan and reused; the plan is written atomically.

Everything that needs no GPU is a plain function here and tested on CPU: the profiles, the memory plan (weights +
caches at the maximum shapes must fit the target), what this machine lacks to build. `build_engine` imports
TensorRT when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from dsa_export.errors import DSAExportError
from dsa_export.exporter.artifacts import StageDir
from dsa_export.exporter.graph_io import POOL_ROWS, SAMPLES, SEQUENCES, TOKENS, GraphIO
from dsa_export.exporter.plan import EngineShapes
from dsa_export.targets import GPUTarget

MIN_TENSORRT = (10, 15)  # prefers a plugin when plugin_namespace is set (and QDP AOT plugins, from 10.9)
PROFILES = ("step",)  # one profile: every step is a packed batch of tokens


def profiles(io: GraphIO, shapes: EngineShapes) -> dict[str, dict[str, tuple[tuple, tuple, tuple]]]:
    """profile name → graph input → (min, opt, max) shapes. Tokens, sequences and samples vary (the optimum: a full
    decode batch); the pools keep the size the plan gives them."""
    rows = shapes.pool_rows(io.capacity)
    tokens = shapes.step_tokens(io.capacity)
    ranges = {"step": {TOKENS: (1, shapes.max_batch, tokens), SEQUENCES: (1, shapes.max_batch, shapes.max_batch),
                       SAMPLES: (1, shapes.max_batch, shapes.max_batch), POOL_ROWS: (rows, rows, rows)}}
    out = {}
    for name, dims in ranges.items():
        out[name] = {t.name: tuple(tuple(dims[d][i] if isinstance(d, str) else d for d in t.dims) for i in range(3))
                     for t in io.inputs}
    return out


def unavailable(target: GPUTarget) -> str | None:
    """Why an engine for `target` cannot be built on this machine (None: it can). A GPU of another architecture is
    not a reason to skip but an error (check_gpu)."""
    try:
        import tensorrt as trt
    except ImportError:
        return "TensorRT is not installed (it needs an NVIDIA GPU machine: pip install tensorrt-cu12)"
    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        return f"TensorRT {trt.__version__} is too old (>= {'.'.join(map(str, MIN_TENSORRT))} is needed)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


def check_gpu(target: GPUTarget) -> None:
    """The GPU present must be of the target's architecture (an engine runs on the compute capability it was built
    for): a clear error naming both."""
    import torch

    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(0)
        if tuple(capability) != tuple(target.compute_capability):
            raise DSAExportError(f"this machine's GPU is {torch.cuda.get_device_name(0)} (compute capability "
                                 f"{capability[0]}.{capability[1]}); an engine for {target.name} needs "
                                 f"{target.cc} ({target.kernel_arch})")


def check_plugin_layers(layers: dict[str, str], dsa_nodes: dict[str, str]) -> None:
    """`layers`: TensorRT layer name → layer type name, after parsing. Every dsa node must be a plugin layer. The
    parser names layers after their ONNX nodes but makes a taken name unique with a suffix, so the plugin layers are
    counted (no other plugin is in the graph); the nodes whose name lacks a plugin layer are named in the error."""
    plugins = sum(kind == "PLUGIN_V3" for kind in layers.values())
    if plugins >= len(dsa_nodes):
        return
    missing = [node for node in dsa_nodes if layers.get(node) != "PLUGIN_V3"] or list(dsa_nodes)
    node = missing[0]
    raise DSAExportError(f"{len(dsa_nodes) - plugins} of {len(dsa_nodes)} dsa nodes were not imported as dsa plugins "
                         f"(dsa::{dsa_nodes[node]} node '{node}': layer type "
                         f"{layers.get(node, 'none: built from its decomposition')}); TensorRT >= 10.15 with the dsa "
                         f"plugins registered before parsing is needed")


def build_engine(stage: StageDir, kernel_dir: Path, target: GPUTarget, shapes: EngineShapes, workspace_gb: float,
                 engine_dir: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Parse, check, build and write the stage's engine (model.plan, timing.cache, engine.json) into engine_dir
    (default: the stage's own); returns what was built."""
    import tensorrt as trt

    from dsa_export.files import atomic_dir, write_atomic
    from dsa_export.kernels.launch import check_driver, cuda_driver_version, load_kernels
    from dsa_export.plugins.tensorrt import register_plugins

    io = stage.io
    check_driver(load_kernels(kernel_dir), cuda_driver_version())  # before TensorRT JIT-compiles their PTX
    register_plugins(kernel_dir)  # before parsing: the parser looks plugins up by op type and namespace
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # the graph with LightningIndexer split in two (no weights: found beside the path given, as external data)
    if not parser.parse(stage.tensorrt_graph.SerializeToString(), str(stage.model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DSAExportError(f"TensorRT cannot parse {stage.model_path}: {errors}")
    layers = {network.get_layer(i).name: network.get_layer(i).type.name for i in range(network.num_layers)}
    check_plugin_layers(layers, stage.dsa_nodes())

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)  # WriteCache, RoutedExperts alias
    old_cache = stage.timing_cache_path
    cache = config.create_timing_cache(old_cache.read_bytes() if old_cache.exists() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise DSAExportError(f"TensorRT refuses the timing cache {old_cache} (from another TensorRT or GPU?): "
                             f"remove it and build again")
    config.clear_flag(trt.BuilderFlag.TF32)  # on by default: fp32 layers would round their inputs to 10 bits
    for ranges in profiles(io, shapes).values():
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in ranges.items():
            profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
        config.add_optimization_profile(profile)
    log(f"building the TensorRT engine for {target.name} ({len(layers)} layers)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DSAExportError("TensorRT could not build the engine (see its log above)")
    timing = bytes(config.get_timing_cache().serialize())
    with atomic_dir(engine_dir or stage.engine_dir) as tmp:  # the plan, its timing cache and what it was built for, all or nothing
        write_atomic(tmp / stage.plan_path.name, memoryview(plan))  # not bytes(plan): no second copy of a large plan
        write_atomic(tmp / stage.timing_cache_path.name, timing)
        record = {"tensorrt": trt.__version__, "target": target.name, "compute_capability": target.cc,
                  "profiles": list(PROFILES), "shapes": shapes.__dict__, "plugin_layers": sum(
                      t == "PLUGIN_V3" for t in layers.values()), "plan_bytes": plan.nbytes}
        write_atomic(tmp / stage.engine_json_path.name, json.dumps(record, indent=2) + "\n")
    return record


def build_engines(export, kernel_dir: Path, target: GPUTarget, shapes: EngineShapes, workspace_gb: float,
                  out_root: Path | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """`build_engine` for every pipeline stage of an export (each engine for the stage's GPU), written under out_root
    (default: the export's own root) at the same place relative to it."""
    out_root = Path(out_root) if out_root is not None else export.root
    return [build_engine(stage, kernel_dir, target, shapes, workspace_gb,
                         out_root / stage.engine_dir.relative_to(export.root), log) for stage in export.stages]
