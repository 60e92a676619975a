"""Triton Inference Server model `dsa_generate` (Python backend, decoupled): token ids or text in, one response per
new token out, as each is made, for many requests at once.

Copied into the model repository as `dsa_generate/1/model.py`, beside scheduler.py (continuous batching over the
paged cache pools), generation.py (the request contract, its checks, text), io_spec.py and the graph runner
(ort_graph.py on the CPU, trt_graph.py for the TensorRT engines). The model runs the export's graphs itself, one per
pipeline stage (stage i on GPU i), with their pools allocated once at load; no other model is exposed, so a client
can reach its own request and nothing else (there is no sequence id to guess, no step to call).

execute() only reads and checks each request (token ids: at once; text: queued to a tokenizer thread, which runs the
tokenizer and the chat template in a process of its own with time and memory limits) and hands it to the scheduler,
whose thread runs the steps; a responder thread streams the new tokens to each request's sender. A bad request gets one error response; the model keeps
serving. Unloading (the server stopping) lets what is running finish first, for up to `drain_seconds`.
"""

import json
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from generation import (MAX_STOP_IDS, GenerationRequest, RequestError, TextCodec, TextWorker, check_request,
                        max_prompt_bytes)
from io_spec import GraphIO
from scheduler import Refused, Scheduler, Sequence
from stages import NODES_ENV, RemoteStage, load_graph, node_addresses, read_key

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_SECONDS = 0.2  # how often the server's metrics are brought up to date
# metric name → (description, the scheduler's stats key); gauges (what is now) and counters (totals)
DRAIN_FILE_ENV = "DSA_EXPORT_DRAIN_FILE"  # set by deploy/server.py: once the file exists, no new request is taken
GAUGES = {
    "dsa_pool_blocks": ("Cache blocks in the pool (each `block_size` tokens, every layer)", "pool_blocks"),
    "dsa_pool_blocks_in_use": ("Cache blocks holding tokens of running requests", "pool_blocks_in_use"),
    "dsa_pool_blocks_promised": ("Cache blocks promised to running requests, not yet used", "pool_blocks_promised"),
    "dsa_cache_tokens": ("Tokens the running requests hold in the cache, or are writing (what the blocks in use hold)",
                         "cache_tokens"),
    "dsa_requests_running": ("Requests generating (in the running batch)", "running"),
    "dsa_requests_waiting": ("Requests waiting for the tokenizer, cache blocks or a place in the batch", "waiting"),
    "dsa_draining": ("1 once the server takes no new requests (it is stopping)", "draining"),
}
COUNTERS = {
    "dsa_steps_total": ("Steps run (packed batches through every stage)", "steps"),
    "dsa_step_seconds_total": ("Seconds from a step's start to its results, summed over the steps", "step_seconds"),
    "dsa_prompt_and_decode_tokens_total": ("Tokens fed to the model (prompt chunks and generated tokens)",
                                           "tokens_fed"),
    "dsa_generated_tokens_total": ("Tokens generated", "tokens_generated"),
    "dsa_requests_finished_total": ("Requests that generated all they asked for, or a stop id", "requests_done"),
    "dsa_requests_cancelled_total": ("Requests their clients cancelled", "requests_cancelled"),
    "dsa_requests_failed_total": ("Requests a failed step ended", "requests_failed"),
}


class Stream:
    """One request's responses on their way out: the tokens the scheduler made that are not sent yet."""

    def __init__(self, sender, text):
        self.sender, self.text = sender, text  # text: a TextStream, or None without a tokenizer
        self.tokens, self.logprobs, self.index = [], [], 0  # pending, and the INDEX of the first of them
        self.last = False
        self.error = None
        self.gone = False  # the client cancelled, or its responses cannot be sent: the scheduler drops it
        self.asked = 0.0  # when the server was last asked whether the client cancelled
        self.sent = 0.0  # when its last response went


