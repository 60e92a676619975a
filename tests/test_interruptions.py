"""A build killed at several points (SIGTERM, SIGKILL, SIGINT) never leaves an artifact that looks complete but is not,
records what happened, and a rerun finishes it, reusing what was done; a rerun with other inputs interrupted over a
complete build leaves no output of the old inputs. Outputs are readable by others, as `cp` would leave them."""

import json
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

BUILD = ["build", "--gpu", "h100", "--capacity", "96", "--new-tokens", "4"]


def start(out: Path, *extra: str) -> subprocess.Popen:
    code = "import os, sys; os.umask(0o022); from dsa_export.cli import main; sys.exit(main())"  # as the console script
    return subprocess.Popen([sys.executable, "-c", code, *BUILD, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def steps(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text())["steps"]
    except (OSError, json.JSONDecodeError, KeyError):
        return {}


def kill_when_running(proc: subprocess.Popen, out: Path, stage: str, sig: int, delay: float) -> tuple[int, str]:
    """Send `sig` `delay` seconds after the manifest shows `stage` running; (exit code, stderr)."""
    deadline = time.time() + 120
    while steps(out).get(stage, {}).get("status") != "running":
        assert proc.poll() is None, f"the build ended before {stage} ran: {proc.communicate()}"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def assert_nothing_half_written(out: Path) -> None:
    """What exists is complete: model.onnx only with its data, io.json and config.json; a kernel's .json only with
    its .ptx and .cubin; a report only whole; no temporary files left that a reader could mistake."""
    if (out / "model.onnx").exists():
        assert all((out / f).stat().st_size > 0 for f in ("model.onnx.data", "io.json", "config.json"))
    for meta in out.glob("kernels/*/*.json"):
        assert meta.with_suffix(".ptx").exists() and meta.with_suffix(".cubin").exists()
    for report in ("parity/parity.json", "cost/cost.json"):
        if (out / report).exists():
            json.loads((out / report).read_text())
    recorded = steps(out)
    for name, record in recorded.items():
        if record["status"] in ("ok", "reused"):
            assert all((out / p).exists() for p in record["outputs"]), name


def test_interrupted_builds_leave_nothing_half_written_and_reruns_finish(tmp_path):
    out = tmp_path / "b"
    # SIGTERM while the kernels compile: recorded, like SIGINT; exit 143
    code, err = kill_when_running(start(out), out, "kernels", signal.SIGTERM, 0.3)
    assert code == 143 and err.strip() == "dsa-export: interrupted (SIGTERM)"
    assert steps(out)["kernels"] == {**steps(out)["kernels"], "status": "interrupted", "signal": "SIGTERM"}
    assert steps(out)["export"]["status"] == "pending"
    assert_nothing_half_written(out)

    # SIGKILL in the middle of the export: no model.onnx; the manifest still says where it stopped
    code, _ = kill_when_running(start(out), out, "export", signal.SIGKILL, 2.0)
    assert code == -signal.SIGKILL
    assert steps(out)["export"]["status"] == "running" and steps(out)["checkpoint"]["status"] == "reused"
    assert not (out / "model.onnx").exists()
    assert_nothing_half_written(out)

    # a rerun finishes it, reusing what was done
    proc = start(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    done = steps(out)
    assert {done[s]["status"] for s in ("checkpoint", "smoke", "kernels")} == {"reused"}
    assert done["export"]["status"] == done["parity"]["status"] == done["cost"]["status"] == "ok"
    assert_nothing_half_written(out)
    assert_readable_by_others(out)

    # other inputs (a larger capacity) over the complete build, interrupted: the old export and what was made from it
    # stay as they were (new outputs replace old ones only when their step succeeds), and the manifest no longer
    # vouches for them; the run's staging is gone
    before = {p: p.read_bytes() for p in (out / "model.onnx", out / "model.onnx.data", out / "parity" / "parity.json")}
    code, _ = kill_when_running(start(out, "--capacity", "128"), out, "export", signal.SIGTERM, 0.5)
    assert code == 143
    now = steps(out)
    assert now["export"]["status"] == "interrupted" and now["parity"]["status"] == "pending"
    assert now["kernels"]["status"] == "reused"
    assert {p: p.read_bytes() for p in before} == before
    assert not list(out.glob(".dsa-run-*")) and not list(out.rglob(".export.*"))
    assert_nothing_half_written(out)

    # a kill -9 leaves the run's staging behind: the next run removes it
    kill_when_running(start(out, "--capacity", "128"), out, "export", signal.SIGKILL, 0.5)
    assert list(out.glob(".dsa-run-*"))
    proc = start(out, "--capacity", "128")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert not list(out.glob(".dsa-run-*")) and steps(out)["export"]["capacity"] == 128


def assert_readable_by_others(out: Path) -> None:
    """0644 files and 0755 directories under umask 022, the checkpoint, kernels and reports included."""
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), f"{path.relative_to(out)}: {oct(mode)}"


def test_a_manifest_from_another_tool_or_garbage_is_not_trusted(tmp_path, capsys):
    from dsa_export.cli import main

    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text("{ garbage")
    assert main(["export", "--out", str(out), "--capacity", "16"]) == 0
    assert steps(out)["export"]["status"] == "ok"  # nothing reused from an unreadable manifest


# (step to interrupt, seconds after it starts running, signal): 20 signals through the steps of a build that take
# long enough to be hit anywhere (the kernels' compilation, the export's tracing, streaming and checks, parity, the
# measured cost). Each run resumes from what the runs before it finished.
SIGNALS = [("kernels", d, s) for d, s in ((0.0, signal.SIGTERM), (0.3, signal.SIGINT), (0.8, signal.SIGTERM),
                                          (1.5, signal.SIGINT), (2.5, signal.SIGTERM))] + \
          [("export", d, s) for d, s in ((0.0, signal.SIGINT), (0.3, signal.SIGTERM), (0.8, signal.SIGINT),
                                         (1.5, signal.SIGTERM), (2.5, signal.SIGINT), (3.5, signal.SIGTERM))] + \
          [("parity", d, s) for d, s in ((0.0, signal.SIGTERM), (0.15, signal.SIGINT), (0.3, signal.SIGTERM),
                                         (0.5, signal.SIGINT))] + \
          [("cost", d, s) for d, s in ((0.0, signal.SIGINT), (0.3, signal.SIGTERM), (0.6, signal.SIGINT),
                                       (1.0, signal.SIGTERM), (1.5, signal.SIGINT))]


def test_twenty_timed_signals_never_show_a_traceback_or_leave_temporary_data(tmp_path):
    out = tmp_path / "b"
    interrupted = 0
    for step, delay, sig in SIGNALS:
        proc = start(out)
        deadline = time.time() + 120
        while steps(out).get(step, {}).get("status") != "running" and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.02)
        if proc.poll() is None:
            time.sleep(delay)
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err and err.count("\n") <= 1, (step, delay, err)
        if proc.returncode != 0:  # the build may have finished within the delay (then the signal is ignored)
            expected = 130 if sig == signal.SIGINT else 143
            assert proc.returncode == expected and err.strip() == f"dsa-export: interrupted " \
                f"({'SIGINT' if sig == signal.SIGINT else 'SIGTERM'})", (step, delay, err)
            assert "interrupted" in {r["status"] for r in steps(out).values()}  # this step, or the next one
            interrupted += 1
        assert_nothing_half_written(out)
    assert interrupted >= 18
    proc = start(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert {r["status"] for r in steps(out).values()} <= {"ok", "reused", "skipped"}
    assert not list(out.glob(".dsa-run-*")) and not list(out.rglob(".export.*")) and not list(out.rglob(".*.tmp*"))
    assert_nothing_half_written(out)


def test_a_signal_after_the_command_is_over_is_ignored_while_the_program_exits():
    """Ctrl-C (or SIGTERM) that comes as the program exits, after its command finished: exit with the command's own
    code and nothing printed (not a KeyboardInterrupt from an atexit callback, not a death by signal)."""
    code = ("import os, signal, sys, time; from dsa_export.cli import main; code = main(); "
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code, "plan", "--preset", "tiny", "--gpu", "h100"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "h100" in proc.stdout


def test_a_signal_inside_a_deferred_block_stops_the_command_once_the_block_ends():
    """errors.signals_deferred under the command line's handlers: a SIGTERM sent inside the block (while another
    thread runs, as torch's do: a signal mask would not hold it) is noted, the block runs to its end, then the
    command stops as interrupted, in one line."""
    code = ("import os, signal, sys, threading, time, click\n"
            "from dsa_export import cli, errors\n"
            "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
            "@cli.cli.command('probe')\n"
            "def probe():\n"
            "    with errors.signals_deferred():\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(0.3)\n"
            "        print('block done', flush=True)\n"
            "    print('after the block', flush=True)\n"
            "sys.exit(cli.main(['probe']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "block done\n" and proc.returncode == 128 + signal.SIGTERM, (proc.stdout, proc.stderr)
    assert proc.stderr == "dsa-export: interrupted (SIGTERM)\n"
