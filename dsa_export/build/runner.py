"""Build steps as data, and the one runner that executes them, records them in `manifest.json` and says what it did.

A Step declares what it writes (paths in the build directory), the steps it needs, the options its result depends
on, and what it requires of the machine (`unavailable`: the reason it cannot run here, or None). The runner:
- fingerprints every step before running anything: its options, its inputs (e.g. the checkpoint's own fingerprint),
  the fingerprints of the steps it needs, and the package's source, so a step whose fingerprint matches a finished
  one in the old manifest is reused, and a code change re-runs everything;
- refuses bad input (each step's own checks) before anything is written;
- removes the outputs of every step that is about to run again and of every step downstream of one, so the directory
  never holds outputs of old inputs beside a manifest that does not list them;
- writes the manifest (atomically) after every step: ok, failed, reused, skipped (with the reason and the exact
  command that finishes it on the right machine), interrupted (SIGINT/SIGTERM), pending (not reached);
- ends with a summary table.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dsa_export._version import __version__
from dsa_export.errors import CheckFailure, DSAExportError, Interrupted
from dsa_export.files import ensure_output_dir, write_json_atomic

FINISHED = ("ok", "reused")
RECORD_KEYS = {"status", "fingerprint", "outputs", "seconds", "reason", "command", "signal", "error",  # the runner's
               "peak_rss_gb"}


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Any], dict]  # ctx -> the record's details; "passed": False marks a failed check
    outputs: Callable[[Any], list[Path]]  # ctx -> files and directories it writes (inside the build directory)
    after: tuple[str, ...] = ()  # steps whose outputs it reads
    uses: tuple[str, ...] = ()  # steps whose outputs it reads if they exist (fingerprinted when they do)
    inputs: Callable[[Any], Any] | None = None  # ctx -> what else its result depends on (fingerprinted)
    unavailable: Callable[[Any], str | None] | None = None  # ctx -> why it cannot run on this machine, or None
    finish_command: Callable[[Any], str] | None = None  # ctx -> the command that runs it where it can
    # (ctx, the steps this run will produce) -> raises DSAExportError for bad input, before anything is written
    check: Callable[[Any, set[str]], None] | None = None
    skipped: Callable[[Any], dict] | None = None  # ctx -> what the record of a skipped run says (may refuse: raise)
    doc: str = ""


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes: VmHWM, the high-water mark of its own address space.
    (ru_maxrss is not used: across exec it keeps the parent's high-water mark, so a command started by a large
    process would report that process's memory.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def source_fingerprint() -> str:
    """sha256 over the package's Python sources: any code change invalidates reuse."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def read_manifest(path: Path) -> dict:
    """The previous run's manifest, or {} when there is none or it is unreadable (then nothing is reused)."""
    try:
        manifest = json.loads(path.read_text())
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("steps"), dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Runner:
    steps: tuple[Step, ...]
    log: Callable[[str], None] = print
    manifest: dict = field(default_factory=dict)

    def _by_name(self) -> dict[str, Step]:
        return {s.name: s for s in self.steps}

    def downstream(self, names: set[str]) -> set[str]:
        """`names` and every step that (transitively) reads the outputs of one of them."""
        out = set(names)
        for step in self.steps:  # steps are in dependency order
            if out & set(step.after + step.uses):
                out.add(step.name)
        return out

    def run(self, ctx, only: list[str] | None = None) -> dict:
        """Run the steps (all, or `only` these, reusing the recorded results of the others); return the manifest.
        Raises CheckFailure at the end if a check failed, DSAExportError for bad input or a missing prerequisite."""
        build, options = ctx.build, ctx.options
        manifest_path = build.manifest
        if build.root.exists() and not build.root.is_dir():
            raise DSAExportError(f"{build.root}: output path exists and is not a directory")
        old = read_manifest(manifest_path)
        old_steps = old.get("steps", {})
        selected = [s for s in self.steps if only is None or s.name in only]
        code = source_fingerprint()

        fingerprints: dict[str, str] = {}
        for step in self.steps:
            if step not in selected:  # not run now: what is on disk, if anything
                record = old_steps.get(step.name, {})
                fingerprints[step.name] = record.get("fingerprint", "") if record.get("status") in FINISHED else ""
                continue
            for need in step.after:
                if not fingerprints.get(need):
                    raise DSAExportError(f"step '{step.name}' needs '{need}', which has not run in {build.root}: "
                                         f"run `dsa-export {need} --out {build.root}` (or `dsa-export build`) first")
            fingerprints[step.name] = hashlib.sha256(json.dumps({
                "step": step.name, "code": code, "options": options.used_by(step.name),
                "inputs": step.inputs(ctx) if step.inputs else None,
                "after": [fingerprints.get(n, "") for n in step.after + step.uses]},
                sort_keys=True, default=str).encode()).hexdigest()

        def reusable(step: Step) -> bool:
            record = old_steps.get(step.name, {})
            return (record.get("status") in FINISHED and record.get("fingerprint") == fingerprints[step.name]
                    and all((build.root / p).exists() for p in record.get("outputs", [])))

        def skipped_again(step: Step) -> bool:  # skipped before and still unavailable: the same nothing again
            record = old_steps.get(step.name, {})
            return (record.get("status") == "skipped" and record.get("fingerprint") == fingerprints[step.name]
                    and step.unavailable is not None and step.unavailable(ctx) is not None)

        to_run = {s.name for s in selected if not reusable(s)}
        rerun = {name for name in to_run if not skipped_again(self._by_name()[name])}  # results that change
        for step in selected:
            if step.name not in to_run:
                continue
            if step.check:
                step.check(ctx, rerun)
            reason = step.unavailable(ctx) if step.unavailable else None
            if reason and ctx.required(step.name):
                raise DSAExportError(f"step '{step.name}' cannot run on this machine: {reason}")
        ensure_output_dir(build.root)  # only now: bad input has been refused by the fingerprints and checks above
        stale = self.downstream(rerun)
        for name in stale:  # before any work: no output of old inputs survives beside the new manifest
            for path in old_steps.get(name, {}).get("outputs", []):
                _remove(build.root / path)
        records = {}
        for step in self.steps:  # keep the records of untouched steps (single-step runs)
            if step not in selected and step.name in old_steps and step.name not in stale:
                records[step.name] = old_steps[step.name]
        for step in selected:
            records[step.name] = {"status": "pending", "fingerprint": fingerprints[step.name]}
        self.manifest = {
            "tool": {"dsa_export": __version__, "python": platform.python_version(),
                     "platform": platform.platform(), "code": code, **ctx.tool_versions()},
            "command": sys.argv, "target": ctx.target_json(), "options": options.to_json(), "inputs": ctx.inputs_json(),
            "steps": {s.name: records[s.name] for s in self.steps if s.name in records},
        }
        write_json_atomic(manifest_path, self.manifest)

        for step in selected:
            self._run_step(ctx, step, old_steps.get(step.name, {}), step.name in to_run, manifest_path)
        self.log(self.summary())
        failed = {n: r for n, r in self.manifest["steps"].items() if r["status"] == "failed"}
        if failed:
            raise CheckFailure("; ".join(f"{n}: {', '.join(r.get('failures', [])) or r.get('error', 'see manifest')}"
                                         for n, r in failed.items()) + f" ({manifest_path})")
        return self.manifest

    def _run_step(self, ctx, step: Step, old: dict, rerun: bool, manifest_path: Path) -> None:
        record = self.manifest["steps"][step.name]
        if not rerun:
            record.update({k: v for k, v in old.items() if k not in ("status", "seconds")}, status="reused",
                          seconds=0.0)
            self.log(f"[{step.name}] reused (inputs unchanged)")
            write_json_atomic(manifest_path, self.manifest)
            return
        reason = step.unavailable(ctx) if step.unavailable else None
        if reason:
            record.update(step.skipped(ctx) if step.skipped else {})
            record.update(status="skipped", reason=reason, outputs=[],
                          command=step.finish_command(ctx) if step.finish_command else None)
            self.log(f"[{step.name}] skipped: {reason}")
            write_json_atomic(manifest_path, self.manifest)
            return
        self.log(f"[{step.name}] {step.doc or '...'}")
        start = time.perf_counter()
        record["status"] = "running"
        write_json_atomic(manifest_path, self.manifest)
        try:
            details = step.run(ctx) or {}
            assert not RECORD_KEYS & set(details), f"step {step.name} returned the runner's keys"
            # as written (data files vary), relative to the build directory (which may move)
            record.update(details, outputs=[str(ctx.build.relative(p)) for p in step.outputs(ctx)])
            record["status"] = "failed" if details.get("passed") is False else "ok"
        except KeyboardInterrupt:
            record.update(status="interrupted", signal="SIGINT")
            raise
        except Interrupted as e:
            record.update(status="interrupted", signal=e.signal_name)
            raise
        except BaseException as e:
            record.update(status="failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise
        finally:
            record["seconds"] = round(time.perf_counter() - start, 3)
            record["peak_rss_gb"] = round(peak_rss() / 1e9, 3)
            write_json_atomic(manifest_path, self.manifest)
        self.log(f"[{step.name}] {record['status']} ({record['seconds']:.1f}s)")

    def summary(self) -> str:
        """The table the run ends with: step, status, seconds, outputs, and what the step says about itself."""
        rows = [("step", "status", "seconds", "outputs", "notes")]
        for name, record in self.manifest["steps"].items():
            notes = [record[k] for k in ("reason", "note", "error") if record.get(k)]
            rows.append((name, record["status"], f"{record.get('seconds', 0):.1f}",
                         ", ".join(record.get("outputs", [])) or "-", "; ".join(notes)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 5)
        skipped = [(n, r) for n, r in self.manifest["steps"].items() if r["status"] == "skipped" and r.get("command")]
        lines += [f"to finish {n}: {r['command']}" for n, r in skipped]
        lines.append(f"peak memory {peak_rss() / 1e9:.2f} GB")
        return "\n".join(lines)
