"""The OpenAI-compatible API of `dsa-export serve`: a Starlette app (run by uvicorn) in front of the Triton server's
`dsa_generate`, the way vLLM, SGLang and trtllm-serve speak to their users.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events or not,
with usage counts), GET /health (the Triton server ready), GET /metrics (this API's Prometheus metrics, then the
Triton server's own, dsa_generate's scheduler gauges among them).

A request is checked here (one OpenAI-shaped error, HTTP 400, naming the field), its prompt turned into token ids by
the checkpoint's tokenizer and chat template (TextWorker: a process of its own with time and memory limits; message
contents stay text, so special-token strings in them cannot forge a turn), then sent to dsa_generate over one gRPC
stream of its own. The tokens and the text the server streams back are cut at stop strings here; with a thinking
chat (`chat_template_kwargs: {"thinking": true}`, DeepSeek-V3.2's switch) the text before `</think>` is returned as
`reasoning_content`, apart from the answer, as vLLM and SGLang do. A client that disconnects cancels its request on
the server (its gRPC stream is cancelled), and so does a stop string.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

from dsa_export.deploy import client
from dsa_export.deploy.repository import GENERATE
from dsa_export.models.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_SEP

log = logging.getLogger("dsa_export.api")
THINK_END = "</think>"
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 200
MAX_BODY_BYTES = 16 << 20
RESPONSE_TIMEOUT = 600.0  # seconds without a token before a request is given up


class APIError(Exception):
    """A request the API refuses: HTTP status and OpenAI's error object."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.kind, self.code = message, status, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- the request ----------------------------------------------------------------------------------------------------
def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise APIError(f"'{name}' must be {what} from {low:g} to {high:g}, got {json.dumps(value)[:40]}", param=name)
    return value


@dataclass
class Sampling:
    """What a request asks of the generation, checked."""
    max_tokens: int | None  # None: up to the context (a chat that gives none)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_ids: list[int] | None = None  # None: the model's end-of-sequence ids
    stream: bool = False
    include_usage: bool = False

    @classmethod
    def of(cls, body: dict, max_tokens_limit: int, chat: bool) -> "Sampling":
        if body.get("n", 1) != 1:
            raise APIError("only n=1 is supported", param="n")
        names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
        name = next((n for n in names if body.get(n) is not None), names[-1])
        # not given: 16 for a completion (OpenAI's default), the rest of the context for a chat (set once the
        # prompt's length is known)
        max_tokens = _number(body, name, None if chat else min(16, max_tokens_limit), 1, max_tokens_limit,
                             integer=True)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise APIError(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings of at "
                           f"most {MAX_STOP_CHARS} characters", param="stop")
        stop_ids = body.get("stop_token_ids")  # vLLM's extension
        if stop_ids is not None and (not isinstance(stop_ids, list) or len(stop_ids) > 64 or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in stop_ids)):
            raise APIError("'stop_token_ids' must be a list of at most 64 token ids", param="stop_token_ids")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError("'stream' must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError("'stream_options' must be an object", param="stream_options")
        return cls(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                   top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
                   top_k=max(0, _number(body, "top_k", 0, -1, 2**30, integer=True)),
                   seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True),
                   stop=stop, stop_ids=stop_ids, stream=stream, include_usage=bool(options.get("include_usage")))


def _hold_back(text: str, *markers: str) -> tuple[str, str]:
    """(what can go out now, what is held back): the longest end of `text` that may be the start of a marker."""
    hold = max((n for marker in markers for n in range(min(len(marker) - 1, len(text)), 0, -1)
                if text.endswith(marker[:n])), default=0)
    return text[:len(text) - hold], text[len(text) - hold:]


