"""The export streams its weights (exporter/weights.py): from a checkpoint it writes exactly what exporting the loaded
model writes, in bounded data files, without folding a weight into a new constant, in pipeline stages that chain to
the whole model, and in a child process whose peak resident memory stays under the checkpoint's own size."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from dsa_export.exporter.artifacts import ExportDir, StageDir
from dsa_export.exporter.onnx_export import export_onnx
from dsa_export.parity.accuracy import Thresholds
from dsa_export.parity.run import run_parity
from dsa_export.models import get_preset, init_checkpoint, load_checkpoint
from dsa_export.models.config import load_config
from dsa_export.runtime import GraphBackend, Session

CAPACITY = 64
TINY_CAPACITY = 256  # conftest's tiny_onnx


def data_bytes(onnx_dir):
    return b"".join(f.read_bytes() for f in StageDir(onnx_dir).data_files())


@pytest.mark.parametrize("fp8, dequantize", [(True, False), (True, True)])
def test_a_streamed_export_equals_the_export_of_the_loaded_model(tmp_path, fp8, dequantize):
    """FP8 checkpoints: experts kept as codes + scales, or dequantised; the other weights dequantised block by block
    (a bf16 checkpoint's streamed export is the `tiny_onnx` every other test runs)."""
    checkpoint = init_checkpoint(get_preset("tiny"), tmp_path / "ckpt", seed=3, fp8=fp8)
    streamed = export_onnx(checkpoint, tmp_path / "streamed", capacity=CAPACITY, dequantize_experts=dequantize)
    model = load_checkpoint(checkpoint, progress=False)
    loaded = export_onnx(model, tmp_path / "loaded", capacity=CAPACITY, dequantize_experts=dequantize)
    assert streamed.model_path.read_bytes() == loaded.model_path.read_bytes()
    assert data_bytes(streamed.path) == data_bytes(loaded.path)
    graph = onnx.load(streamed.model_path, load_external_data=False).graph
    experts = [t for t in graph.initializer if t.name.endswith("experts.gate_up_proj")]
    assert {t.data_type for t in experts} == {onnx.TensorProto.INT8 if fp8 and not dequantize
                                              else onnx.TensorProto.FLOAT}
    assert {n.op_type for n in graph.node if n.domain == "dsa"} >= {"RoutedExperts" if dequantize
                                                                   else "RoutedExpertsFP8"}
    # and it passes the accuracy gate against the FP8 model (codes + block scales: one byte per expert parameter)
    report = run_parity(model, streamed.path, tmp_path / "parity", Thresholds(), new_tokens=32)
    assert report["passed"], report["failures"]


def test_every_weight_is_a_model_tensor_as_stored_not_a_folded_copy(tiny_onnx, tiny_model):
    path = tiny_onnx / "model.onnx"
    tensors = dict(tiny_model.named_parameters()) | dict(tiny_model.named_buffers())
    for init in onnx.load(path, load_external_data=False).graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            name = init.name.removeprefix("model.")
            assert name in tensors and tuple(init.dims) == tuple(tensors[name].shape), init.name
        else:  # what the optimizer folded: shapes, scalars and index ranges (sampling's ranks), never a weight
            assert init.data_type == onnx.TensorProto.INT64 or np.prod(init.dims) <= 64, init.name


def test_bounded_data_files_run_the_same(tiny_checkpoint, tiny_onnx, tmp_path):
    limit = 120_000
    export_onnx(tiny_checkpoint, tmp_path / "split", capacity=CAPACITY, max_data_file_bytes=limit)
    files = StageDir(tmp_path / "split").data_files()
    graph = onnx.load(tmp_path / "split" / "model.onnx", load_external_data=False).graph
    by_file: dict[str, list[int]] = {}
    for init in graph.initializer:
        where = {e.key: e.value for e in init.external_data}
        if where:
            by_file.setdefault(where["location"], []).append(int(where["length"]))
    assert len(files) >= 3 and sorted(by_file) == sorted(f.name for f in files)
    for f in files:  # within the limit, unless one tensor alone is larger
        assert f.stat().st_size <= limit or len(by_file[f.name]) == 1
    StageDir(tmp_path / "split").check()
    prompts = [[5, 9, 13, 200, 7], [3, 4]]
    expected = Session(GraphBackend.onnxruntime(tiny_onnx)).generate(prompts, 6)
    assert Session(GraphBackend.onnxruntime(tmp_path / "split")).generate(prompts, 6) == expected


def test_pipeline_stages_chain_to_the_whole_model(tiny_checkpoint, tiny_onnx, tmp_path):
    whole = tiny_onnx
    for i, layers in enumerate([(0, 1), (1, 3)]):
        export_onnx(tiny_checkpoint, tmp_path / "staged" / f"stage-{i}", capacity=TINY_CAPACITY, layers=layers)
    first, last = (json.loads((tmp_path / "staged" / f"stage-{i}" / "io.json").read_text()) for i in (0, 1))
    names = [[t["name"] for t in io[key]] for io in (first, last) for key in ("inputs", "outputs")]
    assert names[0][:3] == ["input_ids", "positions", "sequence"] and "latent_cache.0" in names[0]
    assert names[1] == ["hidden_out", "latent_cache_out.0", "index_key_cache_out.0"]
    assert names[2][:3] == ["hidden_in", "positions", "sequence"] and "latent_cache.1" in names[2]
    assert names[3][:3] == ["next_tokens", "logprobs", "logits"] and "latent_cache_out.0" not in names[3]
    dsa = [sum(n.domain == "dsa" for n in onnx.load(tmp_path / "staged" / f"stage-{i}" / "model.onnx",
                                                    load_external_data=False).graph.node) for i in (0, 1)]
    assert dsa == [4, 10]  # layer 0 (dense): indexer, MLA, a WriteCache per pool; layers 1-2: those + RoutedExperts
    one, two = GraphBackend.onnxruntime(whole), GraphBackend.onnxruntime(tmp_path / "staged")
    ids, positions = torch.tensor([[5, 9, 13, 200, 7]]), torch.arange(5)[None]
    caches_one, caches_two = one.new_caches(1), two.new_caches(1)
    for step in (slice(0, 4), slice(4, 5)):  # prefill, then a decode step on the caches
        a = one.step(ids[:, step], positions[:, step], caches_one).logits
        b = two.step(ids[:, step], positions[:, step], caches_two).logits
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_an_export_over_2_gib_peaks_below_the_checkpoint_size(tmp_path):
    """DeepSeek-V3.2-Exp's dimensions (one dense layer, a 40K vocabulary): 2.3 GB of bf16 weights, exported by
    `dsa-export export` in a child process. Its peak resident memory, as the runner records it (VmHWM), stays under
    the checkpoint's size: the weights are streamed, never held."""
    config = get_preset("v3.2-exp").replace(num_hidden_layers=1, first_k_dense_replace=1, vocab_size=40_000)
    checkpoint = init_checkpoint(config, tmp_path / "ckpt", max_shard_bytes=1 << 30)
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    assert size > 2 * 2**30
    out = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "dsa_export.cli", "export", "--checkpoint", str(checkpoint), "--out",
                    str(out), "--dtype", "bf16", "--capacity", "256", "--data-file-gb", "1"], check=True,
                   capture_output=True, timeout=600)
    peak = json.loads((out / "manifest.json").read_text())["steps"]["export"]["peak_rss_gb"] * 1e9
    assert peak < size, f"peak {peak / 1e9:.2f} GB for a {size / 1e9:.2f} GB checkpoint"
    StageDir(out).check(load_config(checkpoint))  # the model exported is the checkpoint's
    assert len(StageDir(out).data_files()) >= 3 and sum(f.stat().st_size for f in StageDir(out).data_files()) >= size


def test_an_export_into_other_stages_removes_the_old_ones(tmp_path):
    """What an export with another number of stages left is removed first, so that no old graph passes for new."""
    def stage_dirs(root):
        return [stage.path for stage in ExportDir(root).stages]

    build = tmp_path / "b"
    for name in ("model.onnx", "model.onnx.data", "model.onnx.data.1", "io.json", "config.json", "tokenizer.json"):
        (build / name).parent.mkdir(parents=True, exist_ok=True)
        (build / name).write_text("old")
    for i in range(3):
        (build / f"stage-{i}").mkdir()
    assert stage_dirs(build) == [build]  # a graph at the root hides any stage directories
    ExportDir(build).prepare(2)
    assert sorted(p.name for p in build.iterdir()) == ["stage-0", "stage-1", "tokenizer.json"]
    assert stage_dirs(build) == [build / "stage-0", build / "stage-1"]
    ExportDir(build).prepare(1)
    assert sorted(p.name for p in build.iterdir()) == ["tokenizer.json"]
