"""Every option of every build step, declared once: a frozen dataclass whose fields carry their command-line metadata
(flag type and help, and the steps that read them). The CLI builds each command's flags from here, the runner
fingerprints each step over the options it reads, the manifest records them. Light on purpose (no torch): the CLI
imports it to register its commands."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from dsa_export.cost.assumptions import Assumptions
from dsa_export.errors import DSAExportError
from dsa_export.formats import ALIASES, MODEL_DTYPES
from dsa_export.models.presets import PRESETS
from dsa_export.parity.thresholds import Thresholds
from dsa_export.targets import TARGETS

class FiniteFloat(click.FloatRange):
    """A float (in a range) that refuses nan and inf, which every range comparison lets through."""
    name = "float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class OutputPath(click.Path):
    """A path to write to; an empty one (which would mean the current directory) is refused."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("the path is empty (it would mean the current directory): name the directory", param, ctx)
        return super().convert(value, param, ctx)


SEED = click.IntRange(0, 2**63 - 1)  # numpy's and torch's generators take 64-bit seeds

# those that read the model source
MODEL_STEPS = ("checkpoint", "smoke", "kernels", "export", "parity", "cost", "plan")
DTYPE_CHOICES = sorted([*MODEL_DTYPES, *(alias for alias, name in ALIASES.items() if name in MODEL_DTYPES)])


def option(default: Any, help: str, type: Any = None, steps: tuple[str, ...] = (), flag: bool = False,
           fingerprint: bool = True) -> Any:
    """A field with its click metadata. steps: the build steps whose result depends on it (all if empty);
    fingerprint: False for options that change where results go, not what they are."""
    return field(default=default, metadata={"help": help, "type": type, "steps": steps, "flag": flag,
                                            "fingerprint": fingerprint})


