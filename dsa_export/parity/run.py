"""`dsa-export parity` and the build's parity step: eager vs every backend this machine has, reports, verdict."""

from __future__ import annotations

from pathlib import Path

from dsa_export.errors import CheckFailure, DSAExportError
from dsa_export.exporter.artifacts import ExportDir, as_export
from dsa_export.models.model import DSAForCausalLM
from dsa_export.parity.accuracy import compare, default_prompts, write_report
from dsa_export.parity.thresholds import Thresholds
from dsa_export.runtime import EagerBackend, available_backends


def run_parity(model: DSAForCausalLM, export: ExportDir | str | Path, out_dir: str | Path, thresholds: Thresholds,
               new_tokens: int = 32, seed: int = 0, raise_on_failure: bool = True,
               backends: list | None = None) -> dict:
    """Compare the eager model with each backend of the export (default: every one this machine runs, recording the
    indexer's selections: ONNX Runtime, and TensorRT where it has engines); write parity.json and parity.md into
    out_dir; return the report. Raises CheckFailure naming the missed metrics."""
    export = as_export(export)
    export.check(model.config)
    if backends is None:
        backends = available_backends(export, record_indexer=True)
    if not backends:
        raise DSAExportError(f"{export.root}: nothing on this machine runs a {export.io.cache_dtype} export (ONNX "
                             f"Runtime on the CPU runs float32 exports)")
    prompts = default_prompts(model.config.vocab_size, seed)
    reports = [compare(EagerBackend(model, record_indexer=True), backend, prompts, new_tokens) for backend in backends]
    report = write_report(reports, thresholds, out_dir)
    if report["failures"] and raise_on_failure:
        raise CheckFailure("; ".join(report["failures"]))
    return report


def build_parity(reference: DSAForCausalLM, export: ExportDir, out_dir: Path, thresholds: Thresholds,
                 new_tokens: int, seed: int, backends: list, twin_options: dict) -> dict:
    """The build's parity: the float32 eager model against every backend of the export this machine has. ONNX Runtime
    on the CPU runs float32 exports only, so a bfloat16 export is compared through its float32 twin (exported here,
    from the reference, into a temporary directory, with the export's `twin_options`) beside its own engines."""
    import tempfile

    import torch

    from dsa_export.exporter.onnx_export import export_onnx

    if export.io.cache_dtype == "float32":
        return run_parity(reference, export, out_dir, thresholds, new_tokens, seed, raise_on_failure=False,
                          backends=backends)
    engines = [b for b in backends if b.name != "onnxruntime"]
    with tempfile.TemporaryDirectory(prefix="dsa-parity-") as tmp:
        twin = ExportDir(tmp, [export_onnx(reference, tmp, dtype=torch.float32, **twin_options)])
        twin_backends = available_backends(twin, record_indexer=True)
        return run_parity(reference, twin, out_dir, thresholds, new_tokens, seed, raise_on_failure=False,
                          backends=twin_backends + engines)


def summary(report: dict) -> str:
    """One line for the build's summary: the verdict and the first backend's key metrics."""
    metrics = report["backends"][0]["metrics"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    return (f"{verdict}: max abs logits {metrics['max_abs_logits']:.2g}, greedy match {metrics['greedy_match']:.0%}, "
            f"indexer recall {metrics['min_indexer_recall']:.2f}")
