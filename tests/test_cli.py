"""The command line: the build pipeline end to end, single-stage commands, reuse, and what it prints."""

import json
import subprocess
import sys
from collections import Counter

from dsa_export.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and "dsa-export, version" in out
    code, out, _ = run_cli(capsys, "build", "--help")
    assert code == 0 and "dsa-export build --gpu h100" in out and "--max-abs-logits" in out and "--capacity" in out
    code, out, _ = run_cli(capsys, "export", "--help")
    assert code == 0 and "--capacity" in out and "--price" not in out  # each command shows its stage's options


def test_inspect_preset_counts_671b(capsys):
    code, out, _ = run_cli(capsys, "inspect", "v3.2-exp")
    assert code == 0
    assert "parameters: 671,877,944,064 total" in out  # 671B main model, MTP layer excluded
    assert "61 (3 dense MLP, 58 MoE)" in out
    assert "85,888 B bf16" in out  # (576 + 128) × 2 B × 61 layers


def test_inspect_checkpoint_checks_tensors(capsys, tiny_checkpoint):
    code, out, _ = run_cli(capsys, "inspect", str(tiny_checkpoint))
    assert code == 0
    assert "all present with the expected shapes" in out and "(0 FP8 weights)" in out


def test_init_fp8_then_inspect(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "init", "--preset", "tiny", "--fp8", "--seed", "4", str(tmp_path / "f"))
    assert code == 0 and "FP8" in out
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "f"))
    assert code == 0 and "FP8 weights)" in out and "(0 FP8" not in out


def count_reads(monkeypatch) -> Counter:
    """Counts, per artifact, the reads that parse it: io.json (serving.io_spec.GraphIO.load, its one reader), the
    graph (onnx.load), a safetensors header (models.checkpoint._header), an ONNX Runtime session over a graph."""
    import onnx
    import onnxruntime

    from dsa_export.models import checkpoint
    from dsa_export.serving.io_spec import GraphIO

    counts: Counter = Counter()
    load_io, load_graph, header, session = GraphIO.load.__func__, onnx.load, checkpoint._header, \
        onnxruntime.InferenceSession.__init__

    def counted(kind, real, key=lambda *a, **k: str(a[0])):
        def wrapper(*args, **kwargs):
            counts[(kind, key(*args, **kwargs))] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(GraphIO, "load", classmethod(counted("io.json", load_io, lambda cls, path: str(path))))
    monkeypatch.setattr(onnx, "load", counted("graph", load_graph))
    monkeypatch.setattr(checkpoint, "_header", counted("header", header))
    monkeypatch.setattr(onnxruntime.InferenceSession, "__init__",
                        counted("session", session, lambda self, model, *a, **k: str(model)[:200]))
    return counts


def test_build_writes_manifest_and_reuses_it(capsys, tmp_path, monkeypatch):
    reads = count_reads(monkeypatch)
    code, out, _ = run_cli(capsys, "build", "--gpu", "h200", "--out", str(tmp_path / "b"), "--capacity", "256")
    assert code == 0
    # one build, one process: every artifact parsed once at most (the export hands on what it wrote)
    assert reads and max(reads.values()) == 1, reads.most_common(3)
    assert {kind for kind, _ in reads} >= {"header", "session"}
    monkeypatch.undo()
    assert "step" in out and "status" in out and "PASSED" in out  # the summary table
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    steps = manifest["steps"]
    assert [steps[s]["status"] for s in ("checkpoint", "smoke", "kernels", "export", "parity", "cost")] == ["ok"] * 6
    assert steps["engine"]["status"] == "skipped" and steps["engine"]["command"].startswith("dsa-export engine")
    assert steps["smoke"]["max_abs_diff"] < 1e-4
    kernel_dir = tmp_path / "b" / "kernels" / "sm_90a"
    for name in steps["kernels"]["kernels"]:
        assert (kernel_dir / f"{name}.ptx").read_text().count(".target sm_90a") == 1
        assert (kernel_dir / f"{name}.cubin").read_bytes()[:4] == b"\x7fELF"
    for name in ("model.onnx", "model.onnx.data", "io.json", "config.json", "parity/parity.json", "parity/parity.md"):
        assert (tmp_path / "b" / name).stat().st_size > 0, name
    assert steps["parity"]["metrics"]["onnxruntime"]["greedy_match"] == 1.0
    for name in ("cost.json", "cost.md", "cost_by_position.png", "measured_decode.png"):
        assert (tmp_path / "b" / "cost" / name).stat().st_size > 0, name
    cost = json.loads((tmp_path / "b" / "cost" / "cost.json").read_text())
    assert set(cost["measured"]["backends"]) == {"eager dense", "eager DSA", "onnxruntime DSA"}
    assert cost["graph"]["within_goal"]
    assert manifest["target"]["kernel_arch"] == "sm_90a" and manifest["options"]["capacity"] == 256
    assert len(steps["checkpoint"]["checkpoint_fingerprint"]) == 64
    assert all(len(r["fingerprint"]) == 64 for r in steps.values())

    code, out, _ = run_cli(capsys, "build", "--gpu", "h200", "--out", str(tmp_path / "b"), "--capacity", "256")
    again = json.loads((tmp_path / "b" / "manifest.json").read_text())["steps"]
    assert code == 0 and {n: r["status"] for n, r in again.items()} == {
        **dict.fromkeys(steps, "reused"), "engine": "skipped"}  # skipped again: no TensorRT here either
    assert [r["fingerprint"] for r in again.values()] == [r["fingerprint"] for r in steps.values()]