class StopText:
    """Text as it streams, cut before the first stop string: what may start a stop string is held back until the
    next piece shows it is not one."""

    def __init__(self, stop: list[str]):
        self.stop, self.pending, self.stopped = stop, "", False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        out, self.pending = _hold_back(self.pending, *self.stop)
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class Reasoning:
    """A thinking model's text split at `</think>`: (reasoning, answer) pieces as they stream."""

    def __init__(self, thinking: bool):
        self.in_reasoning, self.held = thinking, ""

    def feed(self, text: str) -> tuple[str, str]:
        if not self.in_reasoning:
            return "", text
        text, self.held = self.held + text, ""
        head, found, tail = text.partition(THINK_END)
        if found:
            self.in_reasoning = False
            return head, tail.lstrip("\n")
        text, self.held = _hold_back(text, THINK_END)
        return text, ""

    def flush(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        return (held, "") if self.in_reasoning else ("", held)


class ToolCalls:
    """The model's tool-call markup (DeepSeek-V3.1/V3.2's: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>name
    <｜tool▁sep｜>arguments<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>) taken out of the answer as it streams: the
    text before it is content, the calls come back as OpenAI's tool_calls."""
    CALL = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(.*?)" + re.escape(TOOL_SEP) + r"(.*?)" + re.escape(TOOL_CALL_END),
                      re.S)

    def __init__(self, enabled: bool):
        self.enabled, self.markup, self.held = enabled, None, ""

    def feed(self, text: str) -> str:
        if not self.enabled:
            return text
        if self.markup is not None:
            self.markup += text
            return ""
        text, self.held = self.held + text, ""
        head, found, tail = text.partition(TOOL_CALLS_BEGIN)
        if found:
            self.markup = tail
            return head
        text, self.held = _hold_back(text, TOOL_CALLS_BEGIN)
        return text

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def calls(self) -> list[dict]:
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name.strip(), "arguments": arguments.strip()}}
                for name, arguments in self.CALL.findall(self.markup or "")]


def _tools(tools) -> list[dict] | None:
    """OpenAI's `tools` (functions only), checked: what the chat template renders."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or len(tools) > 128:
        raise APIError("'tools' must be a list of at most 128 functions", param="tools")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           param="tools")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise APIError(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        out.append({"type": "function", "function": {"name": function["name"],
                                                     "description": str(function.get("description") or ""),
                                                     "parameters": parameters}})
    return out


def _tool_calls(calls, message: int) -> list[dict]:
    """An assistant message's tool_calls, checked (rendered back into the conversation by the template)."""
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments", ""), str) for c in calls):
        raise APIError(f"messages[{message}].tool_calls must be a list of function calls with a name and arguments "
                       f"(a JSON string)", param="messages")
    return [{"id": str(c.get("id") or ""), "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments", "")}}
            for c in calls]


# ---- the server side of one request ----------------------------------------------------------------------------------
async def generate(url: str, ids: list[int], sampling: Sampling, timeout: float = RESPONSE_TIMEOUT
                   ) -> AsyncIterator[client.Chunk]:
    """The request's tokens from dsa_generate as they come. The gRPC stream runs on tritonclient's own thread; its
    responses reach this coroutine through the event loop. Leaving early (a stop string, a disconnect: the
    generator is closed or cancelled) cancels the request on the server."""
    import tritonclient.grpc as grpcclient

    loop = asyncio.get_running_loop()
    responses: asyncio.Queue = asyncio.Queue()
    inputs = client.request_inputs(ids, max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                   top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed,
                                   stop_ids=sampling.stop_ids)
    stream = grpcclient.InferenceServerClient(url)
    try:
        stream.start_stream(callback=lambda result, error: loop.call_soon_threadsafe(
            responses.put_nowait, (result, error)))
        stream.async_stream_infer(GENERATE, inputs, enable_empty_final_response=True)
        while True:
            try:
                result, error = await asyncio.wait_for(responses.get(), timeout)
            except asyncio.TimeoutError:
                raise APIError(f"no token from the model within {timeout:.0f} s", status=504, kind="timeout") from None
            if error is not None:
                message = error.message() if hasattr(error, "message") else str(error)
                raise _server_error(message, str(error.status()) if hasattr(error, "status") else "")
            for chunk in client.chunks(result):
                yield chunk
            if client._is_final(result):
                return
    finally:  # off the event loop: closing joins tritonclient's stream thread
        threading.Thread(target=_close, args=(stream,), daemon=True).start()


