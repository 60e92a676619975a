"""A real Triton Inference Server (tritonserver 2.51 from PyPI's nvidia-pytriton, in the serving environment the tool
creates on first use) serving tiny builds' model repositories: every request of a mixed, staggered, partly cancelled
load gets the tokens the eager model gives it alone (1 and 2 pipeline stages); the pool is empty afterwards; a burst
larger than the pool waits and completes; bad, huge and hostile requests are refused while the server keeps serving;
a long prompt does not hold up a short one; builds in awkward paths serve; `dsa-export serve` drains on Ctrl-C, and
leaves nothing behind when the server is killed."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dsa_export.deploy import client
from dsa_export.deploy.client import GenerationError
from dsa_export.deploy.repository import GENERATE
from dsa_export.deploy.server import TritonServer, find_server, free_port
from dsa_export.serving.generation import TextCodec

pytestmark = pytest.mark.server
CAPACITY = 2048
MAX_TOKENS = 64  # a step's token budget: a longer prompt is fed in chunks
PROMPTS = [[5, 6, 7, 8], [1, 2, 3], [300, 17, 42, 99, 250, 11, 0, 64, 128], [2]]


def build_tiny(out, **options):
    from dsa_export.build import Options, run_build

    run_build(Options(out=out, **options), only=["checkpoint", "export", "deploy"], log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The tiny build (checkpoint with its tokenizer, export, model repository), as `dsa-export build` writes it."""
    return build_tiny(tmp_path_factory.mktemp("served") / "build", capacity=CAPACITY, max_tokens=MAX_TOKENS,
                      max_batch=16)


@pytest.fixture(scope="module")
def server(build):
    with TritonServer(build / "model_repository", [GENERATE], find_server(), log_path=build.parent / "server.log",
                      verbose=True, exit_timeout=5) as server:
        yield server


@pytest.fixture(scope="module")
def eager(build):
    return eager_tokens(build)


def eager_tokens(build):
    """Greedy tokens of the eager model on the build's checkpoint, each prompt alone: (prompt, n) → tokens."""
    from dsa_export.models import load_checkpoint
    from dsa_export.runtime import EagerBackend, Session

    model = load_checkpoint(build / "checkpoint", progress=False)
    known = {}

    def generate(prompt, max_new_tokens):
        key = (tuple(prompt), max_new_tokens)
        if key not in known:
            known[key] = Session(EagerBackend(model, capacity=CAPACITY)).generate([prompt], max_new_tokens)[0]
        return known[key]

    return generate


def tokens(chunks):
    assert [c.index for c in chunks] == list(range(len(chunks)))  # none lost, none repeated, in order
    return [c.token for c in chunks]


def metric(server, name):
    return server.metrics()[name]


def wait_until(server, condition, seconds=30):
    """Until condition() holds; a failure reports the server's scheduler metrics."""
    deadline = time.monotonic() + seconds
    while not condition():
        state = {k: v for k, v in server.metrics().items() if k.startswith("dsa_")}
        assert time.monotonic() < deadline, f"the server never got there: {state}"
        time.sleep(0.1)


def pool_empty(server):
    values = server.metrics()
    return (values["dsa_pool_blocks_in_use"], values["dsa_pool_blocks_promised"], values["dsa_requests_running"],
            values["dsa_requests_waiting"]) == (0, 0, 0, 0)


def test_greedy_tokens_equal_the_eager_models(server, eager):
    for prompt in PROMPTS:
        expected = eager(prompt, 32)
        assert tokens(client.generate(server.grpc_url, input_ids=prompt, max_new_tokens=32, stop_ids=[])) == expected
        # by default generation stops at the model's eos (id 1), which it streams
        stopped = client.generate(server.grpc_url, input_ids=prompt, max_new_tokens=32)
        end = expected.index(1) + 1 if 1 in expected else len(expected)
        assert tokens(stopped) == expected[:end]
    # a stop id the model picks ends the stream there
    expected = eager(PROMPTS[0], 16)
    assert tokens(client.generate(server.grpc_url, input_ids=PROMPTS[0], max_new_tokens=16,
                                  stop_ids=[expected[3]])) == expected[:expected.index(expected[3]) + 1]
    # the largest request that fits the capacity (prompt + max_new_tokens - 1 rows), its prompt fed in 32 chunks
    prompt = [random.Random(0).randrange(320) for _ in range(CAPACITY - 4)]
    assert tokens(client.generate(server.grpc_url, input_ids=prompt, max_new_tokens=5, stop_ids=[])) == \
        eager(prompt, 5)


