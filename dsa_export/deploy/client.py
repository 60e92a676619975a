"""Streaming generation from a Triton Inference Server over gRPC (tritonclient): one request to `dsa_generate`,
its tokens yielded as they arrive. Closing the iterator early cancels the request on the server."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from dsa_export.deploy.repository import GENERATE
from dsa_export.errors import DSAExportError
from dsa_export.formats import by
from dsa_export.serving.generation import GENERATE_INPUTS

DEFAULT_URL = "127.0.0.1:8001"


class GenerationError(DSAExportError):
    """The server refused the request or failed while generating (its message), or could not be reached."""


@dataclass(frozen=True)
class Chunk:
    index: int  # 0, 1, ... within the request
    token: int
    text: str  # the text this token completes ("" without a tokenizer, or while a character is still split)
    logprob: float = 0.0  # the model's log-probability of the token


def request_inputs(input_ids: Sequence[int] | None = None, prompt: str | None = None, chat: bool = False,
                   max_new_tokens: int = 32, temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None,
                   stop_ids: Sequence[int] | None = None) -> list:
    """The gRPC inputs of one generation request (generation.GENERATE_INPUTS), leaving out those not given."""
    import tritonclient.grpc as grpcclient

    values = {"INPUT_IDS": input_ids, "PROMPT": None if prompt is None else [prompt.encode("utf-8")],
              "APPLY_CHAT_TEMPLATE": [chat] if chat else None, "MAX_NEW_TOKENS": [max_new_tokens],
              "TEMPERATURE": None if temperature is None else [temperature],
              "TOP_K": None if top_k is None else [top_k], "TOP_P": None if top_p is None else [top_p],
              "SEED": None if seed is None else [seed],
              "STOP_IDS": stop_ids}
    inputs = []
    for name, value in values.items():
        if value is None:
            continue
        dtype = GENERATE_INPUTS[name][0]
        array = np.asarray(list(value), dtype=np.object_ if dtype == "TYPE_STRING" else by("server", dtype).numpy)
        tensor = grpcclient.InferInput(name, list(array.shape), "BYTES" if dtype == "TYPE_STRING" else
                                       dtype.removeprefix("TYPE_"))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def chunks(result) -> list[Chunk]:
    """The tokens of one response (one or more: generation.GENERATE_OUTPUTS); the text they complete goes with the
    last of them."""
    token = result.as_numpy("TOKEN")
    if token is None:
        return []
    index, logprob, text = result.as_numpy("INDEX"), result.as_numpy("LOGPROB"), result.as_numpy("TEXT")
    text = text[0].decode("utf-8") if text is not None else ""
    return [Chunk(int(i), int(t), text if n == len(token) - 1 else "", float(p))
            for n, (i, t, p) in enumerate(zip(index, token, logprob))]


def _is_final(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def wait_until_ready(client, url: str, wait: float = 0.0) -> None:
    """Return once the server at url is ready; poll for up to `wait` seconds (a server just started), then raise
    GenerationError saying why not."""
    deadline = time.monotonic() + wait
    while True:
        try:
            if client.is_server_ready(client_timeout=10):
                return
            reason = "it is up but not ready (a model failed to load? see its log)"
        except Exception as e:  # not listening (yet)
            reason = f"{str(e).splitlines()[0][:200]}"
        if time.monotonic() >= deadline:
            raise GenerationError(f"cannot reach Triton Inference Server at {url}: {reason}; start one with "
                                  f"`dsa-export serve BUILD_DIR`")
        time.sleep(0.5)


def stream(url: str = DEFAULT_URL, inputs: list | None = None, model: str = GENERATE, timeout: float = 120.0,
           wait: float = 0.0) -> Iterator[Chunk]:
    """Send one request (inputs from request_inputs) and yield its tokens as they arrive. Raises GenerationError
    with the server's message if it refuses the request or fails, if no response comes within `timeout`, or if the
    server is not ready (after waiting up to `wait` seconds for it)."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        wait_until_ready(client, url, wait)
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, inputs or [], enable_empty_final_response=True)
        while True:
            try:
                result, error = responses.get(timeout=timeout)
            except queue.Empty:
                raise GenerationError(f"no response from {model} at {url} within {timeout:.0f} s") from None
            if error is not None:
                raise GenerationError(f"{model}: {error.message() if hasattr(error, 'message') else error}")
            yield from chunks(result)
            if _is_final(result):
                return
    finally:
        try:
            client.stop_stream(cancel_requests=True)  # an early exit cancels the generation on the server
        finally:
            client.close()


def generate(url: str = DEFAULT_URL, model: str = GENERATE, timeout: float = 120.0, **request) -> list[Chunk]:
    """All the chunks of one request (the keyword arguments of request_inputs)."""
    return list(stream(url, request_inputs(**request), model, timeout))