def _server_error(message: str, status: str) -> APIError:
    """What dsa_generate (or the way to it) said, as an HTTP status: its refusals of the request are 400s, a busy or
    stopping server 503, a server that cannot be reached 503, a failed step 500."""
    if message.startswith("the server is") or "UNAVAILABLE" in status:
        return APIError(message, 503, kind="server_busy")
    if message.startswith("the step failed"):
        return APIError(message, 500, kind="server_error")
    return APIError(message, 400)


def _close(stream) -> None:
    try:
        stream.stop_stream(cancel_requests=True)
    finally:
        stream.close()


# ---- metrics ---------------------------------------------------------------------------------------------------------
class Metrics:
    """This API's Prometheus metrics (prometheus-client, a registry of its own)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsa_api_requests", "API requests by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.running = Gauge("dsa_api_requests_running", "requests being generated", registry=r)
        self.waiting = Gauge("dsa_api_requests_waiting", "requests being tokenized, before the model has them",
                             registry=r)
        self.prompt_tokens = Counter("dsa_api_prompt_tokens", "prompt tokens received", registry=r)
        self.generation_tokens = Counter("dsa_api_generation_tokens", "tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("dsa_api_time_to_first_token_seconds", "from the request to its first token",
                              buckets=buckets, registry=r)
        self.itl = Histogram("dsa_api_inter_token_latency_seconds", "between a request's tokens", buckets=buckets,
                             registry=r)
        self.latency = Histogram("dsa_api_request_seconds", "whole requests", buckets=buckets, registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---- the API ---------------------------------------------------------------------------------------------------------
class OpenAIServer:
    """The API of one served build: `app` is the ASGI application."""

    def __init__(self, grpc_url: str, model_name: str, tokenizer_dir: str | Path | None, capacity: int,
                 triton_metrics_url: str | None = None):
        from starlette.applications import Starlette
        from starlette.routing import Route

        from dsa_export.serving.generation import TextCodec, TextWorker

        self.grpc_url, self.model_name, self.capacity = grpc_url, model_name, capacity
        self.triton_metrics_url = triton_metrics_url
        self.text = TextWorker(tokenizer_dir) if tokenizer_dir and TextCodec.exists(tokenizer_dir) else None
        self.metrics = Metrics()
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ])
        self.app.add_exception_handler(404, self._not_found)

    @classmethod
    def of_repository(cls, repository: str | Path, grpc_url: str, model_name: str,
                      triton_metrics_url: str | None = None) -> "OpenAIServer":
        """The API of the build a model repository serves: its tokenizer files and context length, where the
        repository's parameters say they are."""
        from dsa_export.deploy.repository import serving_parameters

        parameters = serving_parameters(repository)
        here = Path(repository) / GENERATE
        io = json.loads((here / json.loads(parameters["stages"])[0]["io_file"]).read_text(encoding="utf-8"))
        return cls(grpc_url, model_name, here / parameters["tokenizer_dir"], int(io["capacity"]), triton_metrics_url)

    def close(self) -> None:
        if self.text is not None:
            self.text.close()

    # ---- helpers
    @staticmethod
    def _json(data: dict, status: int = 200):
        from starlette.responses import JSONResponse

        return JSONResponse(data, status_code=status)

    async def _not_found(self, request, exc):
        return self._json(APIError(f"no route {request.url.path}", 404, kind="not_found").body(), 404)

    async def _body(self, request) -> dict:
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise APIError(f"the request body is {int(declared):,} bytes; at most {MAX_BODY_BYTES:,}", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(f"the request body is {len(raw):,} bytes; at most {MAX_BODY_BYTES:,}", status=413)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise APIError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise APIError(f"The model `{model}` does not exist (this server serves `{self.model_name}`)", 404,
                           param="model", code="model_not_found")
        return body

    async def _encode(self, fn, /, *args, **kwargs) -> list[int]:
        from dsa_export.serving.generation import RequestError

        if self.text is None:
            raise APIError("this model has no tokenizer (tokenizer.json in its checkpoint): send token ids as the "
                           "prompt of /v1/completions")
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (RequestError, ValueError) as e:
            raise APIError(" ".join(str(e).split())) from None

    def _usage(self, prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- endpoints
    async def models(self, request):
        return self._json({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                       "created": self.created, "owned_by": "dsa-export",
                                                       "max_model_len": self.capacity}]})

    async def health(self, request):
        import tritonclient.grpc as grpcclient

        def ready() -> bool:
            probe = grpcclient.InferenceServerClient(self.grpc_url)
            try:
                return probe.is_server_ready(client_timeout=5)
            except Exception:
                return False
            finally:
                probe.close()

        ok = await asyncio.to_thread(ready)
        return self._json({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    async def prometheus(self, request):
        from starlette.responses import Response

        text = self.metrics.text()
        if self.triton_metrics_url:  # the Triton server's own (dsa_generate's scheduler gauges among them)
            import httpx

            try:
                async with httpx.AsyncClient(timeout=5) as http:
                    text += (await http.get(self.triton_metrics_url)).content
            except httpx.HTTPError:
                pass
        return Response(text, media_type="text/plain; version=0.0.4")

    async def completions(self, request):
        return await self._serve(request, chat=False)

    async def chat_completions(self, request):
        return await self._serve(request, chat=True)

    async def _serve(self, request, chat: bool):
        endpoint = "chat" if chat else "completions"
        started = time.monotonic()
        try:
            body = await self._body(request)
            sampling = Sampling.of(body, self.capacity, chat)
            self.metrics.waiting.inc()
            try:
                ids, thinking, tools = await (self._chat_prompt(body) if chat else self._completion_prompt(body))
            finally:
                self.metrics.waiting.dec()
            if sampling.max_tokens is None:
                sampling.max_tokens = max(1, self.capacity - len(ids))
            if len(ids) + sampling.max_tokens > self.capacity:
                raise APIError(f"the prompt ({len(ids)} tokens) and max_tokens ({sampling.max_tokens}) exceed the "
                               f"model's context of {self.capacity} tokens", param="max_tokens")
        except APIError as e:
            self._access(request, endpoint, e.status, started)
            return self._json(e.body(), e.status)
        except Exception as e:  # a bug: a 500 with one line, and the server goes on
            log.exception("request failed")
            self._access(request, endpoint, 500, started)
            return self._json(APIError(f"internal error: {type(e).__name__}: {e}", 500, kind="server_error").body(), 500)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.metrics.prompt_tokens.inc(len(ids))
        events = self._events(ids, sampling, thinking, tools)
        if sampling.stream:
            return self._streamed(request, endpoint, request_id, chat, events, sampling, len(ids), started)
        return await self._whole(request, endpoint, request_id, chat, events, len(ids), started)

    async def _chat_prompt(self, body: dict) -> tuple[list[int], bool]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError("'messages' must be a non-empty list", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
                raise APIError(f"messages[{i}] must be an object with a role of system, user, assistant or tool",
                               param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text ones only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            if content is not None and not isinstance(content, str):
                raise APIError(f"messages[{i}].content must be a string", param="messages")
            messages[i] = {"role": "system" if m["role"] == "developer" else m["role"], "content": content or ""}
            if m["role"] == "assistant" and m.get("tool_calls"):
                messages[i]["tool_calls"] = _tool_calls(m["tool_calls"], i)
            if m["role"] == "tool":
                messages[i]["tool_call_id"] = str(m.get("tool_call_id") or "")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict) or {"messages", "tools"} & set(kwargs):
            raise APIError("'chat_template_kwargs' must be an object of template variables", param="chat_template_kwargs")
        thinking = bool(kwargs.get("thinking") or kwargs.get("enable_thinking"))
        tools = _tools(body.get("tools"))
        encode = self.text.encode_chat if self.text else None
        ids = await self._encode(encode, messages, **kwargs, **({"tools": tools} if tools else {}))
        if tools and ids == await self._encode(encode, messages, **kwargs):
            raise APIError("this model's chat template does not render tools", param="tools")
        return ids, thinking, bool(tools)

    async def _completion_prompt(self, body: dict) -> tuple[list[int], bool]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # one prompt in a batch of one
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < 2**63 for t in prompt):
                raise APIError("'prompt' token ids must be from 0 to 2**63-1", param="prompt")
            return prompt, False, False  # token ids (the server checks them against the vocabulary)
        if not isinstance(prompt, str) or not prompt:
            raise APIError("'prompt' must be a non-empty string or a list of token ids (one prompt)", param="prompt")
        return await self._encode(self.text.encode if self.text else None, prompt), False, False

    async def _events(self, ids: list[int], sampling: Sampling, thinking: bool, tools: bool = False):
        """(kind, value) events: ("token", time of the first), ("reasoning" | "content", text), ("tool_calls",
        calls), then ("end", (finish_reason, tokens))."""
        stop, reasoning, calls = StopText(sampling.stop), Reasoning(thinking), ToolCalls(tools)
        tokens, first, last = 0, None, None
        self.metrics.running.inc()
        chunks = generate(self.grpc_url, ids, sampling)
        try:
            async for chunk in chunks:
                now = time.monotonic()
                if first is None:
                    first = now
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                tokens += 1
                self.metrics.generation_tokens.inc()
                yield ("token", first)
                think, answer = reasoning.feed(chunk.text)
                if think:
                    yield ("reasoning", think)
                if answer:
                    answer = stop.feed(calls.feed(answer))
                    if answer:
                        yield ("content", answer)
                    if stop.stopped:
                        await chunks.aclose()  # the gRPC stream is cancelled: the server stops generating
                        break
            think, answer = reasoning.flush()
            if think:
                yield ("reasoning", think)
            answer = stop.feed(calls.feed(answer) + calls.flush()) + stop.flush() if not stop.stopped else ""
            if answer:
                yield ("content", answer)
            found = calls.calls()
            if found:
                yield ("tool_calls", found)
            finish = "tool_calls" if found else (
                "length" if tokens >= sampling.max_tokens and not stop.stopped else "stop")
            yield ("end", (finish, tokens))
        finally:
            await chunks.aclose()  # a stop string or a disconnect: the server's request is cancelled
            self.metrics.running.dec()

    async def _whole(self, request, endpoint, request_id, chat, events, prompt_tokens, started):
        parts = {"reasoning": [], "content": [], "tool_calls": []}
        finish, tokens = "stop", 0
        task = asyncio.ensure_future(self._collect(events, parts))
        try:  # (finally: a cancelled handler cancels its generation too)
            while not task.done():  # a client that goes away cancels its request
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if not done and await request.is_disconnected():
                    task.cancel()
                    self._access(request, endpoint, 499, started)
                    return self._json({}, 499)
            finish, tokens, first = task.result()
        except APIError as e:
            self._access(request, endpoint, e.status, started)
            return self._json(e.body(), e.status)
        finally:
            task.cancel()
        if first is not None:
            self.metrics.ttft.observe(first - started)
        text, reasoning = "".join(parts["content"]), "".join(parts["reasoning"])
        if chat:
            message = {"role": "assistant", "content": text or (None if parts["tool_calls"] else "")}
            if reasoning:
                message["reasoning_content"] = reasoning
            if parts["tool_calls"]:
                message["tool_calls"] = [call for calls in parts["tool_calls"] for call in calls]
            choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        self._access(request, endpoint, 200, started, prompt_tokens, tokens)
        return self._json({"id": request_id, "object": "chat.completion" if chat else "text_completion",
                           "created": int(time.time()), "model": self.model_name, "choices": [choice],
                           "usage": self._usage(prompt_tokens, tokens)})

    @staticmethod
    async def _collect(events, parts) -> tuple[str, int, float | None]:
        first = None
        async with contextlib.aclosing(events):
            async for kind, value in events:
                if kind == "token":
                    first = value
                elif kind == "end":
                    return value[0], value[1], first
                else:
                    parts[kind].append(value)
        return "stop", 0, first

    def _streamed(self, request, endpoint, request_id, chat, events, sampling, prompt_tokens, started):
        from starlette.responses import StreamingResponse

        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, usage: dict | None = None) -> str:
            data = {"id": request_id, "object": kind, "created": created, "model": self.model_name,
                    "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def piece(delta: dict | str, finish: str | None = None) -> dict:
            if chat:
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}

        async def body():
            status, tokens = 200, 0
            try:
                if chat:
                    yield chunk([piece({"role": "assistant", "content": ""})])
                async for what, value in events:
                    if what == "token":
                        if tokens == 0:
                            self.metrics.ttft.observe(value - started)
                        tokens += 1
                    elif what == "end":
                        finish, tokens = value
                        yield chunk([piece({} if chat else "", finish)])
                        if sampling.include_usage:
                            yield chunk([], self._usage(prompt_tokens, tokens))
                    elif what == "tool_calls":
                        if chat:
                            yield chunk([piece({"tool_calls": [{"index": i, **call} for i, call in enumerate(value)]})])
                    elif chat:
                        yield chunk([piece({"reasoning_content" if what == "reasoning" else "content": value})])
                    else:
                        yield chunk([piece(value)])
                yield "data: [DONE]\n\n"
            except APIError as e:  # after the headers: the error as the stream's last event
                status = e.status
                yield f"data: {json.dumps(e.body())}\n\n"
            except asyncio.CancelledError:  # the client went away: the request is cancelled with the stream
                status = 499
                raise
            finally:
                self._access(request, endpoint, status, started, prompt_tokens, tokens)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})

    def _access(self, request, endpoint: str, status: int, started: float, prompt_tokens: int = 0,
                completion_tokens: int = 0) -> None:
        """One line per request, and the request counters."""
        seconds = time.monotonic() - started
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if status == 200:
            self.metrics.latency.observe(seconds)
        peer = request.client.host if request.client else "-"
        log.info(f'{peer} "{request.method} {request.url.path}" {status} prompt={prompt_tokens} '
                 f'completion={completion_tokens} {seconds * 1e3:.0f}ms')


# ---- running it ------------------------------------------------------------------------------------------------------
class APIThread:
    """uvicorn serving an OpenAIServer on host:port in a thread of this process (`serve`, and the tests)."""

    def __init__(self, server: OpenAIServer, host: str, port: int, drain_seconds: float = 5.0):
        import uvicorn

        # on stop: no new connections; running streams get drain_seconds to finish (the Triton server drains too)
        config = uvicorn.Config(server.app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=drain_seconds)
        self.server, self.uvicorn = server, uvicorn.Server(config)
        self.uvicorn.install_signal_handlers = lambda: None  # the command owns SIGINT/SIGTERM
        self.thread = threading.Thread(target=self.uvicorn.run, name="dsa-openai-api", daemon=True)
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"

    def start(self, timeout: float = 30.0) -> "APIThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the OpenAI API did not start on {self.url} (is the port taken?)")
            time.sleep(0.05)
        return self

    def stop(self, wait: bool = True) -> None:
        """Take no new connection; with wait, let the running ones finish (up to the drain time), then close."""
        self.uvicorn.should_exit = True
        if wait:
            self.thread.join(timeout=self.uvicorn.config.timeout_graceful_shutdown + 5)
            self.server.close()

