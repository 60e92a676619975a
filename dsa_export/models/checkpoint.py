"""HF-layout checkpoints: `config.json` + one or many `*.safetensors` (+ `model.safetensors.index.json`).

Reading is tensor by tensor (`safe_open`), so peak memory stays near the model's own size; FP8 e4m3 weights with
`weight_scale_inv` block scales are dequantised on load, except the routed experts, which stay FP8 by default (one
byte per parameter; `dsa::RoutedExpertsFP8` reads them); the MTP layer (`model.layers.{num_hidden_layers}`) is
skipped. HF stores each expert's projections separately (`mlp.experts.{e}.gate_proj.weight`, ...); the model stacks
them (`mlp.experts.gate_up_proj` [E,2I,H], `mlp.experts.down_proj` [E,H,I]): `tensor_sources` is that mapping.
Nothing is ever unpickled. Writing goes to a temporary directory that is renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dsa_export.errors import DSAExportError
from dsa_export.files import atomic_dir
from dsa_export.models.config import DSAConfig, load_config
from dsa_export.models.fp8 import FP8, dequantize_weight, quantize_weight
from dsa_export.models.model import DSAForCausalLM

INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = ".weight_scale_inv"
FLOAT_DTYPES = {"F32", "BF16", "F16"}
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", FP8: "F8_E4M3"}


class CheckpointError(DSAExportError):
    pass


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    fp8_ok: bool  # may be stored as FP8 e4m3 with a weight_scale_inv beside it


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16", "F8_E4M3"
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
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: listed in {INDEX_FILE} but missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    return files


def read_headers(path: str | Path) -> dict[str, StoredTensor]:
    """Name → (file, dtype, shape) for every stored tensor, from the safetensors headers only."""
    stored: dict[str, StoredTensor] = {}
    for file in _shard_files(Path(path)):
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    if name in stored:
                        raise CheckpointError(f"tensor '{name}' is stored twice ({stored[name].file.name}, {file.name})")
                    sl = handle.get_slice(name)
                    stored[name] = StoredTensor(file, sl.get_dtype(), tuple(sl.get_shape()))
        except SafetensorError as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e}); truncated or corrupt?") from None
    return stored


def _is_mtp(name: str, config: DSAConfig) -> bool:
    return name.startswith(f"model.layers.{config.num_hidden_layers}.")


def check_tensors(config: DSAConfig, stored: dict[str, StoredTensor],
                  expected: dict[str, TensorSpec] | None = None) -> None:
    """Raise on the first missing, unexpected or wrongly shaped/typed tensor."""
    expected = expected if expected is not None else expected_tensors(config)
    block = config.fp8_block or (128, 128)
    for name, spec in expected.items():
        if name not in stored:
            raise CheckpointError(f"tensor '{name}' is missing")
        got = stored[name]
        if got.shape != spec.shape:
            raise CheckpointError(f"tensor '{name}' has shape {list(got.shape)}, expected {list(spec.shape)}")
        if got.dtype == "F8_E4M3" and spec.fp8_ok:
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
        if name.endswith(SCALE_SUFFIX) and stored.get(owner, None) and stored[owner].dtype == "F8_E4M3":
            continue
        raise CheckpointError(f"tensor '{name}' is unexpected for this config")


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 over config.json, the tokenizer files and every shard's header, size and modification time: identifies
    a checkpoint (and notices it being rewritten in place, as make would) without reading hundreds of GB of
    weights."""
    from dsa_export.models.tokenizer import tokenizer_files

    path = Path(path)
    try:
        digest = hashlib.sha256((path / "config.json").read_bytes())
        for file in tokenizer_files(path):
            digest.update(file.name.encode() + file.read_bytes())
        for file in _shard_files(path):
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(header_len, 100_000_000)))
            stat = file.stat()
            digest.update(f"{stat.st_size} {stat.st_mtime_ns}".encode())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror}: {e.filename})") from None
    return digest.hexdigest()


