"""Generation as the Triton model repository serves it: the request contract of the `dsa_generate` model, its checks,
and text (tokenizer, chat template, incremental decoding).

Shipped (numpy and HF `tokenizers` only, jinja2 when a chat template is applied: see serving/__init__.py); the
repository writer, the client and the tests import it from here: one definition of the request on both sides.
Tokens are picked in the exported graph (models/sampling.py), not here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# The generation model's inputs and outputs: name → (Triton dtype, dims, optional). One request carries either
# INPUT_IDS or PROMPT (text, when the build has a tokenizer); the model streams one response per new token.
GENERATE_INPUTS = {
    "INPUT_IDS": ("TYPE_INT64", [-1], True),
    "PROMPT": ("TYPE_STRING", [1], True),
    "APPLY_CHAT_TEMPLATE": ("TYPE_BOOL", [1], True),
    "MAX_NEW_TOKENS": ("TYPE_INT64", [1], False),
    "TEMPERATURE": ("TYPE_FP32", [1], True),
    "TOP_K": ("TYPE_INT64", [1], True),
    "TOP_P": ("TYPE_FP32", [1], True),
    "SEED": ("TYPE_INT64", [1], True),
    "STOP_IDS": ("TYPE_INT64", [-1], True),
}
# A response carries the request's new tokens since its last one: usually one, more when they come faster than
# responses can be sent.
GENERATE_OUTPUTS = {
    "TOKEN": ("TYPE_INT64", [-1], False),
    "INDEX": ("TYPE_INT64", [-1], False),  # 0, 1, 2, ... per request: the client sees a lost or repeated token
    "TEXT": ("TYPE_STRING", [1], False),  # the text these tokens complete (UTF-8; empty while a character is split)
    "LOGPROB": ("TYPE_FP32", [-1], False),  # the model's log-probability of each token
}
MAX_STOP_IDS = 1024


def max_prompt_bytes(capacity: int) -> int:
    """The largest text prompt taken (UTF-8 bytes): 16 per token of the capacity (text averages about 4), at least
    1 MiB. Larger is refused before it is tokenized."""
    return max(1 << 20, 16 * capacity)


class RequestError(ValueError):
    """A request the generation model refuses, with one line saying why."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: list[int] = field(default_factory=list)


def check_request(request: GenerationRequest, vocab_size: int, capacity: int) -> None:
    """The checks every request passes before any step runs (the same words as the Python API's)."""
    if not request.prompt_ids:
        raise RequestError("the prompt is empty: send at least one token id (INPUT_IDS) or some text (PROMPT)")
    if len(request.prompt_ids) > capacity:
        raise RequestError(f"a prompt of {len(request.prompt_ids)} tokens does not fit the cache capacity {capacity}")
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
    if not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
        raise RequestError(f"TOP_P must be in (0, 1], got {request.top_p}")
    if not 0 <= request.seed < 2**63:
        raise RequestError(f"SEED must be >= 0, got {request.seed}")
    if len(request.stop_ids) > MAX_STOP_IDS:
        raise RequestError(f"at most {MAX_STOP_IDS} STOP_IDS, got {len(request.stop_ids)}")


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...} (an AddedToken)."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


# Limits of what text work may cost (TextWorker enforces them in a process of its own).
TEXT_SECONDS = 5.0  # one encode or chat rendering
TEXT_MEMORY_BYTES = 4 << 30  # the worker process's address space
MAX_RENDERED_CHARS = 4 << 20  # a rendered chat
MAX_CONFIG_BYTES = 16 << 20  # tokenizer_config.json
# Stand-ins for message contents while the template renders (private-use characters no tokenizer merges away): the
# contents are then encoded apart, with special tokens off, so that text a user sends stays text (no forged turns).
_MARK = "\ue000{}\ue001"


