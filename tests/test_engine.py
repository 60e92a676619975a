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


def test_profiles_vary_batch_and_sequence_and_keep_the_cache_capacity(tiny_onnx):
    io = GraphIO.load(tiny_onnx / "io.json")
    shapes = plan.EngineShapes(max_batch=16, prefill_batch=2, max_prefill=10_000)
    profiles = engine.profiles(io, shapes)
    assert list(profiles) == list(engine.PROFILES) == ["prefill", "decode"]
    assert profiles["prefill"]["input_ids"] == ((1, 1), (1, min(512, TINY_CAPACITY)), (2, TINY_CAPACITY))
    assert profiles["decode"]["positions"] == ((1, 1), (16, 1), (16, 1))
    latent = profiles["decode"]["latent_cache.0"]
    assert latent == ((1, 1, TINY_CAPACITY, 40), (16, 1, TINY_CAPACITY, 40), (16, 1, TINY_CAPACITY, 40))
    assert set(profiles["prefill"]) == {t.name for t in io.inputs}


def test_memory_plan_counts_weights_caches_and_refuses_what_does_not_fit(tiny_onnx):
    h100 = get_target("h100")
    memory = plan.memory_plan(StageDir(tiny_onnx), h100, plan.EngineShapes(max_batch=4), workspace_gb=1)
    assert memory["weights_gb"] == pytest.approx((tiny_onnx / "model.onnx.data").stat().st_size / 1e9)
    per_sequence = 3 * TINY_CAPACITY * (40 + 16) * 4  # 3 layers × capacity × (latent + index key) × fp32
    assert memory["caches_gb"] == pytest.approx(4 * per_sequence / 1e9)
    assert memory["fits"] and memory["gpu_gb"] == 80
    huge = plan.memory_plan(StageDir(tiny_onnx), h100, plan.EngineShapes(max_batch=10**7), workspace_gb=1)
    assert not huge["fits"] and huge["shortfall_gb"] == pytest.approx(huge["total_gb"] - 80)
    with pytest.raises(DSAExportError, match=r"needs [\d.]+ GB on h100 .* which has 80 GB: [\d.]+ GB short"):
        plan.check_fits(huge, h100)


def test_a_dsa_node_built_from_its_decomposition_is_refused():
    nodes = {"node_LightningIndexer_0": "LightningIndexer", "node_SparseMLA_1": "SparseMLA"}
    engine.check_plugin_layers({"node_LightningIndexer_0": "PLUGIN_V3", "node_SparseMLA_1": "PLUGIN_V3",
                                "node_MatMul_2": "MATRIX_MULTIPLY"}, nodes)
    with pytest.raises(DSAExportError, match="dsa::SparseMLA node 'node_SparseMLA_1' was not imported as the dsa "
                                             "plugin .*built from its decomposition"):
        engine.check_plugin_layers({"node_LightningIndexer_0": "PLUGIN_V3"}, nodes)


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
    code = main(["engine", "--out", str(out), "--max-batch", "4"])
    stdout = capsys.readouterr().out
    assert code == 0 and "to finish engine: dsa-export engine --gpu h100 --out" in stdout
    record = json.loads((out / "manifest.json").read_text())["steps"]["engine"]
    assert record["status"] == "skipped" and record["reason"].startswith("TensorRT is not installed")
    assert re.match(rf"dsa-export engine --gpu h100 --out {out} --max-batch 4 +# with TensorRT >= 10.15 and a h100",
                    record["command"])
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
    assert steps["engine"]["engine"]["plugin_layers"] == 3 * 2 + 2  # indexer + sparse MLA per layer, 2 MoE layers
    assert steps["parity"]["metrics"]["tensorrt"]["greedy_match"] == 1.0