def experts_stored_fp8(expected: dict[str, TensorSpec], stored: dict[str, StoredTensor]) -> bool:
    """True if every routed expert projection is stored FP8 (as in DeepSeek's checkpoint)."""
    names = [n for n in expected if ".mlp.experts." in n and n.endswith(".weight")]
    return bool(names) and all(stored[n].dtype == "F8_E4M3" for n in names)


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
    block = config.fp8_block or (128, 128)
    params = model.state_dict()
    # disable=None: tqdm draws only on a terminal
    for name in tqdm(params, desc="loading weights", unit="tensor", disable=None if progress else True, leave=False):
        target = params[name]
        sources = tensor_sources(name, config.n_routed_experts)
        for source, where in sources:
            tensor = read(source)
            check_finite(source, tensor)
            if tensor.dtype == FP8:
                tensor = (tensor.view(torch.uint8) if target.dtype == torch.uint8  # kept as FP8 codes
                          else dequantize_weight(tensor, read(source.removesuffix(".weight") + SCALE_SUFFIX), block))
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


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read config.json and every shard's header; raise on the first missing, unexpected or ill-shaped tensor."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    config = load_config(path)
    stored = read_headers(path)
    skeleton = model_skeleton(config)  # built once: it lists the expected tensors and becomes the model
    expected = expected_tensors(config, skeleton)
    check_tensors(config, stored, expected)
    return Checkpoint(path, config, stored, skeleton, experts_stored_fp8(expected, stored))


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


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = True,
                    fp8_experts: bool | None = None) -> DSAForCausalLM:
    """Build the model from an HF-layout directory, one tensor at a time. fp8_experts: keep the routed experts FP8
    with their block scales (default: when the checkpoint stores them so); False dequantises them to `dtype`."""
    checkpoint = open_checkpoint(path)
    config = checkpoint.config
    if fp8_experts and not checkpoint.experts_fp8:
        raise CheckpointError(f"{path}: the routed experts are not stored in FP8, so they cannot be kept in FP8")
    model = checkpoint.skeleton.cast(dtype)
    if checkpoint.experts_fp8 if fp8_experts is None else fp8_experts:
        for experts in model.routed_experts():
            experts.keep_fp8(config.fp8_block or (128, 128))
    model = model.to_empty(device="cpu").init_buffers()
    reader = TensorReader(checkpoint.stored)
    try:
        fill_model(model, reader.rows, progress)
    finally:
        reader.close()
    return model.eval()


# ---- writing ----------------------------------------------------------------------------------------------------------
def random_state_dict(config: DSAConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Seeded random weights for every expected tensor, scaled so activations stay O(1) through the layers."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, spec in expected_tensors(config).items():
        if name.endswith(("layernorm.weight", "norm.weight")):  # RMSNorm/LayerNorm gains near 1
            t = 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
        elif name.endswith(("e_score_correction_bias", "k_norm.bias")):
            t = 0.1 * torch.randn(spec.shape, generator=gen)
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(spec.shape, generator=gen)
        else:  # linear weights [out, in]
            t = torch.randn(spec.shape, generator=gen) / spec.shape[-1] ** 0.5
        keep_fp32 = name.endswith(DSAForCausalLM.FP32_PARAMS)
        state[name] = t.to(torch.float32 if keep_fp32 else dtype)
    return state


def random_model(config: DSAConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> DSAForCausalLM:
    """The model with `random_state_dict`'s weights: what `init` writes for `config`, without the round trip."""
    model = DSAForCausalLM(config).cast(dtype)
    fill_model(model, random_state_dict(config, seed).__getitem__, progress=False)
    return model.init_buffers().eval()


def quantize_state_dict(state: dict[str, torch.Tensor], config: DSAConfig,
                        block: tuple[int, int] = (128, 128)) -> dict[str, torch.Tensor]:
    """FP8 block-quantise the weights that the official checkpoint stores in FP8."""
    specs = expected_tensors(config)
    out = {}
    for name, tensor in state.items():
        if specs[name].fp8_ok:
            out[name], out[name.removesuffix(".weight") + SCALE_SUFFIX] = quantize_weight(tensor, block)
        else:
            out[name] = tensor
    return out


def save_checkpoint(state: dict[str, torch.Tensor], config: DSAConfig, out_dir: str | Path,
                    max_shard_bytes: int = 2 << 30, overwrite: bool = False,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + safetensors shards (+ index when more than one) + extra_files (name → text, e.g. the
    tokenizer) atomically: temp dir, then rename. An existing checkpoint is replaced only with overwrite=True; any
    other non-empty directory never."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / "config.json").exists():
            raise CheckpointError(f"{out_dir}: not empty and not a checkpoint; refusing to replace it")
        if not overwrite:
            raise CheckpointError(f"{out_dir}: already holds a checkpoint; choose another directory (or overwrite "
                                  f"it: init --force)")
    if max_shard_bytes < 1:
        raise CheckpointError(f"the shard size must be > 0 bytes, got {max_shard_bytes}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")
    return out_dir


def init_checkpoint(config: DSAConfig, out_dir: str | Path, seed: int = 0, fp8: bool = False,
                    max_shard_bytes: int = 2 << 30, overwrite: bool = False) -> Path:
    """A seeded random checkpoint in HF layout (bf16, or FP8 with 128×128 block scales), with a small byte-level
    tokenizer and chat template (models/tokenizer.py) when the vocabulary can hold one."""
    from dsa_export.models.tokenizer import small_tokenizer

    state = random_state_dict(config, seed)
    if fp8:
        config = config.replace(quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                     "activation_scheme": "dynamic", "scale_fmt": "ue8m0",
                                                     "weight_block_size": [128, 128]})
        state = quantize_state_dict(state, config)
    else:
        config = config.replace(quantization_config=None)
    tokenizer = small_tokenizer(min(config.vocab_size, 512)) if config.vocab_size >= 260 else None
    return save_checkpoint(state, config, out_dir, max_shard_bytes, overwrite, tokenizer)
