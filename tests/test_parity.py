"""The accuracy gate: eager vs ONNX Runtime on the tiny preset (acceptance of the ONNX issue), and its failure path
(FP8 checkpoints pass it in test_streamed_export.py)."""

import dataclasses
import json

import pytest

from dsa_export.errors import CheckFailure
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


def test_a_missed_threshold_fails_naming_the_metric(tiny_onnx, tiny_model, tmp_path):
    with pytest.raises(CheckFailure, match="onnxruntime: max_abs_logits = .*needs <= 1e-12"):
        run_parity(tiny_model, tiny_onnx, tmp_path / "p", Thresholds(max_abs_logits=1e-12), new_tokens=2)
    saved = json.loads((tmp_path / "p" / "parity.json").read_text())
    assert not saved["passed"] and "max_abs_logits" in saved["failures"][0]


def test_each_backend_is_judged_by_the_thresholds_of_its_precision(tiny_onnx, tiny_model, tmp_path):
    """A bfloat16 engine is held to the bf16 thresholds (recorded beside its metrics), a float32 one to the given
    float32 thresholds; loosening them never tightens the bf16 ones."""
    from dsa_export.parity.accuracy import write_report
    from dsa_export.parity.thresholds import BF16_THRESHOLDS

    fp32 = run_parity(tiny_model, tiny_onnx, tmp_path / "p", Thresholds(), new_tokens=2)["backends"][0]
    assert fp32["precision"] == "float32" and fp32["thresholds"] == dataclasses.asdict(Thresholds())
    bf16 = json.loads(json.dumps(fp32)) | {"backend": "tensorrt", "precision": "bfloat16"}
    bf16["metrics"] |= {"max_abs_logits": 0.2, "min_cosine": 0.9995, "greedy_match": 0.75}
    report = write_report([fp32, bf16], Thresholds(), tmp_path / "q")
    assert report["passed"] and report["backends"][1]["thresholds"] == dataclasses.asdict(BF16_THRESHOLDS)
    assert "Thresholds (bfloat16): max abs logits <= 0.5" in (tmp_path / "q" / "parity.md").read_text()
    as_fp32 = json.loads(json.dumps(bf16)) | {"precision": "float32"}
    report = write_report([as_fp32], Thresholds(), tmp_path / "r")
    assert not report["passed"] and "tensorrt: max_abs_logits = 0.2, needs <= 0.001" in report["failures"]
    loose = Thresholds(max_abs_logits=2.0, min_greedy_match=0.0)
    assert loose.for_precision("bfloat16") == dataclasses.replace(BF16_THRESHOLDS, max_abs_logits=2.0,
                                                                 min_greedy_match=0.0)


def test_a_miss_is_shown_with_the_digits_that_make_it_a_miss():
    from dsa_export.parity.accuracy import failures

    report = {"backend": "onnxruntime", "metrics": {"non_finite_logits": 0, "max_abs_logits": 0.0, "min_cosine":
                                                    0.9999987, "max_kl": 0.0, "top1": 1.0, "greedy_match": 1.0,
                                                    "min_indexer_recall": 1.0}}
    assert failures(report, Thresholds(min_cosine=1.0)) == ["onnxruntime: min_cosine = 0.999999, needs >= 1"]
    report["metrics"]["min_cosine"] = 0.99999996  # "1" at 6 and 7 digits: 8 are shown
    assert failures(report, Thresholds(min_cosine=1.0)) == ["onnxruntime: min_cosine = 0.99999996, needs >= 1"]
    report["metrics"]["min_cosine"] = float("nan")
    assert failures(report, Thresholds()) == ["onnxruntime: min_cosine = nan, needs >= 0.9999"]