def mixed_load(url, eager, requests=36, seed=0, lengths=(1, 4, 17, 60, 150, 300), new_tokens=(8, 24)):
    """`requests` requests started 0-30 ms apart from threads, prompts of mixed lengths (longer than a chunk too),
    every sixth closed after 3 tokens; each must get exactly the eager model's tokens for its prompt alone."""
    rng = random.Random(seed)
    work = [([rng.randrange(320) for _ in range(rng.choice(lengths))], rng.choice(new_tokens), i % 6 == 5)
            for i in range(requests)]
    results: dict = {}

    def run(i):
        prompt, n, cancel = work[i]
        try:
            stream = client.stream(url, client.request_inputs(prompt, max_new_tokens=n, stop_ids=[]))
            got = []
            for chunk in stream:
                got.append(chunk)
                if cancel and len(got) == 3:
                    stream.close()  # the client goes away mid-stream: the request is cancelled
                    break
            results[i] = tokens(got)
        except Exception as e:  # reported below, with the others
            results[i] = e

    threads = []
    for i in range(requests):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        time.sleep(rng.uniform(0, 0.03))
    for thread in threads:
        thread.join(300)
    for i, (prompt, n, cancel) in enumerate(work):
        expected = eager(prompt, n)
        assert results.get(i) == (expected[:3] if cancel else expected), f"request {i} ({len(prompt)} tokens)"
    return work


def test_a_mixed_staggered_load_gets_each_request_its_own_tokens(server, eager):
    steps = metric(server, "dsa_steps_total")
    work = mixed_load(server.grpc_url, eager)
    wait_until(server, lambda: pool_empty(server))  # cancelled and finished requests gave every block back
    fed = sum(len(p) + n - 1 for p, n, cancel in work if not cancel)
    assert metric(server, "dsa_steps_total") - steps < fed / 4  # batched: far fewer steps than tokens fed


def test_two_stages_and_a_pool_smaller_than_the_load(tmp_path, eager):
    """The tiny build cut into 2 pipeline stages (--gpus 2), with a pool of 8 blocks (512 tokens) for 36 requests of
    up to 5 blocks each: the load waits for blocks and completes, every request with its own tokens."""
    staged = build_tiny(tmp_path / "staged", capacity=CAPACITY, max_tokens=MAX_TOKENS, gpus=2, pool_tokens=512)
    assert [json.loads((staged / f"stage-{i}" / "io.json").read_text())["layers"] for i in (0, 1)] == [[0, 2], [2, 3]]
    with TritonServer(staged / "model_repository", [GENERATE], find_server(), log_path=tmp_path / "staged.log",
                      verbose=True) as two:
        waiting, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                waiting.append(metric(two, "dsa_requests_waiting"))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        mixed_load(two.grpc_url, eager, seed=1)
        stop.set()
        wait_until(two, lambda: pool_empty(two))
        assert max(waiting) > 0 and metric(two, "dsa_pool_blocks") == 8


