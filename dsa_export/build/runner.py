"""Build steps as data, and the one runner that executes them, records them in `manifest.json` and says what it did.

A Step declares what it writes (`outputs`, and the paths it may ever own in a build directory: `owns`), the steps it
needs, the options its result depends on, and what it requires of the machine (`unavailable`: the reason it cannot
run here, or None). The runner:
- fingerprints every step before running anything: its options, its inputs (e.g. the checkpoint's own fingerprint),
  the fingerprints of the steps it needs, and the package's source, so a step whose fingerprint matches a finished
  one in the old manifest is reused, and a code change re-runs everything;
- trusts nothing it did not check: the manifest is data, not instructions (only paths a step owns, inside the build
  directory, are ever removed; a record that names anything else is refused with one line), and reuse verifies
  content: every output file's sha256 is recorded with its stamp (size, mtime, ctime, inode), and a file whose stamp
  moved (written, copied, touched) is hashed again in full and must match;
- refuses bad input (each step's own checks, an output that would overlap what the run reads) before anything is
  written;
- lets one run at a time hold the build directory (a lock), and removes what an interrupted run left;
- has each step write into a staging directory of this run (<out>/.dsa-run-<pid>/<step>); only when the step has
  succeeded do its outputs replace the old ones, which move to the run's trash together with the outputs of every
  step downstream of it (made from what it replaces: it says so first). A rejected input found while a step runs
  rolls the whole run back (old outputs back, the manifest as it was, a build directory this run created removed);
  an interruption keeps the steps that finished; the trash is emptied when the run ends;
- writes the manifest (atomically) after every step: ok, failed, reused, skipped (with the reason and the exact
  command that finishes it on the right machine), interrupted (SIGINT/SIGTERM), pending (not reached);
- ends with a summary table.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from dsa_export._version import __version__
from dsa_export.errors import CheckFailure, DSAExportError, Interrupted
from dsa_export.files import digest, ensure_output_dir, locked, stamp, tree_files, write_json_atomic

FINISHED = ("ok", "reused")
RUN_PREFIX = ".dsa-run-"  # a run's staging and trash, inside the build directory
RECORD_KEYS = {"status", "fingerprint", "outputs", "digests", "seconds", "reason", "command", "signal", "error",
               "peak_rss_gb", "options"}  # the runner's


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Any], dict]  # ctx -> the record's details; "passed": False marks a failed check
    # (ctx, the BuildDir it wrote into) -> the files and directories it wrote there
    outputs: Callable[[Any, Any], list[Path]]
    owns: tuple[str, ...] = ()  # glob patterns of the paths (relative to the build directory) it may ever write
    writes: Callable[[Any], bool] | None = None  # ctx -> whether it writes anything with these options (default yes)
    after: tuple[str, ...] = ()  # steps whose outputs it reads
    uses: tuple[str, ...] = ()  # steps whose outputs it reads if they exist (fingerprinted when they do)
    inputs: Callable[[Any], Any] | None = None  # ctx -> what else its result depends on (fingerprinted)
    unavailable: Callable[[Any], str | None] | None = None  # ctx -> why it cannot run on this machine, or None
    finish_command: Callable[[Any], str] | None = None  # ctx -> the command that runs it where it can
    # (ctx, the steps this run will produce) -> raises DSAExportError for bad input, before anything is written
    check: Callable[[Any, set[str]], None] | None = None
    skipped: Callable[[Any], dict] | None = None  # ctx -> what the record of a skipped run says (may refuse: raise)
    doc: str = ""

    def owns_path(self, relative: str) -> bool:
        """`relative` is a path this step may write: inside the build directory, one of its own names or inside
        one."""
        path = PurePosixPath(relative)
        if path.is_absolute() or not path.parts or ".." in path.parts or path.parts[0] in (".", ""):
            return False
        named = [path, *(p for p in path.parents if str(p) != ".")]
        return any(fnmatch.fnmatchcase(str(p), pattern) for p in named for pattern in self.owns)


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
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def read_manifest(path: Path) -> dict:
    """The previous run's manifest, or {} when there is none or it is not one of ours (then nothing is reused)."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("steps"), dict) else {}


