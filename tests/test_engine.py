"""The TensorRT engine stage: what a CPU can check (profiles, memory plan, the plugin-layer check, the skipped record
with its command, refusals), and on a machine with TensorRT and a GPU the engine itself against the eager model."""

import json
import re

import pytest
import torch

from dsa_export.cli import main
from dsa_export.errors import DSAExportError
from dsa_export.exporter import engine, plan
from dsa_export.exporter.artifacts import StageDir
from dsa_export.exporter.graph_io import GraphIO
from dsa_export.kernels import aot
from dsa_export.targets import TARGETS, get_target
from conftest import TINY_CAPACITY


def test_one_step_profile_varies_tokens_sequences_and_samples_and_keeps_the_pool(tiny_onnx, tiny_config):
    io = GraphIO.load(tiny_onnx / "io.json")
    shapes = plan.EngineShapes(max_batch=16, max_tokens=10_000, pool_tokens=1000)
    profiles = engine.profiles(io, shapes)
    assert list(profiles) == list(engine.PROFILES) == ["step"]
    step = profiles["step"]
    assert set(step) == {t.name for t in io.inputs}
    pool = 16 * 64  # 1000 tokens round up to 16 blocks of 64 rows
    for name in ("input_ids", "positions", "sequence", "slots"):  # up to the pool's rows (< --max-tokens)
        assert step[name] == ((1,), (16,), (pool,))  # optimum: a full decode batch
    assert step["block_tables"] == ((1, 4), (16, 4), (16, 4))  # capacity 256: 4 blocks per sequence
    for name in ("logits_index", "temperature", "top_k", "top_p", "uniform"):
        assert step[name] == ((1,), (16,), (16,))
    assert step["latent_cache.0"] == ((pool, 40),) * 3  # fixed: the pools are allocated once
    assert step["index_key_cache.2"] == ((pool, tiny_config.index_head_dim),) * 3
    # --max-tokens caps a step; a step always takes one token of each of --max-batch sequences
    assert engine.profiles(io, plan.EngineShapes(max_batch=16, max_tokens=100))["step"]["input_ids"] == \
        ((1,), (16,), (100,))
    assert engine.profiles(io, plan.EngineShapes(max_batch=16, max_tokens=4))["step"]["input_ids"] == \
        ((1,), (16,), (16,))
    default = engine.profiles(io, plan.EngineShapes(max_batch=2))["step"]  # pool: 2 sequences at the capacity
    assert default["latent_cache.1"][0] == (2 * TINY_CAPACITY, 40) and default["slots"][2] == (2 * TINY_CAPACITY,)


def test_memory_plan_counts_weights_pools_and_refuses_what_does_not_fit(tiny_onnx):
    h100 = get_target("h100")
    memory = plan.memory_plan(StageDir(tiny_onnx), h100, plan.EngineShapes(max_batch=4), workspace_gb=1)
    assert memory["weights_gb"] == pytest.approx((tiny_onnx / "model.onnx.data").stat().st_size / 1e9)
    per_row = 3 * (40 + 16) * 4  # 3 layers × (latent + index key) × fp32
    assert memory["caches_gb"] == pytest.approx(4 * TINY_CAPACITY * per_row / 1e9)  # default: 4 × capacity rows
    assert memory["activations_gb"] == pytest.approx((256 * 2**20 + 4 * 320 * 4) / 1e9)  # + 4 samples' logits
    assert memory["fits"] and memory["gpu_gb"] == 80
    pooled = plan.memory_plan(StageDir(tiny_onnx), h100, plan.EngineShapes(max_batch=4, pool_tokens=100),
                              workspace_gb=1)
    assert pooled["caches_gb"] == pytest.approx(128 * per_row / 1e9)  # 100 tokens: 2 blocks of 64 rows
    huge = plan.memory_plan(StageDir(tiny_onnx), h100, plan.EngineShapes(max_batch=10**7), workspace_gb=1)
    assert not huge["fits"] and huge["shortfall_gb"] == pytest.approx(huge["total_gb"] - 80)
    with pytest.raises(DSAExportError, match=r"needs [\d.]+ GB on h100 .* which has 80 GB: [\d.]+ GB short; lower "
                                             r"--pool-tokens"):
        plan.check_fits(huge, h100)
    big_pool = plan.memory_plan(StageDir(tiny_onnx), h100, plan.EngineShapes(pool_tokens=10**9), workspace_gb=1)
    assert not big_pool["fits"] and big_pool["caches_gb"] == pytest.approx(10**9 * per_row / 1e9)


def test_a_dsa_node_built_from_its_decomposition_is_refused():
    nodes = {"node_IndexerChunks_0": "IndexerChunks", "node_SparseMLA_1": "SparseMLA"}
    engine.check_plugin_layers({"node_IndexerChunks_0": "PLUGIN_V3", "node_SparseMLA_1": "PLUGIN_V3",
                                "node_MatMul_2": "MATRIX_MULTIPLY"}, nodes)
    # the parser made a taken name unique: the plugin layers are counted, not looked up by name
    engine.check_plugin_layers({"node_IndexerChunks_0": "PLUGIN_V3", "node_SparseMLA_1_1": "PLUGIN_V3"}, nodes)
    with pytest.raises(DSAExportError, match="1 of 2 dsa nodes were not imported as dsa plugins "
                                             r"\(dsa::SparseMLA node 'node_SparseMLA_1': layer type none: built from "
                                             "its decomposition"):
        engine.check_plugin_layers({"node_IndexerChunks_0": "PLUGIN_V3", "node_SparseMLA_1/MatMul": "MATRIX_MULTIPLY"},
                                   nodes)