class TextCodec:
    """A checkpoint's tokenizer (tokenizer.json) and chat template (tokenizer_config.json), as HF transformers
    applies them: plain text encoded with the tokenizer's special tokens (its BOS), a chat rendered by the jinja
    template (which writes the BOS itself) and encoded without. Special tokens inside what a user sends (a prompt, a
    message's content) stay text. A file that is not what it should be is a ValueError with one line."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        try:
            self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # tokenizers raises its own error types
            raise ValueError(f"{directory / 'tokenizer.json'}: not a tokenizer ({str(e).splitlines()[0][:200]})") \
                from None
        config_path = directory / "tokenizer_config.json"
        config = {}
        if config_path.is_file():
            if config_path.stat().st_size > MAX_CONFIG_BYTES:
                raise ValueError(f"{config_path}: {config_path.stat().st_size:,} bytes, not a tokenizer config")
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{config_path}: not valid JSON ({type(e).__name__})") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: must hold a JSON object")
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: HF uses "default"
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{config_path}: chat_template must be a string (or named templates)")
        self.chat_template: str | None = template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.eos_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None
        if template:
            from jinja2 import TemplateError

            try:
                self._template = self._environment().from_string(template)
            except TemplateError as e:
                raise ValueError(f"{config_path}: its chat_template does not compile ({e})") from None

    @staticmethod
    def exists(directory: str | Path) -> bool:
        return (Path(directory) / "tokenizer.json").is_file()

    @staticmethod
    def _environment():
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise RequestError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        return env

    def _ids(self, text: str, special: bool) -> list[int]:
        """special: special-token strings in `text` are those tokens (template text); else they stay text."""
        self.tokenizer.encode_special_tokens = not special
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self.tokenizer.encode_special_tokens = False

    def encode(self, text: str) -> list[int]:
        """A plain prompt: the tokenizer's own special tokens around it (its BOS), the text itself as text."""
        if not text:
            raise RequestError("the prompt is empty: send some text")
        self.tokenizer.encode_special_tokens = True
        try:
            return self.tokenizer.encode(text, add_special_tokens=True).ids
        finally:
            self.tokenizer.encode_special_tokens = False

    def render(self, messages: list[dict], **kwargs) -> str:
        """The chat template applied to `messages` (with the assistant's turn opened unless told otherwise), its
        output bounded (MAX_RENDERED_CHARS)."""
        if self._template is None:
            raise RequestError("this model's tokenizer_config.json has no chat_template")
        from jinja2 import TemplateError

        context = {"add_generation_prompt": True, "bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                   **kwargs, "messages": messages}
        parts, size = [], 0
        try:
            for part in self._template.generate(**context):
                size += len(part)
                if size > MAX_RENDERED_CHARS:
                    raise RequestError(f"the chat template renders more than {MAX_RENDERED_CHARS:,} characters")
                parts.append(part)
        except TemplateError as e:
            raise RequestError(f"chat template: {e}") from None
        return "".join(parts)

    def encode_chat(self, messages: list[dict], **kwargs) -> list[int]:
        """A conversation through the template: the template's own text with its special tokens, every message's
        content as text (special-token strings in it stay text)."""
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content", ""), str) for m in messages):
            raise RequestError("messages must be a non-empty list of objects with a string content")
        contents = [m.get("content") or "" for m in messages]
        marked = [{**m, "content": _MARK.format(i)} if m.get("content") else m for i, m in enumerate(messages)]
        rendered = self.render(marked, **kwargs)
        ids, rest = [], rendered
        for i, content in enumerate(contents):
            if not content:
                continue
            head, found, rest = rest.partition(_MARK.format(i))
            if not found:
                raise RequestError(f"the chat template dropped or changed message {i}: it cannot be encoded safely")
            ids += self._ids(head, special=True) + self._ids(content, special=False)
        return ids + self._ids(rest, special=True)

    def encode_prompt(self, text: str, chat: bool = False) -> list[int]:
        """A text prompt as sent to the generation model: plain, or as one user message through the template."""
        if chat and not text:
            raise RequestError("the prompt is empty: send some text")
        return self.encode_chat([{"role": "user", "content": text}]) if chat else self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self) -> "TextStream":
        return TextStream(self.tokenizer)