class Responder:
    """Every request's responses, sent from one thread, off the step loop. A send is a round trip to the server
    process (about 0.3 ms of CPU), and so is asking whether a client cancelled: done for every token of every request
    they would take more of the machine than the steps themselves. So the step loop only queues new tokens here, and
    each request gets a response at most every SEND_SECONDS_PER_REQUEST x the requests running (1 ms with one
    running, 32 ms with 32: a response then carries the tokens made since the last, TOKEN, INDEX and LOGPROB holding
    one or more values and TEXT the text they complete); a request's first token and its last go out at once. Each
    client is asked whether it cancelled at most every CANCEL_SECONDS_PER_REQUEST x the requests running (at least
    every 0.1 s), so the scheduler only reads a flag."""

    SEND_SECONDS_PER_REQUEST = 0.002
    CANCEL_SECONDS_PER_REQUEST = 0.01

    def __init__(self):
        self.lock = threading.Condition()
        self.pending: dict[int, Stream] = {}  # streams with something to send
        self.watched: dict[int, Stream] = {}  # every stream not finished
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True, name="dsa-responder")
        self.thread.start()

    def watch(self, stream: Stream) -> None:
        with self.lock:
            if not (stream.last or stream.error):
                self.watched[id(stream)] = stream

    def emit(self, stream: Stream, token: int, logprob: float, index: int, last: bool) -> None:
        with self.lock:
            if not stream.tokens:
                stream.index = index
            stream.tokens.append(token)
            stream.logprobs.append(logprob)
            stream.last = last
            self.pending[id(stream)] = stream
            self.lock.notify()

    def fail(self, stream: Stream, message: str) -> None:
        with self.lock:
            stream.error = message
            self.pending[id(stream)] = stream
            self.lock.notify()

    def stop(self) -> None:
        """After what is pending is sent."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.pending or self.stopping, timeout=0.1)
                if self.stopping and not self.pending:
                    return
                now = time.monotonic()
                running = max(1, len(self.watched))
                interval = self.SEND_SECONDS_PER_REQUEST * running
                batch = []
                for key, stream in list(self.pending.items()):
                    if not (self.stopping or stream.last or stream.error is not None or stream.index == 0
                            or now - stream.sent >= interval):
                        continue  # more tokens may join these
                    batch.append((stream, stream.tokens, stream.logprobs, stream.index, stream.last, stream.error))
                    stream.tokens, stream.logprobs = [], []
                    del self.pending[key]
                    if stream.last or stream.error is not None:
                        self.watched.pop(key, None)
                ask = max(0.1, self.CANCEL_SECONDS_PER_REQUEST * running)
                idle = [s for s in self.watched.values() if now - s.asked > ask]
            for stream, tokens, logprobs, index, last, error in batch:
                stream.sent = time.monotonic()
                self._send(stream, tokens, logprobs, index, last, error)
            for stream in idle:
                stream.asked = time.monotonic()
                try:
                    stream.gone = stream.gone or stream.sender.is_cancelled()
                except Exception:  # nobody to ask: gone
                    stream.gone = True
            if not batch and self.pending:  # tokens held back: wait for their time
                time.sleep(min(interval, 0.01))

    def _send(self, stream: Stream, tokens, logprobs, index, last, error) -> None:
        try:
            if tokens:
                text = "".join(stream.text.step(t) for t in tokens) if stream.text else ""
                if last and stream.text:
                    text += stream.text.finish()
                stream.sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("TOKEN", np.array(tokens, dtype=np.int64)),
                    pb_utils.Tensor("INDEX", np.arange(index, index + len(tokens), dtype=np.int64)),
                    pb_utils.Tensor("TEXT", np.array([text.encode("utf-8")], dtype=np.object_)),
                    pb_utils.Tensor("LOGPROB", np.array(logprobs, dtype=np.float32))]),
                    flags=FINAL if last and error is None else 0)
            if error is not None:
                stream.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)), flags=FINAL)
        except Exception as e:  # the client is gone: its request ends
            stream.gone = True
            pb_utils.Logger.log_warn(f"dsa_generate: cannot send a response ({type(e).__name__}: {e})")


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def _scalar(request, name, default):
    value = _input(request, name)
    if value is None:
        return default
    if value.size != 1:
        raise RequestError(f"{name} must hold one value, got {value.size}")
    return value[0].item()


def _python() -> str:
    """The Python that runs the tokenizer worker: this one (the stub embeds it; its sys.executable may be the stub)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    return shutil.which("python3") or shutil.which("python") or "python3"