def check_manifest(manifest: dict, steps: dict[str, Step], path: Path) -> None:
    """The manifest is data: every step record a JSON object, its outputs and digests paths the step itself owns.
    Anything else is refused with one line (a manifest is copied between machines with its build directory: whoever
    wrote it must not be able to make a run remove or trust anything else)."""
    def refuse(why: str) -> DSAExportError:
        return DSAExportError(f"{path}: {why}; remove the manifest (the next build starts over) or fix it")

    for name, record in manifest["steps"].items():
        if name not in steps:
            raise refuse(f"it records a step '{name}' that dsa-export does not have")
        if not isinstance(record, dict):
            raise refuse(f"the record of step '{name}' is not a JSON object")
        outputs, digests = record.get("outputs", []), record.get("digests", {})
        if not isinstance(outputs, list) or not all(isinstance(p, str) for p in outputs):
            raise refuse(f"step '{name}' lists its outputs as {outputs!r}, not a list of paths")
        if not isinstance(digests, dict):
            raise refuse(f"step '{name}' records its digests as {type(digests).__name__}, not an object")
        for relative in [*outputs, *digests]:
            if not steps[name].owns_path(relative):
                raise refuse(f"step '{name}' lists output {relative!r}, which is no path of its own inside the "
                             f"build directory")
        for relative, entry in digests.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                    and isinstance(entry.get("stamp"), list)):
                raise refuse(f"step '{name}' records no valid digest for {relative!r}")


def verify(root: Path, record: dict) -> str | None:
    """None if every output the record lists is there with the content it was written with, else what is not. A file
    whose stamp moved is hashed again; if it still matches, its new stamp is kept in the record."""
    if "digests" not in record:
        return "no digests recorded (an older dsa-export wrote it)"
    for relative in record.get("outputs", []):
        if not (root / relative).exists():
            return f"{root / relative} is missing"
    for relative, entry in record["digests"].items():
        path = root / relative
        if not path.is_file():
            return f"{path} is missing"
        now = stamp(path)
        if now == entry["stamp"]:
            continue
        if digest(path) != entry["sha256"]:
            return f"{path} changed since it was written (its sha256 differs)"
        entry["stamp"] = now  # the same content, copied or touched
    return None


def overlaps(path: Path, other: Path) -> bool:
    """One of the two paths is the other or lies inside it."""
    a, b = path.resolve(), other.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_inputs(root: Path, inputs: list[Path], writing: list[Step]) -> None:
    """No output of this run may be, hold, or lie inside a path the run reads (the checkpoint it was given)."""
    for path in inputs:
        if root.resolve() == path.resolve() or root.resolve().is_relative_to(path.resolve()):
            raise DSAExportError(f"the build directory {root} is (inside) {path}, which the build reads: writing "
                                 f"there would change it; use another --out")
        if path.resolve().is_relative_to(root.resolve()):
            relative = str(PurePosixPath(path.resolve().relative_to(root.resolve())))
            owner = next((s for s in writing if s.owns_path(relative) or any(
                overlaps(root / pattern.split("*")[0].rstrip("/"), path) for pattern in s.owns)), None)
            if owner is not None:
                raise DSAExportError(f"{path}, which the build reads, lies where step '{owner.name}' writes in "
                                     f"{root}: use another --out (or move it)")


