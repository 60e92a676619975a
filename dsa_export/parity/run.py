"""`dsa-export parity` and the build's parity stage: eager vs every backend this machine has, reports, verdict."""

from __future__ import annotations

import json
from pathlib import Path

from dsa_export.errors import CheckFailure
from dsa_export.exporter.checks import check_exports
from dsa_export.models.model import DSAForCausalLM
from dsa_export.parity.accuracy import Thresholds, compare, default_prompts, write_report
from dsa_export.runtime import EagerBackend, OnnxRuntimeBackend


def run_parity(model: DSAForCausalLM, onnx_dir: str | Path, out_dir: str | Path, thresholds: Thresholds,
               new_tokens: int = 32, seed: int = 0, raise_on_failure: bool = True,
               extra_backends: list | None = None) -> dict:
    """Compare the eager model with ONNX Runtime on the exported graph (TensorRT joins where it exists); write
    parity.json and parity.md into out_dir. Raises CheckFailure naming the missed metrics."""
    check_exports(Path(onnx_dir), model.config)
    prompts = default_prompts(model.config.vocab_size, seed)
    backends = [OnnxRuntimeBackend(onnx_dir, record_indexer=True), *(extra_backends or [])]
    reports = [compare(EagerBackend(model, record_indexer=True), backend, prompts, new_tokens) for backend in backends]
    missed = write_report(reports, thresholds, out_dir)
    if missed and raise_on_failure:
        raise CheckFailure("; ".join(missed))
    return json.loads((Path(out_dir) / "parity.json").read_text())