class TextWorker:
    """Tokenization and chat templates in a process of their own (this file, run as a script): a template that loops
    or a prompt that is huge costs that process, never the caller. Each request has a time limit (past it the worker
    is killed, and started again for the next request) and the worker a memory limit; a worker that dies is one
    error for that request. Thread-safe (one request at a time)."""

    def __init__(self, directory: str | Path, seconds: float = TEXT_SECONDS, memory_bytes: int = TEXT_MEMORY_BYTES,
                 python: str | None = None):
        import sys
        import threading

        self.directory, self.seconds, self.memory_bytes = str(directory), seconds, memory_bytes
        self.python = python or sys.executable
        self.lock = threading.Lock()
        self.process = self.stderr = None
        try:
            self._call({"op": "ping"})  # the files load, or this raises with the reason
        except BaseException:
            self.close()
            raise

    def _start(self):
        import subprocess
        import tempfile

        def limit_memory():
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (self.memory_bytes, self.memory_bytes))

        self._close_stderr()
        self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty worker never blocks on it
        self.process = subprocess.Popen([self.python, str(Path(__file__).resolve()), "--text-worker", self.directory],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, preexec_fn=limit_memory)

    def _last_error(self) -> str:
        """The last line the worker wrote to stderr (a traceback's: the exception), or ''."""
        self.stderr.seek(0)
        lines = [line.strip() for line in self.stderr.read().splitlines() if line.strip()]
        return lines[-1][:200] if lines else ""

    def _close_stderr(self) -> None:
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None

    def _call(self, request: dict):
        import select

        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
            process = self.process
            try:
                process.stdin.write(json.dumps(request) + "\n")
                process.stdin.flush()
                ready, _, _ = select.select([process.stdout], [], [], self.seconds)
                line = process.stdout.readline() if ready else None
            except (BrokenPipeError, OSError):
                line = ""
            if not line:
                process.kill()
                process.wait()
                self.process = None
                why = (f"took longer than {self.seconds:g} s" if line is None else
                       f"failed: the worker exited ({self._last_error() or 'nothing on its stderr: out of memory?'})")
                raise RequestError(f"tokenizing the request {why}")
        reply = json.loads(line)
        if "error" in reply:
            raise (RequestError if reply.get("request") else ValueError)(reply["error"])
        return reply.get("result")

    def encode(self, text: str) -> list[int]:
        return self._call({"op": "encode", "text": text})

    def encode_chat(self, messages: list[dict], **kwargs) -> list[int]:
        return self._call({"op": "chat", "messages": messages, "kwargs": kwargs})

    def close(self) -> None:
        with self.lock:
            if self.process is not None:
                self.process.kill()
                self.process.wait()
                self.process = None
            self._close_stderr()


def _serve_text(directory: str) -> None:
    """The TextWorker's process: one JSON request per line on stdin, one JSON reply per line on stdout."""
    import sys

    try:
        codec = TextCodec(directory)
    except ValueError as e:  # the files themselves: every request gets the reason
        codec, broken = None, str(e)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if codec is None:
                raise ValueError(broken)
            if request["op"] == "encode":
                result = codec.encode(request["text"])
            elif request["op"] == "chat":
                result = codec.encode_chat(request["messages"], **request["kwargs"])
            else:
                result = None
            reply = {"result": result}
        except RequestError as e:
            reply = {"error": str(e), "request": True}
        except MemoryError:
            import resource

            limit = resource.getrlimit(resource.RLIMIT_AS)[0]
            reply = {"error": f"tokenizing the request needs more than the {limit / 2**30:g} GB it may use",
                     "request": True}
        except ValueError as e:  # the files: their reason
            reply = {"error": str(e)}
        except Exception as e:  # a bug: one line
            reply = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


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


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--text-worker":
        _serve_text(sys.argv[2])