@dataclass
class Plan:
    """What a run will do, decided before anything is written."""
    selected: list[Step]
    fingerprints: dict[str, str]
    old: dict  # the previous manifest (checked)
    to_run: set[str]  # selected steps that are not reused
    rerun: set[str]  # of those, the ones whose results change (not just skipped again)


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

    # ---- deciding ---------------------------------------------------------------------------------------------------
    def plan(self, ctx, only: list[str] | None) -> Plan:
        """Fingerprints, reuse (content verified), the steps' own checks, overlap with the run's inputs: everything
        that can refuse the run, before it writes anything."""
        root = ctx.build.root
        old = read_manifest(ctx.build.manifest)
        if old:
            check_manifest(old, self._by_name(), ctx.build.manifest)
        old_steps = old.get("steps", {})
        selected = [s for s in self.steps if only is None or s.name in only]
        code = source_fingerprint()

        fingerprints: dict[str, str] = {}
        skipped: dict[str, str] = {}  # not run now, skipped when it last ran: what a step that uses it saw then
        for step in self.steps:
            if step not in selected:  # not run now: what is on disk, if anything
                record = old_steps.get(step.name, {})
                fingerprints[step.name] = record.get("fingerprint", "") if record.get("status") in FINISHED else ""
                if record.get("status") == "skipped":
                    skipped[step.name] = record.get("fingerprint", "")
                continue
            for need in step.after:
                if not fingerprints.get(need):
                    raise DSAExportError(f"step '{step.name}' needs '{need}', which has not run in {root}: run "
                                         f"`dsa-export {need} --out {root}` (or `dsa-export build`) first")
            fingerprints[step.name] = hashlib.sha256(json.dumps({
                "step": step.name, "code": code, "options": ctx.options.used_by(step.name),
                "inputs": step.inputs(ctx) if step.inputs else None,
                "after": [fingerprints.get(n) or skipped.get(n, "") for n in step.after + step.uses]},
                sort_keys=True, default=str).encode()).hexdigest()

        read = {n for s in selected for n in s.after + s.uses} - {s.name for s in selected}
        for name in sorted(read):  # what this run reads of steps it does not run: as they wrote it
            record = old_steps.get(name, {})
            problem = verify(root, record) if record.get("status") in FINISHED else None
            if problem:
                raise DSAExportError(f"{problem}: run `dsa-export {name} --out {root}` again")

        def reusable(step: Step) -> bool:
            record = old_steps.get(step.name, {})
            if record.get("status") not in FINISHED or record.get("fingerprint") != fingerprints[step.name]:
                return False
            problem = verify(root, record)
            if problem:
                self.log(f"[{step.name}] not reused: {problem}")
            return problem is None

        def skipped_again(step: Step) -> bool:  # skipped before and still unavailable: the same nothing again
            record = old_steps.get(step.name, {})
            return (record.get("status") == "skipped" and record.get("fingerprint") == fingerprints[step.name]
                    and step.unavailable is not None and step.unavailable(ctx) is not None)

        to_run = {s.name for s in selected if not reusable(s)}
        rerun = {name for name in to_run if not skipped_again(self._by_name()[name])}
        for step in selected:
            if step.name not in to_run:
                continue
            if step.check:
                step.check(ctx, rerun)
            reason = step.unavailable(ctx) if step.unavailable else None
            if reason and ctx.required(step.name):
                raise DSAExportError(f"step '{step.name}' cannot run on this machine: {reason}")
        check_inputs(root, ctx.input_paths(), [s for s in selected if s.name in rerun
                                               and (s.writes is None or s.writes(ctx))])
        return Plan(selected, fingerprints, old, to_run, rerun)

    # ---- doing ------------------------------------------------------------------------------------------------------
    def run(self, ctx, only: list[str] | None = None) -> dict:
        """Run the steps (all, or `only` these, reusing the recorded results of the others); return the manifest.
        Raises CheckFailure at the end if a check failed, DSAExportError for bad input or a missing prerequisite
        (then the build directory is as it was)."""
        root = ctx.build.root
        if str(root) in ("", "."):
            raise DSAExportError("the build directory (--out) must be named: an empty path would build into the "
                                 "current directory")
        if root.exists() and not root.is_dir():
            raise DSAExportError(f"{root}: output path exists and is not a directory")
        existed = root.is_dir()
        with contextlib.ExitStack() as stack:
            if existed:
                stack.enter_context(locked(root))
            plan = self.plan(ctx, only)
            if not existed:  # only now: bad input has been refused above
                ensure_output_dir(root)
                stack.enter_context(locked(root))
            for leftover in root.glob(f"{RUN_PREFIX}*"):  # an interrupted run's (this one holds the lock)
                shutil.rmtree(leftover, ignore_errors=True)
            run_dir = root / f"{RUN_PREFIX}{os.getpid()}"
            previous = ctx.build.manifest.read_bytes() if ctx.build.manifest.is_file() else None
            try:
                self._execute(ctx, plan, run_dir)
            except DSAExportError:
                self._roll_back(ctx, run_dir, previous, existed)
                raise
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
        self.log(self.summary())
        failed = {n: r for n, r in self.manifest["steps"].items() if r["status"] == "failed"}
        if failed:
            raise CheckFailure("; ".join(f"{n}: {', '.join(r.get('failures', [])) or r.get('error', 'see manifest')}"
                                         for n, r in failed.items()) + f" ({ctx.build.manifest})")
        return self.manifest

    def _execute(self, ctx, plan: Plan, run_dir: Path) -> None:
        old_steps = plan.old.get("steps", {})
        records = {name: record for name, record in old_steps.items()
                   if name not in {s.name for s in plan.selected}}  # untouched steps keep their records
        for step in plan.selected:
            records[step.name] = {"status": "pending", "fingerprint": plan.fingerprints[step.name]}
        self.manifest = {
            "tool": {"dsa_export": __version__, "python": platform.python_version(), "platform": platform.platform(),
                     "code": source_fingerprint(), **ctx.tool_versions()},
            "command": sys.argv, "target": ctx.target_json(), "options": ctx.options.to_json(),
            "inputs": ctx.inputs_json(),
            "steps": {s.name: records[s.name] for s in self.steps if s.name in records},
        }
        self._committed: list[tuple[list[str], list[str]]] = []  # per committed step: (placed, trashed)
        run_dir.mkdir(exist_ok=True)  # from the start: a run killed at any point leaves it for the next run to remove
        self._trash = run_dir / "trash"
        self._write(ctx)
        try:
            for step in plan.selected:
                self._run_step(ctx, step, old_steps.get(step.name, {}), step.name in plan.to_run, run_dir)
        except (KeyboardInterrupt, Interrupted) as e:  # landed between steps: the next one is where the run stopped
            records = [self.manifest["steps"][s.name] for s in plan.selected]
            if not any(r["status"] == "interrupted" for r in records):
                stopped = next((r for r in records if r["status"] in ("pending", "running")), None)
                if stopped is not None:
                    stopped.update(status="interrupted",
                                   signal=e.signal_name if isinstance(e, Interrupted) else "SIGINT")
                    self._write(ctx)
            raise

    def _write(self, ctx) -> None:
        write_json_atomic(ctx.build.manifest, self.manifest)

    def _run_step(self, ctx, step: Step, old: dict, rerun: bool, run_dir: Path) -> None:
        record = self.manifest["steps"][step.name]
        if not rerun:
            record.update({k: v for k, v in old.items() if k not in ("status", "seconds")}, status="reused",
                          seconds=0.0)
            self.log(f"[{step.name}] reused (inputs unchanged)")
            self._write(ctx)
            return
        reason = step.unavailable(ctx) if step.unavailable else None
        if reason:
            record.update(step.skipped(ctx) if step.skipped else {})
            record.update(status="skipped", reason=reason, outputs=[], digests={},
                          command=step.finish_command(ctx) if step.finish_command else None)
            self.log(f"[{step.name}] skipped: {reason}")
            self._write(ctx)
            return
        self.log(f"[{step.name}] {step.doc or '...'}")
        start = time.perf_counter()
        staging = run_dir / step.name
        try:  # from "running" on: a signal that lands even inside this write is recorded as the step's interruption
            record["status"] = "running"
            self._write(ctx)
            ctx.stage_into(staging)  # the step writes its outputs there
            try:
                details = step.run(ctx) or {}
                signalled = ctx.signalled()
                if signalled:  # a library swallowed the signal's exception: the run stops here all the same
                    raise Interrupted(signalled)
                written = [ctx.out.relative(p) for p in step.outputs(ctx, ctx.out)]
            finally:
                ctx.stage_into(None)
            assert not RECORD_KEYS & set(details), f"step {step.name} returned the runner's keys"
            self._commit(ctx, step, staging, written)
            record.update(details, outputs=[str(p) for p in written], digests=self._digests(ctx.build.root, written),
                          options=ctx.options.used_by(step.name))  # what a stage command checks its options against
            record["status"] = "failed" if details.get("passed") is False else "ok"
        except KeyboardInterrupt:
            record.update(status="interrupted", signal="SIGINT")
            raise
        except Interrupted as e:
            record.update(status="interrupted", signal=e.signal_name)
            raise
        except DSAExportError:
            raise  # bad input: the run rolls back (and the manifest with it)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                record.update(status="failed", error=str(e).splitlines()[0])
                raise
            # the machine, not the tool: no space, a read-only or forbidden place; the run rolls back
            raise DSAExportError(f"{e.filename or ctx.build.root}: {e.strerror} (step '{step.name}')") from None
        except BaseException as e:
            signalled = ctx.signalled()
            if signalled:  # a signal that surfaced as another exception inside a library
                record.update(status="interrupted", signal=signalled)
            else:
                record.update(status="failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise
        finally:
            record["seconds"] = round(time.perf_counter() - start, 3)
            record["peak_rss_gb"] = round(peak_rss() / 1e9, 3)
            if record["status"] != "running" or ctx.signalled():
                self._write(ctx)
        self.log(f"[{step.name}] {record['status']} ({record['seconds']:.1f}s)")

    def _commit(self, ctx, step: Step, staging: Path, written: list[Path]) -> None:
        """The step's new outputs replace its old ones; the outputs of every step downstream of it (made from what it
        replaces) go too, named first. What leaves goes to the run's trash (back where it was on a rollback)."""
        root = ctx.build.root
        records = self.manifest["steps"]
        old = [p for p in records.get(step.name, {}).get("outputs", []) if (root / p).exists()]
        stale = sorted(self.downstream({step.name}) - {step.name})
        derived = [(name, p) for name in stale for p in records.get(name, {}).get("outputs", [])
                   if (root / p).exists()]
        if derived:
            self.log(f"[{step.name}] removing what was made from its old outputs: "
                     + ", ".join(f"{p} ({name})" for name, p in derived))
        leaving = sorted({*old, *(str(p) for p in written if (root / p).exists()), *(p for _, p in derived)})
        trashed = []
        for relative in leaving:
            if any(overlaps(root / relative, path) for path in ctx.input_paths()):
                continue  # never what the run reads
            (self._trash / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(root / relative, self._trash / relative)
            trashed.append(relative)
        placed = []
        for relative in written:
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, root / relative)
            placed.append(str(relative))
        self._committed.append((placed, trashed))
        for name in stale:  # their outputs are gone: they run again (pending) or are no longer recorded
            if records.get(name, {}).get("status") != "pending":
                records.pop(name, None)
        ctx.committed(step.name, staging)

    @staticmethod
    def _digests(root: Path, written: list[Path]) -> dict:
        return {str(f.relative_to(root)): {"sha256": digest(f), "stamp": stamp(f)}
                for relative in written for f in tree_files(root / relative)}

    def _roll_back(self, ctx, run_dir: Path, previous: bytes | None, existed: bool) -> None:
        """Bad input found while a step ran: everything this run placed goes, what it displaced comes back, the
        manifest is as it was (a build directory this run created is removed)."""
        root = ctx.build.root
        for placed, trashed in reversed(getattr(self, "_committed", [])):
            for relative in placed:
                path = root / relative
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
            for relative in trashed:
                os.replace(self._trash / relative, root / relative)
        if previous is None:
            ctx.build.manifest.unlink(missing_ok=True)
        else:
            ctx.build.manifest.write_bytes(previous)
        if not existed:
            shutil.rmtree(root, ignore_errors=True)

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