def test_console_script_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dsa_export.cli", "build", "--gpu", "rtx9090"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("dsa-export: error: Invalid value for '--gpu': 'rtx9090' is not one of 'a100'")
    assert proc.stderr.count("\n") == 1 and not list(tmp_path.iterdir())


def test_stage_commands_run_one_stage_in_a_build_directory(capsys, tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "x"
    code, _, err = run_cli(capsys, "export", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                           "--capacity", "128")
    assert code == 0 and (out / "model.onnx").exists(), err
    code, stdout, _ = run_cli(capsys, "parity", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                              "--new-tokens", "4")
    assert code == 0 and "PASSED" in stdout
    code, _, err = run_cli(capsys, "parity", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                           "--new-tokens", "2", "--max-abs-logits", "0", "--min-cosine", "1",
                           "--junit-xml", str(tmp_path / "parity.xml"))
    assert code == 1 and err.startswith("dsa-export: check failed: parity: onnxruntime: max_abs_logits")
    # JUnit XML for CI: a case per backend and metric, the misses as failures with digits enough to see the miss
    import xml.etree.ElementTree as ET

    suite = ET.parse(tmp_path / "parity.xml").getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert {"max_abs_logits", "min_cosine", "max_kl", "top1", "greedy_match", "min_indexer_recall"} <= set(cases)
    assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases.values()) >= 1
    failure = cases["max_abs_logits"].find("failure").get("message")
    assert failure.startswith("onnxruntime: max_abs_logits = ") and failure.endswith("needs <= 0")
    cosine = cases["min_cosine"].find("failure")
    if cosine is not None:  # below 1 by less than 1e-6: shown with the digits that differ from "1"
        assert cosine.get("message").split(" = ")[1].split(",")[0] != "1"
    assert (out / "parity" / "junit.xml").read_bytes() == (tmp_path / "parity.xml").read_bytes()
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert steps["export"]["status"] == "ok" and steps["parity"]["status"] == "failed"
    # a new export makes the parity results of the old one stale: they are removed, not left looking current
    from dsa_export import progress

    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0.01)  # a CI log: plain progress lines on stdout, not bars
    code, stdout, err = run_cli(capsys, "export", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                                "--capacity", "64")
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert code == 0 and "parity" not in steps and not (out / "parity").exists()
    assert "[export] removing what was made from its old outputs: parity" in stdout  # named before it goes
    assert "tracing the graph" in stdout and "writing weights: 100%" in stdout and "\r" not in stdout and not err
    # -q: one line; --json: the summary as JSON and nothing else; -v: every step's record after the summary
    code, stdout, _ = run_cli(capsys, "-q", "deploy", "--out", str(out))
    assert code == 0 and stdout.count("\n") == 1 and " ok" in stdout and "manifest.json" in stdout
    code, stdout, _ = run_cli(capsys, "--json", "deploy", "--out", str(out))
    summary = json.loads(stdout)
    assert code == 0 and summary["passed"] and summary["steps"]["deploy"]["status"] == "reused"
    code, stdout, _ = run_cli(capsys, "-v", "deploy", "--out", str(out))
    assert code == 0 and '"fingerprint"' in stdout and "[deploy] reused" in stdout


