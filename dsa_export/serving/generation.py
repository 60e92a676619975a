"""Generation as the Triton model repository serves it: the request contract of the `dsa_generate` model, its checks,
token picking and text (tokenizer, chat template, incremental decoding).

Shipped (numpy and HF `tokenizers` only, jinja2 when a chat template is applied: see serving/__init__.py); the
repository writer, the client and the tests import it from here: one definition of the request on both sides.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The generation model's inputs and outputs: name → (Triton dtype, dims, optional). One request carries either
# INPUT_IDS or PROMPT (text, when the build has a tokenizer); the model streams one response per new token.
GENERATE_INPUTS = {
    "INPUT_IDS": ("TYPE_INT64", [-1], True),
    "PROMPT": ("TYPE_STRING", [1], True),
    "APPLY_CHAT_TEMPLATE": ("TYPE_BOOL", [1], True),
    "MAX_NEW_TOKENS": ("TYPE_INT64", [1], False),
    "TEMPERATURE": ("TYPE_FP32", [1], True),
    "TOP_K": ("TYPE_INT64", [1], True),
    "SEED": ("TYPE_INT64", [1], True),
    "STOP_IDS": ("TYPE_INT64", [-1], True),
}
GENERATE_OUTPUTS = {
    "TOKEN": ("TYPE_INT64", [1], False),
    "INDEX": ("TYPE_INT64", [1], False),  # 0, 1, 2, ... per request: the client sees a lost or repeated response
    "TEXT": ("TYPE_STRING", [1], False),  # the text this token completes (UTF-8; empty while a character is split)
}


class RequestError(ValueError):
    """A request the generation model refuses, with one line saying why."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    stop_ids: list[int] = field(default_factory=list)


def check_request(request: GenerationRequest, vocab_size: int, capacity: int) -> None:
    """The checks every request passes before any step runs (the same words as the Python API's)."""
    if not request.prompt_ids:
        raise RequestError("the prompt is empty: send at least one token id (INPUT_IDS) or some text (PROMPT)")
    bad = [t for t in request.prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if request.max_new_tokens < 1:
        raise RequestError(f"MAX_NEW_TOKENS must be >= 1, got {request.max_new_tokens}")
    if len(request.prompt_ids) + request.max_new_tokens - 1 > capacity:
        raise RequestError(f"a prompt of {len(request.prompt_ids)} tokens + {request.max_new_tokens} new tokens does "
                           f"not fit the cache capacity {capacity}")
    if not (math.isfinite(request.temperature) and request.temperature >= 0):
        raise RequestError(f"TEMPERATURE must be a number >= 0, got {request.temperature}")
    if request.top_k < 0:
        raise RequestError(f"TOP_K must be >= 0, got {request.top_k}")
    if request.seed < 0:
        raise RequestError(f"SEED must be >= 0, got {request.seed}")


def pick_token(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """Greedy (temperature 0: the first maximum, as torch.argmax) or sampled from the top_k (0: all) logits."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.size:
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(scaled.size, p=probs / probs.sum()))


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...} (an AddedToken)."""
    return value.get("content") if isinstance(value, dict) else value


class TextCodec:
    """A checkpoint's tokenizer (tokenizer.json) and chat template (tokenizer_config.json), as HF transformers
    applies them: plain text encoded with the tokenizer's special tokens (its BOS), a chat rendered by the jinja
    template (which writes the BOS itself) and encoded without."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: HF uses "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    @staticmethod
    def exists(directory: str | Path) -> bool:
        return (Path(directory) / "tokenizer.json").is_file()

    def render_chat(self, text: str) -> str:
        """The chat template applied to one user message, with the assistant's turn opened."""
        if not self.chat_template:
            raise RequestError("APPLY_CHAT_TEMPLATE: this model's tokenizer_config.json has no chat_template")
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise RequestError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        return env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": text}], add_generation_prompt=True,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            return self.tokenizer.encode(self.render_chat(text), add_special_tokens=False).ids
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self) -> "TextStream":
        return TextStream(self.tokenizer)


class TextStream:
    """Text deltas of generated tokens, one token at a time (tokenizers' DecodeStream: a character whose bytes span
    several tokens is held back until it is complete). finish() returns what is still held (bytes that never formed
    a character, as the replacement character), so the deltas always add up to decode(all tokens)."""

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.decoder = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.text = ""

    def step(self, token: int) -> str:
        self.ids.append(token)
        try:
            delta = self.decoder.step(self.tokenizer, token) or ""
        except Exception:  # an id the tokenizer does not know (the model's vocabulary is padded): no text
            delta = ""
        self.text += delta
        return delta

    def finish(self) -> str:
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta
