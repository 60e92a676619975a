"""HF-layout checkpoints: `config.json` + one or many `*.safetensors` (+ `model.safetensors.index.json`).

Reading is tensor by tensor (`safe_open`), so peak memory stays near the model's own size; FP8 e4m3 weights with
`weight_scale_inv` block scales are dequantised on load, except the routed experts, which stay FP8 by default (one
byte per parameter; `dsa::RoutedExpertsFP8` reads them); the MTP layer (`model.layers.{num_hidden_layers}`) is
skipped. HF stores each expert's projections separately (`mlp.experts.{e}.gate_proj.weight`, ...); the model stacks
them (`mlp.experts.gate_up_proj` [E,2I,H], `mlp.experts.down_proj` [E,H,I]): `tensor_sources` is that mapping.
Nothing is ever unpickled. Random checkpoints are written by models/init.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from dsa_export.progress import bar as progress_bar

from dsa_export.errors import DSAExportError
from dsa_export.files import regular_file_inside
from dsa_export.formats import FORMATS
from dsa_export.models.config import DSAConfig, load_config
from dsa_export.models.fp8 import FP8, dequantize_weight
from dsa_export.models.model import DSAForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = ".weight_scale_inv"
FLOAT_DTYPES = {f.safetensors for f in FORMATS.values() if f.floating and f.itemsize > 1}  # F32, BF16, F16
FP8_STORED = FORMATS["float8_e4m3fn"].safetensors


class CheckpointError(DSAExportError):
    pass


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    fp8_ok: bool  # may be stored as FP8 e4m3 with a weight_scale_inv beside it


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16", FP8_STORED
    shape: tuple[int, ...]


def model_skeleton(config: DSAConfig) -> DSAForCausalLM:
    """The model on the meta device: names and shapes of every tensor, no memory (works for the 671B preset)."""
    with torch.device("meta"):
        return DSAForCausalLM(config)


# Stacked expert parameter -> the per-expert HF projections it holds, in order along its rows.
EXPERT_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
EXPERT_SCALES = {"gate_up_scale": "gate_up_proj", "down_scale": "down_proj"}
_STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj|gate_up_scale|down_scale)")


def tensor_sources(name: str, num_experts: int) -> list[tuple[str, tuple[int, int] | None]]:
    """The checkpoint tensors a model tensor is made of: [(checkpoint name, (expert, projection) or None)].
    A plain tensor is itself; a stacked expert tensor is row block `projection` of expert `expert`."""
    match = _STACKED.fullmatch(name)
    if match is None:
        return [(name, None)]
    prefix, kind = match.groups()
    suffix = SCALE_SUFFIX if kind in EXPERT_SCALES else ".weight"
    projections = EXPERT_PROJECTIONS[EXPERT_SCALES.get(kind, kind)]
    return [(f"{prefix}.{e}.{proj}{suffix}", (e, p)) for e in range(num_experts) for p, proj in enumerate(projections)]


def source_view(tensor: torch.Tensor, where: tuple[int, int] | None, parts: int) -> torch.Tensor:
    """The part of a (stacked) model tensor that one checkpoint tensor fills (see `tensor_sources`)."""
    if where is None:
        return tensor
    expert, projection = where
    rows = tensor.shape[1] // parts
    return tensor[expert, projection * rows:(projection + 1) * rows]


def expected_tensors(config: DSAConfig, model: DSAForCausalLM | None = None) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint must hold, by HF name (from `model`, the config's skeleton, if the caller has one
    already). FP8 is allowed exactly where the official checkpoint uses it: linear weights (experts included),
    except the LM head and the indexer's weights_proj (the gate is no nn.Linear)."""
    model = model if model is not None else model_skeleton(config)
    fp8_ok = {f"{name}.weight" for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and name != "lm_head" and not name.endswith("weights_proj")}
    specs = {}
    for name, t in model.state_dict().items():
        sources = tensor_sources(name, config.n_routed_experts)
        for source, where in sources:
            shape = tuple(source_view(t, where, len(sources) // config.n_routed_experts).shape)
            specs[source] = TensorSpec(shape, name in fp8_ok or where is not None)
    return specs


# ---- reading ----------------------------------------------------------------------------------------------------------
def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.exists():
        regular_file_inside(index, path, "the checkpoint's index", CheckpointError)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{index}: malformed index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
            raise CheckpointError(f"{index}: malformed index (its weight_map must map tensor names to file names)")
        return [regular_file_inside(f, path, f"shard listed in {INDEX_FILE}", CheckpointError)
                for f in sorted({path / name for name in weight_map.values()})]
    files = [regular_file_inside(f, path, "shard of the checkpoint", CheckpointError)
             for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header


def read_headers(path: str | Path, digest=None) -> dict[str, StoredTensor]:
    """Name → (file, dtype, shape) for every stored tensor, from the safetensors headers only (each read once;
    `digest`, a hashlib object, is fed every header and each file's size and modification time)."""
    stored: dict[str, StoredTensor] = {}
    for file in _shard_files(Path(path)):
        for name, (dtype, shape) in _header(file, digest).items():
            if name in stored:
                raise CheckpointError(f"tensor '{name}' is stored twice ({stored[name].file.name}, {file.name})")
            stored[name] = StoredTensor(file, dtype, shape)
    return stored


def _header(file: Path, digest=None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a safetensors file declares, each checked to lie inside the file (a truncated file is refused)."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: unreadable safetensors file ({why}); truncated or corrupt?")

    try:
        with open(file, "rb") as f:
            stat = os.fstat(f.fileno())
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= min(MAX_HEADER_BYTES, stat.st_size - 8):
                raise corrupt(f"a header of {length:,} bytes in a file of {stat.st_size:,}")
            raw = f.read(length)
        header = json.loads(raw)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise corrupt("its header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    data_bytes = stat.st_size - 8 - length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            valid = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                     and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise corrupt(f"tensor '{name}' has no valid dtype, shape and data_offsets")
        if end > data_bytes:
            raise corrupt(f"tensor '{name}' ends at byte {end:,} of {data_bytes:,}")
        tensors[name] = (dtype, shape)
    if digest is not None:
        digest.update(file.name.encode() + raw + f"{stat.st_size} {stat.st_mtime_ns}".encode())
    return tensors


def _is_mtp(name: str, config: DSAConfig) -> bool:
    return name.startswith(f"model.layers.{config.num_hidden_layers}.")


def check_tensors(config: DSAConfig, stored: dict[str, StoredTensor],
                  expected: dict[str, TensorSpec] | None = None) -> None:
    """Raise on the first missing, unexpected or wrongly shaped/typed tensor."""
    expected = expected if expected is not None else expected_tensors(config)
    block = config.weight_block
    for name, spec in expected.items():
        if name not in stored:
            raise CheckpointError(f"tensor '{name}' is missing")
        got = stored[name]
        if got.shape != spec.shape:
            raise CheckpointError(f"tensor '{name}' has shape {list(got.shape)}, expected {list(spec.shape)}")
        if got.dtype == FP8_STORED and spec.fp8_ok:
            scale_name = name.removesuffix(".weight") + SCALE_SUFFIX
            want = tuple(-(-d // b) for d, b in zip(spec.shape, block))
            scale = stored.get(scale_name)
            if scale is None:
                raise CheckpointError(f"tensor '{scale_name}' is missing (needed by FP8 weight '{name}')")
            if scale.shape != want or scale.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor '{scale_name}' has {scale.dtype}{list(scale.shape)}, "
                                      f"expected a float tensor of shape {list(want)}")
        elif got.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor '{name}' has dtype {got.dtype}, expected one of "
                                  f"{sorted(FLOAT_DTYPES | ({'F8_E4M3'} if spec.fp8_ok else set()))}")
    for name in stored:
        if _is_mtp(name, config) or name in expected:
            continue
        owner = name.removesuffix(SCALE_SUFFIX) + ".weight"
        if name.endswith(SCALE_SUFFIX) and stored.get(owner, None) and stored[owner].dtype == FP8_STORED:
            continue
        raise CheckpointError(f"tensor '{name}' is unexpected for this config")


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over config.json, the tokenizer files and every shard's header, size and modification time: identifies
    a checkpoint (and notices it being rewritten in place, as make would) without reading hundreds of GB of
    weights. `open_checkpoint` computes the same while it reads the headers."""
    return _scan(Path(path))[1]


def _scan(path: Path) -> tuple[dict[str, StoredTensor], str]:
    """(stored tensors, fingerprint), every header read once."""
    from dsa_export.models.tokenizer import tokenizer_files

    try:
        digest = hashlib.sha256((path / "config.json").read_bytes())
        for file in tokenizer_files(path):
            digest.update(file.name.encode() + file.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror}: {e.filename})") from None
    stored = read_headers(path, digest)
    return stored, digest.hexdigest()


def experts_stored_fp8(expected: dict[str, TensorSpec], stored: dict[str, StoredTensor]) -> bool:
    """True if every routed expert projection is stored FP8 (as in DeepSeek's checkpoint)."""
    names = [n for n in expected if ".mlp.experts." in n and n.endswith(".weight")]
    return bool(names) and all(stored[n].dtype == FP8_STORED for n in names)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """A NaN or inf weight poisons every logit downstream: refuse it at load, naming the tensor."""
    if tensor.dtype == FP8:
        bad = bool(((tensor.view(torch.uint8) & 0x7F) == 0x7F).any())  # e4m3fn's NaN codes (it has no inf)
    else:
        bad = tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    if bad:
        raise CheckpointError(f"tensor '{name}' holds non-finite values (NaN or inf)")


def fill_model(model: DSAForCausalLM, read: Callable[[str], torch.Tensor], progress: bool = True) -> DSAForCausalLM:
    """Copy every model tensor from its checkpoint tensors (`read(hf_name)`), one at a time: stacked experts from
    their per-expert projections; FP8 weights dequantised, unless the model keeps them FP8 (then copied as stored)."""
    config = model.config
    block = config.weight_block
    params = model.state_dict()
    for name in progress_bar(params, enabled=progress, desc="loading weights", unit="tensor"):
        target = params[name]
        sources = tensor_sources(name, config.n_routed_experts)
        for source, where in sources:
            tensor = read(source)
            check_finite(source, tensor)
            if tensor.dtype == FP8:
                if target.dtype == torch.int8:  # kept as FP8 codes (model.FP8_CODES)
                    tensor = tensor.view(torch.int8)
                else:
                    scale_name = source.removesuffix(".weight") + SCALE_SUFFIX
                    scale = read(scale_name)
                    check_finite(scale_name, scale)
                    tensor = dequantize_weight(tensor, scale, block)
            source_view(target, where, len(sources) // config.n_routed_experts).copy_(tensor.to(target.dtype))
    return model


@dataclass
class Checkpoint:
    """An HF-layout checkpoint whose headers were read and checked against its config (no weight read yet)."""
    path: Path
    config: DSAConfig
    stored: dict[str, StoredTensor]
    skeleton: DSAForCausalLM  # on the meta device
    experts_fp8: bool  # every routed expert stored FP8 (as in DeepSeek's checkpoint)
    fingerprint: str  # checkpoint_fingerprint


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read config.json and every shard's header; raise on the first missing, unexpected or ill-shaped tensor."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    config = load_config(path)
    stored, fingerprint = _scan(path)
    skeleton = model_skeleton(config)  # built once: it lists the expected tensors
    expected = expected_tensors(config, skeleton)
    check_tensors(config, stored, expected)
    return Checkpoint(path, config, stored, skeleton, experts_stored_fp8(expected, stored), fingerprint)


class TensorReader:
    """Stored tensors, whole or by row block, through safetensors. safetensors memory-maps each file, and every page
    read stays in the process's resident set while the map is open: at most OPEN files are mapped at once (a weight
    and its scale may sit in two shards), and a file is re-opened after RELEASE_BYTES have been read from it, so that
    streaming a checkpoint larger than RAM keeps a bounded resident set."""

    OPEN, RELEASE_BYTES = 2, 128 << 20

    def __init__(self, stored: dict[str, StoredTensor]):
        self.stored = stored
        self._open: dict[Path, list] = {}  # file → [handle, bytes read through it], least recently used first

    def rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of tensor `name` (all of it by default)."""
        file = self.stored[name].file
        entry = self._open.pop(file, None)
        if entry is None or entry[1] > self.RELEASE_BYTES:
            entry = [safe_open(file, framework="pt"), 0]
        self._open[file] = entry
        while len(self._open) > self.OPEN:
            self._open.pop(next(iter(self._open)))
        try:
            if start is None and stop is None:
                tensor = entry[0].get_tensor(name)
            else:
                tensor = entry[0].get_slice(name)[start:stop]
        except SafetensorError as e:
            raise CheckpointError(f"{file}: failed reading tensor '{name}' ({e})") from None
        entry[1] += tensor.numel() * tensor.element_size()
        return tensor

    def close(self) -> None:
        self._open.clear()


def load_checkpoint(path: str | Path | Checkpoint, dtype: torch.dtype = torch.float32, progress: bool = True,
                    fp8_experts: bool | None = None) -> DSAForCausalLM:
    """Build the model from an HF-layout directory (or a checkpoint already opened), one tensor at a time.
    fp8_experts: keep the routed experts FP8 with their block scales (default: when the checkpoint stores them so);
    False dequantises them to `dtype`."""
    checkpoint = path if isinstance(path, Checkpoint) else open_checkpoint(path)
    config = checkpoint.config
    if fp8_experts and not checkpoint.experts_fp8:
        raise CheckpointError(f"{checkpoint.path}: the routed experts are not stored in FP8, so they cannot be kept "
                              f"in FP8")
    model = model_skeleton(config).cast(dtype)  # a model of its own (the opened checkpoint's skeleton stays on meta)
    if checkpoint.experts_fp8 if fp8_experts is None else fp8_experts:
        for experts in model.routed_experts():
            experts.keep_fp8(config.weight_block)
    model = model.to_empty(device="cpu").init_buffers()
    reader = TensorReader(checkpoint.stored)
    try:
        fill_model(model, reader.rows, progress)
    finally:
        reader.close()
    return model.eval()
