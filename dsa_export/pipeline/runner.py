"""Stages as data, and the one runner that executes them, records them in `manifest.json` and says what it did.

A Stage declares what it writes (paths in the build directory), the stages it needs, the options its result depends
on, and what it requires of the machine (`unavailable`: the reason it cannot run here, or None). The runner:
- fingerprints every stage before running anything: its options, its inputs (e.g. the checkpoint's own fingerprint),
  the fingerprints of the stages it needs, and the package's source, so a stage whose fingerprint matches a finished
  one in the old manifest is reused, and a code change re-runs everything;
- removes, before any work, the outputs of every stage that is about to run again and of every stage downstream of
  one, so the directory never holds outputs of old inputs beside a manifest that does not list them;
- writes the manifest (atomically) after every stage: ok, failed, reused, skipped (with the reason and the exact
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

import dsa_export
from dsa_export.errors import CheckFailure, DSAExportError
from dsa_export.files import ensure_output_dir, write_json_atomic

MANIFEST = "manifest.json"
FINISHED = ("ok", "reused")
RECORD_KEYS = {"status", "fingerprint", "outputs", "seconds", "reason", "command", "signal", "error",  # the runner's
               "peak_rss_gb"}


class Interrupted(BaseException):
    """The run was stopped by a signal (SIGTERM; SIGINT arrives as KeyboardInterrupt)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Any], dict]  # ctx -> the record's details; "passed": False marks a failed check
    outputs: Callable[[Any], list[Path]]  # ctx -> files and directories it writes (inside the build directory)
    after: tuple[str, ...] = ()  # stages whose outputs it reads
    uses: tuple[str, ...] = ()  # stages whose outputs it reads if they exist (fingerprinted when they do)
    inputs: Callable[[Any], Any] | None = None  # ctx -> what else its result depends on (fingerprinted)
    unavailable: Callable[[Any], str | None] | None = None  # ctx -> why it cannot run on this machine, or None
    finish_command: Callable[[Any], str] | None = None  # ctx -> the command that runs it where it can
    # (ctx, the stages this run will produce) -> raises DSAExportError for bad input, before anything is written
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
    root = Path(dsa_export.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def read_manifest(path: Path) -> dict:
    """The previous run's manifest, or {} when there is none or it is unreadable (then nothing is reused)."""
    try:
        manifest = json.loads(path.read_text())
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Runner:
    stages: tuple[Stage, ...]
    log: Callable[[str], None] = print
    manifest: dict = field(default_factory=dict)

    def _by_name(self) -> dict[str, Stage]:
        return {s.name: s for s in self.stages}

    def downstream(self, names: set[str]) -> set[str]:
        """`names` and every stage that (transitively) reads the outputs of one of them."""
        out = set(names)
        for stage in self.stages:  # stages are in dependency order
            if out & set(stage.after + stage.uses):
                out.add(stage.name)
        return out

    def run(self, ctx, only: list[str] | None = None) -> dict:
        """Run the stages (all, or `only` these, reusing the recorded results of the others); return the manifest.
        Raises CheckFailure at the end if a check failed, DSAExportError for bad input or a missing prerequisite."""
        layout, options = ctx.layout, ctx.options
        manifest_path = layout.root / MANIFEST
        if layout.root.exists() and not layout.root.is_dir():
            raise DSAExportError(f"{layout.root}: output path exists and is not a directory")
        old = read_manifest(manifest_path)
        old_stages = old.get("stages", {})
        selected = [s for s in self.stages if only is None or s.name in only]
        code = source_fingerprint()

        fingerprints: dict[str, str] = {}
        for stage in self.stages:
            if stage not in selected:  # not run now: what is on disk, if anything
                record = old_stages.get(stage.name, {})
                fingerprints[stage.name] = record.get("fingerprint", "") if record.get("status") in FINISHED else ""
                continue
            for need in stage.after:
                if not fingerprints.get(need):
                    raise DSAExportError(f"stage '{stage.name}' needs '{need}', which has not run in {layout.root}: "
                                         f"run `dsa-export {need} --out {layout.root}` (or `dsa-export build`) first")
            fingerprints[stage.name] = hashlib.sha256(json.dumps({
                "stage": stage.name, "code": code, "options": options.used_by(stage.name),
                "inputs": stage.inputs(ctx) if stage.inputs else None,
                "after": [fingerprints.get(n, "") for n in stage.after + stage.uses]},
                sort_keys=True, default=str).encode()).hexdigest()

        def reusable(stage: Stage) -> bool:
            record = old_stages.get(stage.name, {})
            return (record.get("status") in FINISHED and record.get("fingerprint") == fingerprints[stage.name]
                    and all((layout.root / p).exists() for p in record.get("outputs", [])))

        def skipped_again(stage: Stage) -> bool:  # skipped before and still unavailable: the same nothing again
            record = old_stages.get(stage.name, {})
            return (record.get("status") == "skipped" and record.get("fingerprint") == fingerprints[stage.name]
                    and stage.unavailable is not None and stage.unavailable(ctx) is not None)

        to_run = {s.name for s in selected if not reusable(s)}
        rerun = {name for name in to_run if not skipped_again(self._by_name()[name])}  # results that change
        for stage in selected:
            if stage.name not in to_run:
                continue
            if stage.check:
                stage.check(ctx, rerun)
            reason = stage.unavailable(ctx) if stage.unavailable else None
            if reason and ctx.required(stage.name):
                raise DSAExportError(f"stage '{stage.name}' cannot run on this machine: {reason}")
        ensure_output_dir(layout.root)  # only now: bad input has been refused by the fingerprints and checks above
        stale = self.downstream(rerun)
        for name in stale:  # before any work: no output of old inputs survives beside the new manifest
            for path in old_stages.get(name, {}).get("outputs", []):
                _remove(layout.root / path)
        records = {}
        for stage in self.stages:  # keep the records of untouched stages (single-stage runs)
            if stage not in selected and stage.name in old_stages and stage.name not in stale:
                records[stage.name] = old_stages[stage.name]
        for stage in selected:
            records[stage.name] = {"status": "pending", "fingerprint": fingerprints[stage.name]}
        self.manifest = {
            "tool": {"dsa_export": dsa_export.__version__, "python": platform.python_version(),
                     "platform": platform.platform(), "code": code, **ctx.tool_versions()},
            "command": sys.argv, "target": ctx.target_json(), "options": options.to_json(), "inputs": ctx.inputs_json(),
            "stages": {s.name: records[s.name] for s in self.stages if s.name in records},
        }
        write_json_atomic(manifest_path, self.manifest)

        for stage in selected:
            self._run_stage(ctx, stage, old_stages.get(stage.name, {}), stage.name in to_run, manifest_path)
        self.log(self.summary())
        failed = {n: r for n, r in self.manifest["stages"].items() if r["status"] == "failed"}
        if failed:
            raise CheckFailure("; ".join(f"{n}: {', '.join(r.get('failures', [])) or r.get('error', 'see manifest')}"
                                         for n, r in failed.items()) + f" ({manifest_path})")
        return self.manifest

    def _run_stage(self, ctx, stage: Stage, old: dict, rerun: bool, manifest_path: Path) -> None:
        record = self.manifest["stages"][stage.name]
        if not rerun:
            record.update({k: v for k, v in old.items() if k not in ("status", "seconds")}, status="reused",
                          seconds=0.0)
            self.log(f"[{stage.name}] reused (inputs unchanged)")
            write_json_atomic(manifest_path, self.manifest)
            return
        reason = stage.unavailable(ctx) if stage.unavailable else None
        if reason:
            record.update(stage.skipped(ctx) if stage.skipped else {})
            record.update(status="skipped", reason=reason, outputs=[],
                          command=stage.finish_command(ctx) if stage.finish_command else None)
            self.log(f"[{stage.name}] skipped: {reason}")
            write_json_atomic(manifest_path, self.manifest)
            return
        self.log(f"[{stage.name}] {stage.doc or '...'}")
        start = time.perf_counter()
        record["status"] = "running"
        write_json_atomic(manifest_path, self.manifest)
        try:
            details = stage.run(ctx) or {}
            assert not RECORD_KEYS & set(details), f"stage {stage.name} returned the runner's keys"
            record.update(details, outputs=[str(p) for p in stage.outputs(ctx)])  # as written (data files vary)
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
        self.log(f"[{stage.name}] {record['status']} ({record['seconds']:.1f}s)")

    def summary(self) -> str:
        """The table the run ends with: stage, status, seconds, outputs, and what the stage says about itself."""
        rows = [("stage", "status", "seconds", "outputs", "notes")]
        for name, record in self.manifest["stages"].items():
            notes = [record[k] for k in ("reason", "note", "error") if record.get(k)]
            rows.append((name, record["status"], f"{record.get('seconds', 0):.1f}",
                         ", ".join(record.get("outputs", [])) or "-", "; ".join(notes)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 5)
        skipped = [(n, r) for n, r in self.manifest["stages"].items() if r["status"] == "skipped" and r.get("command")]
        lines += [f"to finish {n}: {r['command']}" for n, r in skipped]
        lines.append(f"peak memory {peak_rss() / 1e9:.2f} GB")
        return "\n".join(lines)