def _graphs(here: Path, runtime: str, stages: list[dict], key: str) -> list:
    """The export's graphs, one per pipeline stage in layer order (the paths are relative to the model directory):
    this node's, and those on other nodes (their servers' addresses from NODES_ENV, set by `dsa-export serve`)."""
    addresses = node_addresses(os.environ.get(NODES_ENV))
    graphs = []
    for stage, files in enumerate(stages):
        node = files.get("node", 0)
        if node == 0:
            graphs.append(load_graph(here, runtime, files, device=files.get("gpu", stage)))
        elif node not in addresses:
            raise RuntimeError(f"stage {stage} runs on node {node}: serve this node with --node-address "
                               f"{node}=HOST:PORT (that node's Triton gRPC)")
        else:
            graphs.append(RemoteStage(GraphIO.load(here / files["io_file"]), stage, node, addresses[node], key))
    return graphs


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"])  # the model's directory: the other paths are relative to it
        graphs = _graphs(here, parameters["runtime"], json.loads(parameters["stages"]), read_key(here))
        io = graphs[0].io
        self.capacity, self.vocab_size = io.capacity, io.vocab_size
        self.drain_seconds = float(parameters["drain_seconds"])
        self.scheduler = Scheduler(graphs, pool_blocks=int(parameters["pool_tokens"]) // io.block_size,
                                   max_batch=int(parameters["max_batch"]), max_tokens=int(parameters["max_tokens"]),
                                   max_waiting=int(parameters["max_waiting"]), log=pb_utils.Logger.log_warn)
        model_config = json.loads((here / parameters["config_file"]).read_text(encoding="utf-8"))
        tokenizer_dir = here / parameters["tokenizer_dir"]
        self.codec = self.text = None
        if TextCodec.exists(tokenizer_dir):
            self.codec = TextCodec(tokenizer_dir)  # in process for decoding the new tokens only
            self.text = TextWorker(tokenizer_dir, python=_python())
        eos = model_config.get("eos_token_id")  # one id or a list of them
        if eos is None and self.codec is not None:
            eos = self.codec.eos_id
        self.default_stop_ids = [] if eos is None else [int(t) for t in (eos if isinstance(eos, list) else [eos])]
        self.max_waiting = int(parameters["max_waiting"])
        self.intake = queue.Queue()  # text requests waiting for the tokenizer
        self.stopping = threading.Event()
        self.draining = False
        self.responder = Responder()
        self._metrics()
        self.threads = [threading.Thread(target=self._tokenize_loop, daemon=True, name="dsa-tokenizer"),
                        threading.Thread(target=self._metrics_loop, daemon=True, name="dsa-metrics")]
        for thread in self.threads:
            thread.start()
        stats = self.scheduler.stats()
        pb_utils.Logger.log_info(
            f"dsa_generate: {len(graphs)} stage(s) on {parameters['runtime']}, capacity {self.capacity}, pool of "
            f"{stats['pool_blocks']} blocks x {io.block_size} tokens, at most {parameters['max_batch']} sequences and "
            f"{parameters['max_tokens']} tokens per step; text {'on' if self.codec else 'off (no tokenizer.json)'}, "
            f"default stop ids {self.default_stop_ids}")

    # ---- requests ----------------------------------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:  # read everything now: later only the sender is used
                if self.draining:
                    raise RequestError("the server is shutting down; send the request again elsewhere or later")
                generation, text = self.parse(request)
                if text is None:
                    self.start(sender, generation)
                elif self.intake.qsize() >= self.max_waiting:
                    raise RequestError(f"the server is busy: {self.intake.qsize()} text requests are waiting to be "
                                       f"tokenized; retry later")
                else:
                    self.intake.put((sender, generation, text))
            except Exception as e:  # every request gets an answer: a bad one, its error
                self.refuse(sender, e)
        return None

    def refuse(self, sender, error: Exception) -> None:
        message = str(error) if isinstance(error, (RequestError, Refused)) else \
            f"cannot read the request ({type(error).__name__}: {error})"
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
        except Exception as e:
            pb_utils.Logger.log_warn(f"dsa_generate: cannot send an error to a client ({e})")

    def parse(self, request):
        """The request and, for a text prompt, (text, apply the chat template) to tokenize; checks that need no
        tokenizer are done here."""
        ids, prompt = _input(request, "INPUT_IDS"), _input(request, "PROMPT")
        chat = bool(_scalar(request, "APPLY_CHAT_TEMPLATE", False))
        if (ids is None) == (prompt is None):
            raise RequestError("send either INPUT_IDS (token ids) or PROMPT (text), not both or neither")
        text = None
        if prompt is not None:
            if self.text is None:
                raise RequestError("PROMPT: this build has no tokenizer (tokenizer.json in the checkpoint); send "
                                   "INPUT_IDS")
            if prompt.size != 1:
                raise RequestError(f"PROMPT must hold one string, got {prompt.size}")
            raw = prompt[0] if isinstance(prompt[0], bytes) else str(prompt[0]).encode("utf-8")
            if len(raw) > max_prompt_bytes(self.capacity):
                raise RequestError(f"PROMPT is {len(raw):,} bytes; this server takes at most "
                                   f"{max_prompt_bytes(self.capacity):,} (its capacity is {self.capacity} tokens)")
            try:
                text = (raw.decode("utf-8"), chat)
            except UnicodeDecodeError:
                raise RequestError("PROMPT is not valid UTF-8") from None
        elif chat:
            raise RequestError("APPLY_CHAT_TEMPLATE applies to a text PROMPT, not to INPUT_IDS")
        if ids is not None and ids.size > self.capacity:  # before anything is made of it
            raise RequestError(f"a prompt of {ids.size} tokens does not fit the cache capacity {self.capacity}")
        stop_ids = _input(request, "STOP_IDS")
        if stop_ids is not None and stop_ids.size > MAX_STOP_IDS:
            raise RequestError(f"at most {MAX_STOP_IDS} STOP_IDS, got {stop_ids.size}")
        max_new_tokens = _scalar(request, "MAX_NEW_TOKENS", None)
        if max_new_tokens is None:
            raise RequestError("MAX_NEW_TOKENS is required: the most tokens to generate")
        generation = GenerationRequest(
            prompt_ids=[] if ids is None else ids.astype(np.int64).tolist(), max_new_tokens=int(max_new_tokens),
            temperature=float(_scalar(request, "TEMPERATURE", 0.0)), top_k=int(_scalar(request, "TOP_K", 0)),
            top_p=float(_scalar(request, "TOP_P", 1.0)), seed=int(_scalar(request, "SEED", 0)),
            stop_ids=self.default_stop_ids if stop_ids is None else [int(t) for t in stop_ids])
        if ids is not None:
            check_request(generation, self.vocab_size, self.capacity)
        return generation, text

    def start(self, sender, generation: GenerationRequest) -> None:
        """Hand a checked request to the scheduler (Refused if it cannot take it)."""
        stream = Stream(sender, self.codec.stream() if self.codec else None)
        self.scheduler.submit(Sequence(
            generation.prompt_ids, generation.max_new_tokens, lambda *token: self.responder.emit(stream, *token),
            lambda message: self.responder.fail(stream, message), lambda: stream.gone,
            temperature=generation.temperature, top_k=min(generation.top_k, 1 << 30), top_p=generation.top_p,
            seed=generation.seed, stop_ids=frozenset(generation.stop_ids)))
        self.responder.watch(stream)

    def _tokenize_loop(self):
        """Text requests, one at a time: tokenized (and templated) by the worker process, then scheduled."""
        while not self.stopping.is_set():
            try:
                sender, generation, (text, chat) = self.intake.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if sender.is_cancelled():
                    raise RequestError("the request was cancelled")  # its last response, which nobody reads
                generation.prompt_ids = (self.text.encode_chat([{"role": "user", "content": text}]) if chat
                                         else self.text.encode(text))
                check_request(generation, self.vocab_size, self.capacity)
                self.start(sender, generation)
            except Exception as e:
                self.refuse(sender, e)

    def _metrics(self):
        """The server's metrics this model reports (created once: the families must outlive their metrics)."""
        self.families = {name: pb_utils.MetricFamily(name, text, kind) for kinds, kind in (
            (GAUGES, pb_utils.MetricFamily.GAUGE), (COUNTERS, pb_utils.MetricFamily.COUNTER))
            for name, (text, _) in kinds.items()}
        self.metrics = {name: family.Metric(labels={}) for name, family in self.families.items()}

    def _metrics_loop(self):
        """The scheduler's state as the server's metrics (GET /metrics on its metrics port)."""
        reported = {}
        drain_file = os.environ.get(DRAIN_FILE_ENV)
        while not self.stopping.wait(METRICS_SECONDS):
            if drain_file and not self.draining and os.path.exists(drain_file):
                pb_utils.Logger.log_info("dsa_generate: draining (no new requests; the running ones finish)")
                self.draining = True
                self.scheduler.drain()
            stats = self.scheduler.stats()
            stats["waiting"] += self.intake.qsize()
            stats["draining"] = int(self.draining)
            for name, (_, key) in GAUGES.items():
                if reported.get(name) != stats[key]:
                    self.metrics[name].set(stats[key])
                    reported[name] = stats[key]
            for name, (_, key) in COUNTERS.items():
                if stats[key] > reported.get(name, 0):
                    self.metrics[name].increment(stats[key] - reported.get(name, 0))
                    reported[name] = stats[key]

    def finalize(self):
        started = time.monotonic()
        self.scheduler.stop(drain_seconds=self.drain_seconds)
        self.responder.stop()
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=5)
        if self.text is not None:
            self.text.close()
        pb_utils.Logger.log_info(f"dsa_generate: stopped after draining for {time.monotonic() - started:.1f} s "
                                 f"({os.getpid()})")
