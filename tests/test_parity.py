"""The accuracy gate: eager vs ONNX Runtime on the tiny preset (acceptance of the ONNX issue), and its failure path."""

import json

import onnx
import pytest
import torch

from dsa_export.errors import CheckFailure
from dsa_export.exporter.onnx_export import export_onnx
from dsa_export.models import init_checkpoint, load_checkpoint
from dsa_export.parity.accuracy import Thresholds, default_prompts
from dsa_export.parity.run import run_parity


def test_default_prompts_include_a_batch_of_two_different_lengths(tiny_config):
    batches = default_prompts(tiny_config.vocab_size)
    assert sum(len(b) for b in batches) == 4
    assert len(batches[0]) == 2 and len(batches[0][0]) != len(batches[0][1])
    assert max(len(p) for b in batches for p in b) > tiny_config.index_topk


def test_onnxruntime_passes_the_gate_on_the_tiny_preset(tiny_onnx, tiny_model, tmp_path):
    report = run_parity(tiny_model, tiny_onnx, tmp_path / "parity", Thresholds(), new_tokens=32)
    assert report["passed"], report["failures"]
    m = report["backends"][0]["metrics"]
    assert m["max_abs_logits"] < 1e-3 and m["greedy_match"] == 1.0 and m["min_indexer_recall"] >= 0.99
    generations = report["backends"][0]["generations"]
    assert len(generations) == 4 and all(len(g["candidate"]) == 32 for g in generations)
    assert "**PASSED**" in (tmp_path / "parity" / "parity.md").read_text()


@pytest.mark.parametrize("dequantize", [False, True])
def test_fp8_checkpoint_exports_and_passes_the_gate(tmp_path, tiny_config, dequantize):
    """FP8 experts stay FP8 codes + block scales in the graph (one byte per expert parameter), or are dequantised."""
    model = load_checkpoint(init_checkpoint(tiny_config, tmp_path / "fp8", seed=5, fp8=True), progress=False)
    assert model.routed_experts()[0].gate_up_proj.dtype == torch.uint8
    export_onnx(model, tmp_path / "onnx", capacity=128, dequantize_experts=dequantize)
    graph = onnx.load(tmp_path / "onnx" / "model.onnx", load_external_data=False)
    ops = {n.op_type for n in graph.graph.node if n.domain == "dsa"}
    assert ("RoutedExperts" if dequantize else "RoutedExpertsFP8") in ops
    expert_weights = [t for t in graph.graph.initializer if t.name.endswith("experts.gate_up_proj")]
    assert {t.data_type for t in expert_weights} == {onnx.TensorProto.FLOAT if dequantize else onnx.TensorProto.UINT8}
    report = run_parity(model, tmp_path / "onnx", tmp_path / "parity", Thresholds(), new_tokens=32)
    assert report["passed"], report["failures"]


def test_a_missed_threshold_fails_naming_the_metric(tiny_onnx, tiny_model, tmp_path):
    with pytest.raises(CheckFailure, match="onnxruntime: max_abs_logits = .*needs <= 1e-12"):
        run_parity(tiny_model, tiny_onnx, tmp_path / "p", Thresholds(max_abs_logits=1e-12), new_tokens=2)
    saved = json.loads((tmp_path / "p" / "parity.json").read_text())
    assert not saved["passed"] and "max_abs_logits" in saved["failures"][0]