def test_tensorrt_and_a_gpu_are_named_when_missing():
    reason = engine.unavailable(get_target("h100"))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert reason.startswith("TensorRT is not installed")
    else:
        assert reason is None or "GPU" in reason or "too old" in reason


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_checkpoint):
    """A build directory with the export and the h100 kernels, what the engine stage reads."""
    out = tmp_path_factory.mktemp("prepared") / "b"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--capacity", "64"]) == 0
    assert main(["kernels", "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture()
def build_dir(prepared, tmp_path):
    import shutil

    return shutil.copytree(prepared, tmp_path / "b")


def test_build_records_the_engine_as_skipped_with_the_command_that_finishes_it(capsys, build_dir):
    if engine.unavailable(get_target("h100")) is None:
        pytest.skip("this machine can build engines")
    out = build_dir
    code = main(["engine", "--out", str(out), "--max-batch", "4", "--max-tokens", "512", "--pool-tokens", "1000"])
    stdout = capsys.readouterr().out
    assert code == 0 and "to finish engine: dsa-export engine --gpu h100 --out" in stdout
    record = json.loads((out / "manifest.json").read_text())["steps"]["engine"]
    assert record["status"] == "skipped" and record["reason"].startswith("TensorRT is not installed")
    assert re.match(rf"dsa-export engine --gpu h100 --out {out} --max-batch 4 --max-tokens 512 --pool-tokens 1000 "
                    rf"+# with TensorRT >= 10.15 and a h100", record["command"])
    assert [plan["fits"] for plan in record["memory"]] == [True] and not (out / "engine").exists()
    # demanded: an error, before anything is written
    manifest = (out / "manifest.json").read_text()
    assert main(["engine", "--out", str(out), "--require-engine"]) == 2
    assert "cannot run on this machine: TensorRT is not installed" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == manifest


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "a100", "--precision", "fp8"], r"--precision fp8: a100 \(sm_80\) has no FP8"),
    (["--precision", "bfloat16"], r"--precision bfloat16: the export is float32"),
    (["--precision", "fp8"], r"--precision fp8: the export holds no FP8 experts"),
    (["--max-batch", "100000000"], r"the engine needs [\d.]+ GB on h100 .* GB short"),
    (["--pool-tokens", "10000000000"], r"the engine needs [\d.]+ GB on h100 \(weights [\d.]+, caches 6720\.0"),
])
def test_engines_that_cannot_be_are_refused_before_anything_is_written(capsys, build_dir, argv, message):
    out = build_dir
    manifest = (out / "manifest.json").read_text()
    assert main(["engine", "--out", str(out), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert (out / "manifest.json").read_text() == manifest


def test_the_hidden_parameter_check_refuses_ptx_that_reads_them():
    from types import SimpleNamespace

    ptx = (".visible .entry k(\n.param .u64 k_param_0,\n.param .u64 k_param_1,\n.param .u64 k_param_2\n)\n{\n"
           "ld.param.b64 \t%rd1, [k_param_0];\n")
    meta = SimpleNamespace(global_scratch_size=0, profile_scratch_size=0)
    params = aot.ptx_entry_params(ptx)
    aot.check_hidden_params("k", ptx, params, 1, meta)  # the hidden ones (1, 2) are never read: fine
    with pytest.raises(DSAExportError, match=r"reads Triton's hidden parameters \['k_param_2'\]"):
        aot.check_hidden_params("k", ptx + "ld.param.b64 \t%rd9, [k_param_2];\n", params, 1, meta)
    with pytest.raises(DSAExportError, match="needs Triton scratch memory"):
        aot.check_hidden_params("k", ptx, params, 1, SimpleNamespace(global_scratch_size=64, profile_scratch_size=0))


def _gpu_target():
    major, minor = torch.cuda.get_device_capability(0)
    return next(name for name, t in TARGETS.items() if t.compute_capability == (major, minor))


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(engine.unavailable(get_target("h100")) == "TensorRT is not installed (it needs an NVIDIA GPU "
                    "machine: pip install tensorrt-cu12)" or not torch.cuda.is_available(),
                    reason="needs TensorRT >= 10.15 and a CUDA GPU")
def test_engine_builds_on_this_gpu_and_matches_the_eager_model(capsys, tmp_path, tiny_checkpoint):
    """The whole chain on a GPU: AOT kernels as plugins, every dsa node a plugin layer, caches in place, parity."""
    out = tmp_path / "b"
    code = main(["build", "--gpu", _gpu_target(), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--capacity", "128", "--require-engine"])
    assert code == 0, capsys.readouterr().err
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert steps["engine"]["status"] == "ok" and (out / "engine" / "model.plan").stat().st_size > 0
    engine_record = steps["engine"]["engine"]
    # indexer + sparse MLA + a WriteCache per pool in each layer, 2 MoE layers
    assert engine_record["plugin_layers"] == 3 * 2 + 3 * 2 + 2
    assert engine_record["profiles"] == ["step"]
    assert steps["parity"]["metrics"]["tensorrt"]["greedy_match"] == 1.0