def test_bf16_build_checks_parity_against_fp32_and_measures_bf16(capsys, tmp_path):
    code, _, err = run_cli(capsys, "build", "--gpu", "a100", "--dtype", "bfloat16", "--out", str(tmp_path / "b"),
                           "--capacity", "128")
    assert code == 0, err
    steps = json.loads((tmp_path / "b" / "manifest.json").read_text())["steps"]
    assert steps["parity"]["status"] == "ok" and steps["cost"]["status"] == "ok"
    assert steps["smoke"]["tolerance"] == 0.25  # bf16 prefill+decode vs full forward
    assert "sm_80" in steps["kernels"]["path"] and "indexer_chunks_fp8e4m3" not in steps["kernels"]["kernels"]
    io = json.loads((tmp_path / "b" / "io.json").read_text())
    assert io["cache_dtype"] == "bfloat16"  # the export an engine is built from
    # stage commands remember the build: no --dtype, --gpu or --capacity repeated; cost keeps its target and model
    recorded = json.loads((tmp_path / "b" / "manifest.json").read_text())["options"]
    for stage in ("parity", "cost", "deploy"):
        code, stdout, err = run_cli(capsys, stage, "--out", str(tmp_path / "b"))
        assert code == 0 and f"[{stage}] reused" in stdout, (stage, err)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["options"] == recorded
    # an option that differs from the one the build's export was made with is refused, naming both
    code, _, err = run_cli(capsys, "parity", "--out", str(tmp_path / "b"), "--dtype", "float32")
    assert code == 2 and "--dtype float32 differs from the bfloat16 this build's" in err and "export" in err
    assert "leave --dtype out to use the build's, or rebuild with `dsa-export build --dtype float32" in err
    code, _, err = run_cli(capsys, "engine", "--out", str(tmp_path / "b"), "--gpu", "h100")
    assert code == 2 and "--gpu h100 differs from the a100" in err and "kernels" in err
    # an option a previous stage command changed in the manifest is checked against the steps' own options too
    code, _, err = run_cli(capsys, "kernels", "--out", str(tmp_path / "b"), "--seed", "5")
    assert code == 0, err
    code, _, err = run_cli(capsys, "parity", "--out", str(tmp_path / "b"))
    assert code == 2 and "this build's checkpoint, export step(s) were made with --seed 0, its last run used 5" \
        in err, err
    code, _, err = run_cli(capsys, "parity", "--out", str(tmp_path / "b"), "--seed", "0")
    assert code == 0, err
    # the engine was skipped here (no GPU): it made nothing, so a serving shape for deploy conflicts with nothing
    code, _, err = run_cli(capsys, "deploy", "--out", str(tmp_path / "b"), "--max-batch", "16")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["options"] == recorded | {"max_batch": 16}


def test_cost_of_a_small_model_is_not_compared_with_the_papers_671b_figure(capsys, tmp_path, tiny_checkpoint):
    code, out, _ = run_cli(capsys, "cost", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "c"))
    assert code == 0
    cost = json.loads((tmp_path / "c" / "cost" / "cost.json").read_text())
    assert cost["config"]["hidden_size"] == 7168  # modelled: DeepSeek-V3.2-Exp, not tiny's meaningless $
    code, out, _ = run_cli(capsys, "cost", "--preset", "v3.2-exp", "--gpu", "h100", "--out", str(tmp_path / "d"))
    assert code == 0 and json.loads((tmp_path / "d" / "cost" / "cost.json").read_text())["calibration"] is None


def test_a_model_that_does_not_fit_in_memory_is_exported_and_its_eager_stages_skipped(capsys, tmp_path,
                                                                                      tiny_checkpoint, monkeypatch):
    """Where the eager model would not fit this machine's memory, the export (streamed) still runs; smoke and parity
    are recorded as skipped with the reason, and the cost stage reads the graph without timing the eager model."""
    from dsa_export.models import presets

    monkeypatch.setattr(presets.os, "sysconf", lambda name: 1 if name == "SC_PHYS_PAGES" else 4096)  # a 4 KB machine
    out = tmp_path / "big"
    code, stdout, err = run_cli(capsys, "build", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                                "--capacity", "64")
    assert code == 0, err
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    for name in ("smoke", "parity"):
        assert steps[name]["status"] == "skipped"
        assert "of weights in memory, this machine has 0 GB (the export streams its weights" in steps[name]["reason"]
    assert steps["export"]["status"] == "ok" and (out / "model.onnx").exists()
    assert steps["cost"]["status"] == "ok" and steps["cost"]["graph_vs_closed_form"] < 0.1
    assert steps["export"]["peak_rss_gb"] > 0 and "peak memory" in stdout