@dataclass(frozen=True)
class Options:
    gpu: str = option("h100", "Target GPU (one engine and one set of kernels per compute capability).",
                      click.Choice(list(TARGETS), case_sensitive=False))
    out: Path | None = option(None, "Build directory [default: build/<gpu>].", OutputPath(path_type=Path),
                              fingerprint=False)
    # the model
    checkpoint: Path | None = option(None, "HF-layout checkpoint directory [default: a seeded random checkpoint of "
                                     "--preset, written to <out>/checkpoint].",
                                     click.Path(path_type=Path, exists=True, file_okay=False), steps=MODEL_STEPS)
    preset: str = option("tiny", "Built-in config when no --checkpoint is given.", click.Choice(list(PRESETS)),
                         steps=MODEL_STEPS)
    seed: int = option(0, "Seed of the preset's random weights and of the parity prompts.", SEED,
                       steps=MODEL_STEPS)
    dtype: str = option("float32", "Weights and caches of the eager model and of the export (ONNX Runtime on CPU "
                        "runs float32; parity of a bfloat16 build compares a float32 twin).",
                        click.Choice(DTYPE_CHOICES), steps=("smoke", "export", "parity", "cost", "plan"))
    # export
    capacity: int | None = option(None, "The longest sequence (prompt and new tokens) [default: min(max positions, "
                                  "128K)]; the cache pool is shared, not allocated per sequence (--pool-tokens).",
                                  click.IntRange(min=4), steps=("export", "plan", "deploy"))
    dequantize_experts: bool = option(False, "Store FP8 routed experts in --dtype instead of keeping them FP8 with "
                                      "their block scales.", steps=("export", "plan"), flag=True)
    gpus: int | None = option(None, "GPUs to cut the model across: pipeline stages of contiguous layers, balanced by "
                              "memory, one graph and engine each [default: the fewest that fit the target].",
                              click.IntRange(min=1), steps=("export", "engine", "plan"))
    gpus_per_node: int = option(8, "GPUs per node: the pipeline stages go to nodes in order, this many to a node "
                                "(`plan` shows each node's stages and memory; `deploy` writes a model for each stage "
                                "on a node after the first).", click.IntRange(min=1, max=64),
                                steps=("plan", "deploy"))
    data_file_gb: float = option(4.0, "Largest external data file of the export (GB; a single tensor larger than "
                                 "that gets a file of its own).", FiniteFloat(min=0.001),
                                 steps=("export",))
    # engine
    precision: str = option("auto", "Precision the engine must have (TensorRT is strongly typed: it comes from the "
                            "export): auto = the export's; fp8 = FP8 routed experts (not on a100).",
                            click.Choice(["auto", "float32", "bfloat16", "fp8"]), steps=("engine",))
    max_batch: int = option(8, "Most sequences in one step (the engine's profile; the server's batch).",
                            click.IntRange(min=1), steps=("engine", "plan", "deploy"))
    max_tokens: int = option(8192, "Most tokens in one step: the running sequences' next tokens plus chunks of "
                             "prompts (chunked prefill).", click.IntRange(min=1), steps=("engine", "plan", "deploy"))
    pool_tokens: int | None = option(None, "Tokens the cache pool of each pipeline stage holds, all sequences together "
                                     "[default: max-batch x capacity].", click.IntRange(min=1),
                                     steps=("engine", "plan", "deploy"))
    workspace_gb: float = option(4.0, "TensorRT builder workspace limit (GB).", FiniteFloat(min=0, min_open=True),
                                 steps=("engine", "plan"))
    require_engine: bool = option(False, "Fail (exit 2) if the TensorRT engine cannot be built on this machine.",
                                  steps=("engine",), flag=True, fingerprint=False)
    # parity
    new_tokens: int = option(32, "Greedy tokens generated per parity prompt.", click.IntRange(min=1),
                             steps=("parity",))
    thresholds: Thresholds = option(Thresholds(), "Parity threshold.", steps=("parity",))
    junit_xml: Path | None = option(None, "Also write the parity verdicts as JUnit XML to this file (for CI test "
                                    "reports; <out>/parity/junit.xml has them too).", OutputPath(path_type=Path,
                                                                                                dir_okay=False),
                                    steps=("parity",), fingerprint=False)
    # cost
    price: float = option(2.0, "USD per GPU-hour.", FiniteFloat(min=0, min_open=True), steps=("cost",))
    threads: int = option(1, "CPU threads of torch and ONNX Runtime for the measured decode steps (and the build's "
                          "ONNX Runtime sessions): 1 gives steady timings on shared cores; more, the machine's speed.",
                          click.IntRange(min=1, max=1024), steps=("cost",))
    assumptions: Assumptions = option(Assumptions(), "Cost-model assumption.", steps=("cost",))

    def __post_init__(self):
        target = TARGETS.get(str(self.gpu).lower())
        if self.precision == "fp8" and target is not None and not target.fp8:
            fp8 = ", ".join(name for name, t in TARGETS.items() if t.fp8)
            raise DSAExportError(f"--precision fp8: {target.name} ({target.kernel_arch}) has no FP8 (GPUs with FP8: "
                                 f"{fp8})")

    @property
    def build_root(self) -> Path:
        """The build directory: --out, else build/<gpu>."""
        return Path(self.out) if self.out else Path("build") / str(self.gpu).lower()

    @property
    def source(self) -> str:
        return str(self.checkpoint) if self.checkpoint is not None else self.preset

    def used_by(self, step: str) -> dict[str, Any]:
        """The options `step`'s result depends on (its fingerprint)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata["fingerprint"]
                and (not f.metadata["steps"] or step in f.metadata["steps"])}

    def to_json(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value) if isinstance(value, Path) else value


def _nested(f: dataclasses.Field) -> type | None:
    """The dataclass a field groups (thresholds, assumptions), whose own fields become flags."""
    return type(f.default) if dataclasses.is_dataclass(f.default) else None


def click_options(steps: tuple[str, ...] | None, defaults: dict[str, Any] | None = None) -> Callable:
    """A decorator adding the flags of every option read by `steps` (None: every option); `defaults` overrides some
    defaults for one command (e.g. cost's default preset is the 671B model)."""
    defaults = defaults or {}

    def wanted(f: dataclasses.Field) -> bool:
        return steps is None or not f.metadata["steps"] or any(s in f.metadata["steps"] for s in steps)

    def decorate(command):
        for f in reversed(dataclasses.fields(Options)):
            if not wanted(f):
                continue
            group = _nested(f)
            if group is not None:
                for g in reversed(dataclasses.fields(group)):
                    command = click.option(f"--{g.name.replace('_', '-')}", g.name, type=FiniteFloat(),
                                           default=g.default,
                                           show_default=True, help=f.metadata["help"])(command)
                continue
            default = defaults.get(f.name, f.default)
            command = click.option(f"--{f.name.replace('_', '-')}", f.name, type=f.metadata["type"],
                                   is_flag=f.metadata["flag"], default=default,
                                   show_default=default is not None and not f.metadata["flag"],
                                   help=f.metadata["help"])(command)
        return command

    return decorate


def options_from(values: dict[str, Any]) -> Options:
    """Options from a command's flag values (flags a command does not have keep their defaults)."""
    kwargs = {}
    for f in dataclasses.fields(Options):
        group = _nested(f)
        if group is not None:
            kwargs[f.name] = group(**{g.name: values[g.name] for g in dataclasses.fields(group) if g.name in values})
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    if isinstance(kwargs.get("gpu"), str):
        kwargs["gpu"] = kwargs["gpu"].lower()
    return Options(**kwargs)


def with_recorded(values: dict[str, Any], given: set[str], recorded: dict[str, Any]) -> dict[str, Any]:
    """A step command's option values: those given on the command line, else the build's as its manifest recorded
    them (every option, also those the command has no flag for), else the defaults, so that a stage command on a
    build needs no repeated options and leaves the recorded ones as they were."""
    out = dict(values)
    for f in dataclasses.fields(Options):
        if not f.metadata["fingerprint"] or f.name not in recorded:
            continue
        group = _nested(f)
        old_values = recorded[f.name] if group is not None else {f.name: recorded[f.name]}
        if not isinstance(old_values, dict):
            continue
        for name, old in old_values.items():
            if name not in given:
                out[name] = Path(old) if old is not None and "Path" in str(f.type) else old
    return out


def _comparable(name: str, value: Any) -> Any:
    return ALIASES.get(value, value) if name == "dtype" and isinstance(value, str) else value


def check_upstream(options: Options, given: set[str], upstream: dict[str, dict], manifest: Path) -> None:
    """Refuse options that differ from those the upstream steps' outputs (which this command reads and does not
    remake) were made with (upstream: step name → its manifest record, finished ones): one line naming both."""
    differ: dict[str, tuple[Any, Any, list[str]]] = {}
    for step, record in upstream.items():
        made_with = record.get("options")
        if not isinstance(made_with, dict):
            continue
        for name, now in options.used_by(step).items():
            if name in made_with and not isinstance(now, dict) and                     _comparable(name, now) != _comparable(name, made_with[name]):
                differ.setdefault(name, (now, made_with[name], []))[2].append(step)
    for name, (now, old, steps) in differ.items():
        flag, which = f"--{name.replace('_', '-')}", ", ".join(steps)
        if name in given:
            raise DSAExportError(f"{flag} {now} differs from the {old} this build's {which} step(s) were made with "
                                 f"({manifest}): leave {flag} out to use the build's, or rebuild with "
                                 f"`dsa-export build {flag} {now} --out {manifest.parent}`")
        raise DSAExportError(f"this build's {which} step(s) were made with {flag} {old}, its last run used {now} "
                             f"({manifest}): give {flag} {old}, or rebuild with `dsa-export build --out "
                             f"{manifest.parent}`")