def raw_inputs(**arrays):
    """gRPC inputs given as numpy arrays, any dtype: what a careless client sends."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


BAD_REQUESTS = [
    ("id outside the vocabulary", dict(input_ids=[5, 320], max_new_tokens=4), "token id 320 is outside the vocabulary"),
    ("negative id", dict(input_ids=[-3], max_new_tokens=4), "token id -3 is outside the vocabulary"),
    ("empty prompt", dict(input_ids=[], max_new_tokens=4), "the prompt is empty"),
    ("over the capacity", dict(input_ids=[1, 2, 3], max_new_tokens=CAPACITY),
     f"does not fit the cache capacity {CAPACITY}"),
    ("a prompt over the capacity", dict(input_ids=[7] * 100_000, max_new_tokens=1),
     f"a prompt of 100000 tokens does not fit the cache capacity {CAPACITY}"),
    ("an 8 MB text prompt", dict(prompt="x" * (8 << 20), max_new_tokens=1),
     "PROMPT is 8,388,608 bytes; this server takes at most 1,048,576"),
    ("a 1 MB text prompt", dict(prompt="lorem ipsum dolor " * 58_000, max_new_tokens=1),
     "does not fit the cache capacity"),
    ("zero new tokens", dict(input_ids=[1, 2], max_new_tokens=0), "MAX_NEW_TOKENS must be >= 1"),
    ("negative temperature", dict(input_ids=[1], max_new_tokens=2, temperature=-1.0), "TEMPERATURE must be"),
    ("negative top-k", dict(input_ids=[1], max_new_tokens=2, top_k=-4), "TOP_K must be >= 0"),
    ("top-p zero", dict(input_ids=[1], max_new_tokens=2, top_p=0.0), "TOP_P must be in (0, 1]"),
    ("ids and text", dict(input_ids=[1], prompt="hi", max_new_tokens=2), "send either INPUT_IDS"),
    ("chat template on ids", dict(input_ids=[1], chat=True, max_new_tokens=2), "applies to a text PROMPT"),
    ("float ids", raw_inputs(INPUT_IDS=np.array([1.0, 2.0], np.float32), MAX_NEW_TOKENS=np.array([2], np.int64)),
     "input 'INPUT_IDS' data-type is 'FP32', but model 'dsa_generate' expects 'INT64'"),
    ("no MAX_NEW_TOKENS", raw_inputs(INPUT_IDS=np.array([1, 2], np.int64)), "MAX_NEW_TOKENS is required"),
    ("two MAX_NEW_TOKENS", raw_inputs(INPUT_IDS=np.array([1], np.int64), MAX_NEW_TOKENS=np.array([2, 3], np.int64)),
     "unexpected shape for input 'MAX_NEW_TOKENS'"),
]


@pytest.mark.parametrize("request_, message", [(r, m) for _, r, m in BAD_REQUESTS], ids=[n for n, *_ in BAD_REQUESTS])
def test_a_bad_request_gets_an_error_and_the_server_keeps_serving(server, eager, request_, message):
    inputs = request_ if isinstance(request_, list) else client.request_inputs(**request_)
    with pytest.raises(GenerationError) as error:
        list(client.stream(server.grpc_url, inputs))
    assert message in str(error.value)
    assert tokens(client.generate(server.grpc_url, input_ids=[9, 8, 7], max_new_tokens=4, stop_ids=[])) == \
        eager([9, 8, 7], 4)


def test_a_long_prompt_does_not_hold_up_a_short_request(server, eager):
    """A prompt of 2,000 tokens (32 steps of prefill) and then a 3-token one: the short request is answered before
    the long one's first token (the prompts share each step's budget; the whole long prompt is never one step). Both
    streams have carried a request before the two are sent (a stream's connection is set up by its first request), so
    the short one follows the long one by a send (microseconds), not by a connection set up under load."""
    import tritonclient.grpc as grpcclient

    events, errors, finals = [], [], threading.Semaphore(0)
    long_prompt = [random.Random(1).randrange(320) for _ in range(2000)]

    def opened(name):
        stream = grpcclient.InferenceServerClient(server.grpc_url)

        def on_response(result, error):
            if error is not None:
                errors.append(error)
                finals.release()
                return
            events.extend((name, c.token) for c in client.chunks(result))
            if result.get_response().parameters["triton_final_response"].bool_param:
                finals.release()

        stream.start_stream(callback=on_response)
        return stream

    long, short = opened("long"), opened("short")
    for stream in (long, short):
        stream.async_stream_infer(GENERATE, client.request_inputs([7], max_new_tokens=1, stop_ids=[]),
                                  enable_empty_final_response=True)
    assert finals.acquire(timeout=60) and finals.acquire(timeout=60) and not errors
    events.clear()
    steps = metric(server, "dsa_steps_total")
    try:
        long.async_stream_infer(GENERATE, client.request_inputs(long_prompt, max_new_tokens=2, stop_ids=[]),
                                enable_empty_final_response=True)
        short.async_stream_infer(GENERATE, client.request_inputs([4, 5, 6], max_new_tokens=1, stop_ids=[]),
                                 enable_empty_final_response=True)
        assert finals.acquire(timeout=60) and finals.acquire(timeout=60)
    finally:
        for stream in (long, short):
            stream.stop_stream()
            stream.close()
    assert not errors and [name for name, _ in events] == ["short", "long", "long"]
    assert [t for name, t in events if name == "long"] == eager(long_prompt, 2)
    wait_until(server, lambda: metric(server, "dsa_steps_total") - steps >= 2000 // MAX_TOKENS)


def test_clients_that_vanish_mid_stream_free_their_blocks(server, eager):
    cancelled = metric(server, "dsa_requests_cancelled_total")
    # client processes killed after 3 tokens of 2,000 (they never close their streams; 2,000 tokens take seconds, so
    # their requests cannot end before the server notices, in a tenth of a second, even on a loaded machine)
    code = ("import os, sys\nfrom dsa_export.deploy import client\n"
            "for chunk in client.stream(sys.argv[1], client.request_inputs([4, 4, 4], max_new_tokens=2000, "
            "stop_ids=[])):\n    if chunk.index == 2:\n        print('got 3', flush=True)\n        os._exit(0)\n")
    killed = [subprocess.Popen([sys.executable, "-c", code, server.grpc_url], stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    assert [p.communicate(timeout=60)[0].strip() for p in killed] == ["got 3"] * 4
    # a client that stops reading: closing the stream cancels the request
    stream = client.stream(server.grpc_url, client.request_inputs([6, 6], max_new_tokens=2000, stop_ids=[]))
    assert [next(stream).index for _ in range(2)] == [0, 1]
    stream.close()
    wait_until(server, lambda: metric(server, "dsa_requests_cancelled_total") - cancelled == 5 and pool_empty(server))
    assert tokens(client.generate(server.grpc_url, input_ids=[4, 4, 4], max_new_tokens=8, stop_ids=[])) == \
        eager([4, 4, 4], 8)


def test_sampling_is_seeded(server, eager):
    def sample(seed, top_k=8, top_p=0.9):
        return tokens(client.generate(server.grpc_url, input_ids=[3, 1, 4], max_new_tokens=12, temperature=0.9,
                                      top_k=top_k, top_p=top_p, seed=seed, stop_ids=[]))

    assert sample(7) == sample(7)
    assert len({tuple(sample(seed)) for seed in range(4)}) > 1
    assert sample(3, top_k=1) == eager([3, 1, 4], 12)  # top-1 sampling is greedy


def test_text_in_text_out(server, build, eager):
    codec = TextCodec(build)
    for prompt, chat in (("Hello, world!", False), ("How are you today?", True)):
        ids = codec.encode_prompt(prompt, chat)
        expected = eager(ids, 24)
        chunks = client.generate(server.grpc_url, prompt=prompt, chat=chat, max_new_tokens=24, stop_ids=[])
        assert tokens(chunks) == expected
        assert "".join(c.text for c in chunks) == codec.decode(expected)
    # the command line prints the text as it arrives
    result = subprocess.run([sys.executable, "-m", "dsa_export.cli", "generate", "--url", server.grpc_url, "--prompt",
                             "Hello, world!", "--chat", "--max-new-tokens", "20", "--ignore-eos"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = eager(codec.encode_prompt("Hello, world!", chat=True), 20)
    assert result.stdout == codec.decode(expected) + "\n"
    assert "20 tokens in" in result.stderr


def test_only_the_generation_model_is_there_to_call(server):
    """No step model to reach: a client can name its own request and nothing else (no sequence id to guess)."""
    import tritonclient.grpc as grpcclient

    triton = grpcclient.InferenceServerClient(server.grpc_url)
    assert [m.name for m in triton.get_model_repository_index().models] == [GENERATE]
    config = triton.get_model_config(GENERATE).config
    assert not config.HasField("sequence_batching")
    with pytest.raises(GenerationError, match="unknown model"):
        list(client.stream(server.grpc_url, client.request_inputs([1], max_new_tokens=1), model="dsa_onnx"))


def test_a_build_in_an_awkward_path_with_a_runaway_chat_template(build, tmp_path, eager):
    """A build directory whose path holds a space and non-ASCII letters serves (the Python backend's stub cannot start
    from such a path: the server is given an ASCII symlink); a chat template that never ends costs its request 5 s
    and an error, while other requests stream."""
    import shutil

    awkward = tmp_path / "my builds" / "déjà vu"
    shutil.copytree(build, awkward, ignore=shutil.ignore_patterns("checkpoint"))
    config_path = awkward / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    config_path.write_text(json.dumps(config))
    with TritonServer(awkward / "model_repository", [GENERATE], find_server(), log_path=tmp_path / "log") as other:
        assert tokens(client.generate(other.grpc_url, input_ids=PROMPTS[0], max_new_tokens=8, stop_ids=[])) == \
            eager(PROMPTS[0], 8)
        errors = []

        def chat():
            try:
                client.generate(other.grpc_url, prompt="hi", chat=True, max_new_tokens=2)
            except GenerationError as e:
                errors.append(str(e))

        worker = threading.Thread(target=chat)
        worker.start()
        time.sleep(0.2)
        assert tokens(client.generate(other.grpc_url, input_ids=[8, 9], max_new_tokens=4, stop_ids=[])) == \
            eager([8, 9], 4)
        assert worker.is_alive()  # the template is still running, in its own process
        worker.join(60)
        assert errors and "tokenizing the request took longer than 5 s" in errors[0]
        text = client.generate(other.grpc_url, prompt="Hello", max_new_tokens=2, stop_ids=[])  # a fresh worker
        assert len(text) == 2


def serve_command(build, *extra):
    ports = [free_port() for _ in range(4)]
    command = [sys.executable, "-m", "dsa_export.cli", "serve", str(build), "--grpc-port", str(ports[0]),
               "--http-port", str(ports[1]), "--metrics-port", str(ports[2]), "--port", str(ports[3]), *extra]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    for line in serve.stdout:
        lines.append(line)
        if "ready after" in line or len(lines) > 20:
            break
    assert any(f"gRPC 127.0.0.1:{ports[0]}" in line for line in lines), lines
    return serve, f"127.0.0.1:{ports[0]}"


def test_serve_drains_running_streams_on_ctrl_c(build, eager):
    """`dsa-export serve BUILD_DIR` starts the server and says so; `dsa-export generate --prompt-ids` streams the
    eager model's tokens; Ctrl-C (SIGINT) lets a running stream finish, then stops the server (exit 130) and leaves
    no process and no shared memory behind."""
    serve, url = serve_command(build)
    shm, got = Path("/dev/shm"), []
    try:
        result = subprocess.run([sys.executable, "-m", "dsa_export.cli", "generate", "--url", url, "--prompt-ids",
                                 "1,2,3", "--max-new-tokens", "16", "--ignore-eos"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert [int(t) for t in result.stdout.split()] == eager([1, 2, 3], 16)
        regions = list(shm.glob(f"dsa_export_{serve.pid}_*"))
        assert regions and all(r.stat().st_mode & 0o077 == 0 for r in regions)  # this user's only
        stream = client.stream(url, client.request_inputs([5, 6], max_new_tokens=1500, stop_ids=[]))
        got = [next(stream) for _ in range(3)]
        serve.send_signal(signal.SIGINT)
        got += list(stream)
    finally:
        if serve.poll() is None and not got:  # the test failed before Ctrl-C
            serve.send_signal(signal.SIGINT)
        rest, _ = serve.communicate(timeout=120)
    assert len(tokens(got)) == 1500 and tokens(got)[:20] == eager([5, 6], 20)  # drained, not cut
    assert serve.returncode == 130, rest  # the README's exit code for SIGINT, after stopping cleanly
    assert "stopped" in rest
    assert not list(shm.glob(f"dsa_export_{serve.pid}_*"))
    assert subprocess.run(["pgrep", "-f", f"grpc-port={url.split(':')[1]}"], capture_output=True).stdout == b""


def test_a_killed_server_leaves_nothing_behind(build):
    """tritonserver killed (SIGKILL) under load: `serve` says so in one line (exit 2), and no process of it (the
    model's stub, its tokenizer worker) and none of its shared memory is left."""
    serve, url = serve_command(build)
    stream = client.stream(url, client.request_inputs([5, 6], max_new_tokens=1500, stop_ids=[]))
    next(stream)
    port = url.split(":")[1]
    server_pid = int(subprocess.run(["pgrep", "-f", f"grpc-port={port}"], capture_output=True, text=True).stdout)
    group = os.getpgid(server_pid)
    os.kill(server_pid, signal.SIGKILL)
    with pytest.raises(GenerationError):
        list(stream)
    rest, _ = serve.communicate(timeout=60)
    assert serve.returncode == 2 and "tritonserver was killed (SIGKILL)" in rest, rest
    assert subprocess.run(["pgrep", "-g", str(group)], capture_output=True).stdout == b""
    assert not list(Path("/dev/shm").glob(f"dsa_export_{serve.pid}_*"))


def test_serve_refuses_an_engine_build_on_a_cpu_server(build, tmp_path):
    import shutil

    from dsa_export.deploy.repository import write_repository

    gpu_build = tmp_path / "gpu"
    shutil.copytree(build, gpu_build, ignore=shutil.ignore_patterns("model_repository", "checkpoint"))
    (gpu_build / "engine").mkdir()
    (gpu_build / "engine" / "model.plan").write_bytes(b"a plan")
    (gpu_build / "engine" / "engine.json").write_text('{"profiles": ["step"]}')
    write_repository(gpu_build)
    result = subprocess.run([sys.executable, "-m", "dsa_export.cli", "serve", str(gpu_build)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "serve it in NVIDIA's Triton container" in result.stderr


def test_serve_refuses_what_it_cannot_serve(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dsa_export.cli", "serve", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no dsa_generate/config.pbtxt" in result.stderr


def test_a_server_that_cannot_start_is_one_clear_error(build, tmp_path):
    """The model fails to load (its graph is missing): the error names it, from the server's log."""
    import shutil

    from dsa_export.deploy.repository import config_text, read_config
    from dsa_export.errors import DSAExportError

    repository = tmp_path / "repo"
    shutil.copytree(build / "model_repository", repository)
    path = repository / GENERATE / "config.pbtxt"
    config = read_config(path)
    stages = json.loads(config.parameters["stages"].string_value)
    stages[0] = {key: str(tmp_path / "nowhere" / Path(value).name) if isinstance(value, str) else value
                 for key, value in stages[0].items()}
    config.parameters["stages"].string_value = json.dumps(stages)
    path.write_text(config_text(config))
    with pytest.raises(DSAExportError, match="exited .* before it was ready: .*dsa_generate"):
        TritonServer(repository, [GENERATE], find_server(), log_path=tmp_path / "log").start()


def test_serving_environment_has_numpy_below_2():
    """The Python backend corrupts tensors with numpy >= 2 (trt-triton-recipes.md A2)."""
    install = find_server()
    python = install.python_bin / "python"
    code = "import json, numpy, onnxruntime, tokenizers, jinja2; print(json.dumps([numpy.__version__]))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    (numpy_version,) = json.loads(out.stdout)
    assert int(numpy_version.split(".")[0]) < 2
    assert Path(install.backend_dir, "python", "triton_python_backend_stub").is_file()


def test_every_block_came_back_and_the_server_stops_cleanly(server, build):
    """Last (it stops the module's server): after everything above, cancelled and malformed requests included, the
    pool is empty; draining refuses new requests; stopping removes the server's shared memory (the malformed dtype
    request above keeps Triton 2.51 from unloading the model: it exits at its exit timeout, and nothing is left)."""
    wait_until(server, lambda: pool_empty(server))
    assert server.shm_regions()
    assert server.drain(30)
    with pytest.raises(GenerationError, match="the server is shutting down"):
        client.generate(server.grpc_url, input_ids=[1], max_new_tokens=1)
    server.stop()
    assert not server.shm_regions()
