"""The OpenAI-compatible API (deploy/openai_api.py) with the official `openai` client, against the real Triton server
serving the tiny build: chat and completions, streamed and not, usage counts, reasoning apart from the answer, stop
strings, OpenAI-shaped errors, a disconnect that frees its request, and the metrics moving."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from dsa_export.deploy.openai_api import APIThread, OpenAIServer, Reasoning, StopText
from dsa_export.deploy.repository import GENERATE
from dsa_export.deploy.server import TritonServer, find_server, free_port
from dsa_export.serving.generation import TextCodec

pytestmark = pytest.mark.server
CAPACITY = 1024
MODEL = "tiny-dsa"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    from dsa_export.build import Options, run_build

    out = tmp_path_factory.mktemp("api") / "build"
    run_build(Options(out=out, capacity=CAPACITY, max_tokens=64, max_batch=8), only=["checkpoint", "export", "deploy"],
              log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def triton(build):
    with TritonServer(build / "model_repository", [GENERATE], find_server(), log_path=build.parent / "server.log",
                      exit_timeout=5) as server:
        yield server


@pytest.fixture(scope="module")
def api(build, triton):
    server = OpenAIServer(triton.grpc_url, MODEL, build, CAPACITY, triton.metrics_url)
    thread = APIThread(server, "127.0.0.1", free_port()).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def oai(api):
    return openai.OpenAI(base_url=api.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(build):
    """The greedy text of the eager model for token ids: what the API must return at temperature 0."""
    from dsa_export.models import load_checkpoint
    from dsa_export.runtime import EagerBackend, Session

    model = load_checkpoint(build / "checkpoint", progress=False)
    codec = TextCodec(build)

    def greedy(ids, n):
        tokens = Session(EagerBackend(model, capacity=CAPACITY)).generate([ids], n)[0]
        return tokens, codec.decode(tokens)

    return greedy


def test_models_lists_the_served_model(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_a_chat_completion_is_the_models_greedy_text_with_usage(oai, build, expected):
    ids = TextCodec(build).encode_chat(MESSAGES)
    tokens, text = expected(ids, 12)
    reply = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                        extra_body={"stop_token_ids": []})
    assert reply.choices[0].message.content == text and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.role == "assistant"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (len(ids), 12, len(ids) + 12)


def test_a_chat_without_max_tokens_may_use_the_rest_of_the_context(oai, build):
    ids = TextCodec(build).encode_chat(MESSAGES)
    reply = oai.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, stop=["e"])
    assert reply.choices[0].finish_reason == "stop" and reply.usage.prompt_tokens == len(ids)
    assert 0 < reply.usage.completion_tokens <= CAPACITY - len(ids)


def test_a_streamed_chat_returns_the_reasoning_apart_and_usage_last(oai, build, expected):
    """With DeepSeek's thinking switch the template opens a <think> block: everything before </think> is
    reasoning_content (the tiny random model never closes it); without, it is the answer."""
    codec = TextCodec(build)
    for thinking in (True, False):
        ids = codec.encode_chat(MESSAGES, thinking=thinking)
        _, text = expected(ids, 10)
        stream = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"stop_token_ids": [], "chat_template_kwargs":
                                                         {"thinking": thinking}})
        reasoning, content, finishes, usage = [], [], [], None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                delta = choice.delta.model_dump()
                reasoning.append(delta.get("reasoning_content") or "")
                content.append(delta.get("content") or "")
                finishes.append(choice.finish_reason)
        assert ("".join(reasoning), "".join(content)) == ((text, "") if thinking else ("", text))
        assert finishes[-1] == "length" and usage.completion_tokens == 10 and usage.prompt_tokens == len(ids)
        assert sum(bool(piece) for piece in reasoning + content) > 1  # streamed in pieces, not at the end


def test_completions_streamed_and_not_and_a_stop_string(oai, build, expected):
    prompt = "The quick brown fox"
    ids = TextCodec(build).encode(prompt)
    _, text = expected(ids, 16)
    whole = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                   extra_body={"stop_token_ids": []})
    assert whole.choices[0].text == text and whole.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True, extra_body={"stop_token_ids": []})
        if c.choices)
    assert streamed == text
    stop = text[3:5]  # a stop string the greedy text holds: cut before its first occurrence
    assert stop.strip()
    cut = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                                 extra_body={"stop_token_ids": []})
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_400s_that_name_the_problem(oai):
    cases = [
        (dict(messages=MESSAGES, temperature=5), r"'temperature' must be a number from 0 to 2"),
        (dict(messages=[]), r"'messages' must be a non-empty list"),
        (dict(messages=MESSAGES, max_tokens=0), r"'max_tokens' must be an integer from 1 to 1024"),
        (dict(messages=MESSAGES, max_tokens=CAPACITY), r"exceed the model's context of 1024 tokens"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), r"messages\[0\] must be an object with a role"),
        (dict(messages=MESSAGES, stop=["a"] * 5), r"'stop' must be a string or a list of at most 4"),
        (dict(messages=MESSAGES, n=2), r"only n=1"),
    ]
    for arguments, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            oai.chat.completions.create(model=MODEL, **arguments)
    with pytest.raises(openai.BadRequestError, match="'prompt' must be a non-empty string"):
        oai.completions.create(model=MODEL, prompt="")
    with pytest.raises(openai.BadRequestError, match="token 999999 is outside the vocabulary|vocabulary"):
        oai.completions.create(model=MODEL, prompt=[5, 999999])  # the server's own check, passed on
    with pytest.raises(openai.NotFoundError, match="The model `gpt-5` does not exist"):
        oai.chat.completions.create(model="gpt-5", messages=MESSAGES)


def test_a_client_that_disconnects_frees_its_request(api, triton):
    def value(name):
        return triton.metrics()[name]

    cancelled = value("dsa_requests_cancelled_total")
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{api.url}/chat/completions", json={
                "model": MODEL, "messages": MESSAGES, "max_tokens": 900, "stream": True,
                "stop_token_ids": []}) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                if events == 4:
                    break  # then the connection closes
    deadline = time.monotonic() + 30
    while not (value("dsa_requests_cancelled_total") > cancelled and value("dsa_requests_running") == 0
               and value("dsa_pool_blocks_in_use") == 0):
        assert time.monotonic() < deadline, "the disconnected request kept running"
        time.sleep(0.1)


def test_metrics_move_under_load(oai, api):
    def scrape():
        text = httpx.get(api.url.removesuffix("/v1") + "/metrics", timeout=10).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    before = scrape()
    for _ in range(3):
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, extra_body={"stop_token_ids": []})
    after = scrape()
    assert after["dsa_api_generation_tokens_total"] - before.get("dsa_api_generation_tokens_total", 0) == 12
    assert after["dsa_api_time_to_first_token_seconds_count"] - before.get(
        "dsa_api_time_to_first_token_seconds_count", 0) == 3
    assert after["dsa_api_inter_token_latency_seconds_count"] > before.get("dsa_api_inter_token_latency_seconds_count",
                                                                           0)
    assert after['dsa_api_requests_total{endpoint="chat",status="200"}'] >= 3
    assert "dsa_pool_blocks" in after and "dsa_generated_tokens_total" in after  # the Triton server's, appended
    assert httpx.get(api.url.removesuffix("/v1") + "/health", timeout=10).json() == {"status": "ok"}


# ---- the text pieces, without a server ------------------------------------------------------------------------------
def test_stop_strings_are_cut_across_pieces():
    stop = StopText(["END", "xy"])
    assert stop.feed("hello E") == "hello " and stop.feed("N") == "" and stop.feed("D more") == "" and stop.stopped
    stop = StopText(["END"])
    assert stop.feed("ab EN") == "ab " and stop.feed("X") == "ENX" and stop.flush() == ""
    stop = StopText(["END"])
    assert stop.feed("tail E") == "tail " and stop.flush() == "E"  # held back, then given at the end
    assert StopText([]).feed("anything") == "anything"


def test_reasoning_is_split_at_think_end_across_pieces():
    split = Reasoning(thinking=True)
    pieces = [split.feed(p) for p in ("Let me", " think.</th", "ink>\n\nThe answer", " is 4.")]
    assert "".join(r for r, _ in pieces) == "Let me think." and "".join(a for _, a in pieces) == "The answer is 4."
    assert Reasoning(thinking=False).feed("plain </think> text") == ("", "plain </think> text")
    split = Reasoning(thinking=True)
    assert split.feed("never closed </") == ("never closed ", "") and split.flush() == ("</", "")


def test_the_sse_stream_ends_with_done(api):
    with httpx.Client(timeout=30) as http:
        lines = [line for line in http.post(f"{api.url}/completions", json={
            "model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True}).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_serve_says_when_the_api_cannot_listen():
    import socket

    from dsa_export.deploy.server import _cannot_listen

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert _cannot_listen("127.0.0.1", taken.getsockname()[1]) == "in use"
    assert _cannot_listen("127.0.0.1", free_port()) is None
    assert _cannot_listen("no-such-host.invalid", 8000).startswith("unknown host")


# ---- tools -----------------------------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CALL = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}'
        '<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


def test_tools_render_through_the_template_with_a_conversation_of_tool_turns(oai, build):
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    reply = oai.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=1)
    codec = TextCodec(build)
    expected = codec.encode_chat([{"role": m["role"], "content": m.get("content") or "",
                                   **({"tool_calls": m["tool_calls"]} if "tool_calls" in m else {}),
                                   **({"tool_call_id": m["tool_call_id"]} if "tool_call_id" in m else {})}
                                  for m in history], tools=TOOLS)
    assert reply.usage.prompt_tokens == len(expected) > len(codec.encode_chat(MESSAGES))
    assert "get_weather" in codec.render(history, tools=TOOLS) and "sunny, 21 C" in codec.decode(expected)
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\] must be"):
        oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[{"type": "function"}])


def test_the_models_tool_call_markup_comes_back_as_tool_calls(oai, monkeypatch):
    """The tiny random model never writes the markup: the server's tokens are replaced by text that holds it (split
    across pieces as a model's tokens would split it), the API's parsing is what is tested."""
    from dsa_export.deploy import client, openai_api

    pieces = ["Let me check. ", CALL[:7], CALL[7:40], CALL[40:]]

    async def fake_generate(url, ids, sampling, timeout=0):
        for i, text in enumerate(pieces):
            yield client.Chunk(i, 5, text)

    monkeypatch.setattr(openai_api, "generate", fake_generate)
    reply = oai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=20)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check. "
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    deltas = [c.choices[0].delta for c in oai.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=20, stream=True) if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check. "
    [call] = [t for d in deltas for t in d.tool_calls or []]
    assert call.function.name == "get_weather" and call.index == 0 and call.id.startswith("call_")
    # without tools the markup is text, as the model wrote it
    reply = oai.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
    assert reply.choices[0].message.content == "".join(pieces) and not reply.choices[0].message.tool_calls


def test_tool_call_markup_is_cut_out_across_pieces():
    from dsa_export.deploy.openai_api import ToolCalls

    calls = ToolCalls(enabled=True)
    assert calls.feed("answer <｜tool") == "answer " and calls.feed("▁calls▁begin｜><｜tool▁call▁begin｜>f") == ""
    assert calls.feed('<｜tool▁sep｜>{}<｜tool▁call▁end｜>') == "" and calls.flush() == ""
    assert [c["function"] for c in calls.calls()] == [{"name": "f", "arguments": "{}"}]
    calls = ToolCalls(enabled=True)
    assert calls.feed("no call <｜to") == "no call " and calls.flush() == "<｜to" and calls.calls() == []


def test_a_text_worker_that_dies_says_why(build):
    """The tokenizer's worker process exits before it answers (here its address space is too small for Python to
    start): the error carries the last line it wrote to stderr, not a guess."""
    from dsa_export.serving.generation import RequestError, TextWorker

    with pytest.raises(RequestError, match=r"tokenizing the request failed: the worker exited \(") as error:
        TextWorker(build, memory_bytes=16 << 20)
    assert "nothing on its stderr" not in str(error.value) and "MemoryError" in str(error.value)
