"""A real Triton Inference Server (tritonserver 2.51 from PyPI's nvidia-pytriton, in the serving environment the tool
creates on first use) serving the tiny build's model repository: streamed tokens equal the eager model's, concurrent
streams, bad requests refused while the server keeps serving, clients that vanish mid-stream, text in and out, and
`dsa-export serve` / `generate` as a user runs them."""

import json
import os
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
from dsa_export.serving.generation import TextCodec
from dsa_export.deploy.repository import GENERATE, STEP_ONNX
from dsa_export.deploy.server import TritonServer, find_server, free_port

pytestmark = pytest.mark.server
CAPACITY = 96
PROMPTS = [[5, 6, 7, 8], [1, 2, 3], [300, 17, 42, 99, 250, 11, 0, 64, 128], [2]]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The tiny build (checkpoint with its tokenizer, export, model repository), as `dsa-export build` writes it."""
    from dsa_export.build import Options, run_build

    out = tmp_path_factory.mktemp("served") / "build"
    run_build(Options(out=out, capacity=CAPACITY), only=["checkpoint", "export", "deploy"], log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def server(build):
    with TritonServer(build / "model_repository", [STEP_ONNX, GENERATE], find_server(),
                      log_path=build.parent / "server.log", verbose=True) as server:
        yield server


@pytest.fixture(scope="module")
def eager(build):
    """Greedy tokens of the eager model on the build's checkpoint: (prompt, n) → tokens."""
    from dsa_export.models import load_checkpoint
    from dsa_export.runtime import EagerBackend, Session

    model = load_checkpoint(build / "checkpoint", progress=False)

    def generate(prompt, max_new_tokens):
        return Session(EagerBackend(model, capacity=CAPACITY)).generate([prompt], max_new_tokens)[0]

    return generate


def tokens(chunks):
    assert [c.index for c in chunks] == list(range(len(chunks)))  # none lost, none repeated, in order
    return [c.token for c in chunks]


def test_greedy_tokens_equal_the_eager_models(server, eager):
    for prompt in PROMPTS:
        expected = eager(prompt, 32)
        assert tokens(client.generate(server.grpc_url, input_ids=prompt, max_new_tokens=32, stop_ids=[])) == expected
        # by default generation stops at the model's eos (id 1), which it streams
        stopped = client.generate(server.grpc_url, input_ids=prompt, max_new_tokens=32)
        end = expected.index(1) + 1 if 1 in expected else len(expected)
        assert tokens(stopped) == expected[:end]
    # a stop id the model picks ends the stream there, and the next sequence is unaffected
    expected = eager(PROMPTS[0], 16)
    assert tokens(client.generate(server.grpc_url, input_ids=PROMPTS[0], max_new_tokens=16,
                                  stop_ids=[expected[3]])) == expected[:expected.index(expected[3]) + 1]
    # the largest request that fits the capacity: prompt + max_new_tokens - 1 rows
    prompt = PROMPTS[2]
    n = CAPACITY - len(prompt) + 1
    assert tokens(client.generate(server.grpc_url, input_ids=prompt, max_new_tokens=n, stop_ids=[])) == \
        eager(prompt, n)


def test_concurrent_streams_all_complete_with_the_right_tokens(server, eager):
    prompts = [[i + 3, 2 * i + 7, 100 + i] for i in range(8)]
    expected = [eager(p, 24) for p in prompts]
    results: dict = {}

    def run(i):
        try:
            results[i] = tokens(client.generate(server.grpc_url, input_ids=prompts[i], max_new_tokens=24,
                                                stop_ids=[]))
        except Exception as e:  # reported below, with the others
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(8)] == expected


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
    ("zero new tokens", dict(input_ids=[1, 2], max_new_tokens=0), "MAX_NEW_TOKENS must be >= 1"),
    ("negative temperature", dict(input_ids=[1], max_new_tokens=2, temperature=-1.0), "TEMPERATURE must be"),
    ("negative top-k", dict(input_ids=[1], max_new_tokens=2, top_k=-4), "TOP_K must be >= 0"),
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


def test_clients_that_vanish_mid_stream_do_not_wedge_the_server(server, build, eager):
    # a client process killed after 3 tokens of 200 (it never closes its stream)
    code = ("import os, sys\nfrom dsa_export.deploy import client\n"
            "for chunk in client.stream(sys.argv[1], client.request_inputs([4, 4, 4], max_new_tokens=80, "
            "stop_ids=[])):\n    if chunk.index == 2:\n        print('got 3', flush=True)\n        os._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", code, server.grpc_url], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "got 3", done.stderr
    # a client that stops reading: closing the stream cancels the request
    stream = client.stream(server.grpc_url, client.request_inputs([6, 6], max_new_tokens=80, stop_ids=[]))
    assert [next(stream).index for _ in range(2)] == [0, 1]
    stream.close()
    deadline = time.monotonic() + 20
    log = build.parent / "server.log"
    while log.read_text().count("cancelled after") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert log.read_text().count("cancelled after") == 2  # the server noticed both, and stopped generating
    assert tokens(client.generate(server.grpc_url, input_ids=[4, 4, 4], max_new_tokens=8, stop_ids=[])) == \
        eager([4, 4, 4], 8)


def test_sampling_is_seeded(server, eager):
    def sample(seed, top_k=8):
        return tokens(client.generate(server.grpc_url, input_ids=[3, 1, 4], max_new_tokens=12, temperature=0.9,
                                      top_k=top_k, seed=seed, stop_ids=[]))

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


def test_two_pipeline_stages_give_the_tokens_of_one(build, tmp_path):
    """The tiny build cut into 2 pipeline stages (--gpus 2: two graphs with hidden-state I/O, one step model each,
    chained by dsa_generate) streams exactly the tokens of the 1-stage build, on the real server."""
    from dsa_export.deploy.repository import step_models_of
    from dsa_export.build import Options, run_build

    staged = tmp_path / "staged"
    run_build(Options(out=staged, capacity=CAPACITY, gpus=2), only=["checkpoint", "export", "deploy"],
              log=lambda line: None)
    assert [json.loads((staged / f"stage-{i}" / "io.json").read_text())["layers"] for i in (0, 1)] == [[0, 2], [2, 3]]
    assert step_models_of(staged / "model_repository") == ["dsa_onnx_0", "dsa_onnx_1"]
    with TritonServer(build / "model_repository", [STEP_ONNX, GENERATE], find_server()) as one, \
            TritonServer(staged / "model_repository", ["dsa_onnx_0", "dsa_onnx_1", GENERATE], find_server(),
                         log_path=tmp_path / "staged.log", verbose=True) as two:
        for prompt in PROMPTS:
            expected = tokens(client.generate(one.grpc_url, input_ids=prompt, max_new_tokens=32, stop_ids=[]))
            assert tokens(client.generate(two.grpc_url, input_ids=prompt, max_new_tokens=32, stop_ids=[])) == expected
    log = (tmp_path / "staged.log").read_text()
    assert "dsa_onnx_0: unloading with 0 sequences held" in log and "dsa_onnx_1: unloading with 0 sequences held" in log


def test_serve_refuses_an_engine_build_on_a_cpu_server(build, tmp_path):
    import shutil

    from dsa_export.deploy.repository import write_repository

    gpu_build = tmp_path / "gpu"
    shutil.copytree(build, gpu_build, ignore=shutil.ignore_patterns("model_repository", "checkpoint"))
    (gpu_build / "engine").mkdir()
    (gpu_build / "engine" / "model.plan").write_bytes(b"a plan")
    (gpu_build / "engine" / "engine.json").write_text('{"profiles": ["prefill", "decode"]}')
    write_repository(gpu_build)
    result = subprocess.run([sys.executable, "-m", "dsa_export.cli", "serve", str(gpu_build)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "serve it in NVIDIA's Triton container" in result.stderr


def test_serve_and_generate_commands(build, eager):
    """`dsa-export serve BUILD_DIR` starts the server and says so; `dsa-export generate --prompt-ids` streams the
    eager model's tokens; Ctrl-C (SIGINT) stops the server cleanly and leaves no process behind."""
    grpc_port, http_port = free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    serve = subprocess.Popen([sys.executable, "-m", "dsa_export.cli", "serve", str(build), "--grpc-port",
                              str(grpc_port), "--http-port", str(http_port), "--log-file",
                              str(build.parent / "serve.log")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env)
    try:
        lines = []
        for line in serve.stdout:
            lines.append(line)
            if "ready after" in line or len(lines) > 20:
                break
        assert any(f"gRPC 127.0.0.1:{grpc_port}" in line for line in lines), lines
        result = subprocess.run([sys.executable, "-m", "dsa_export.cli", "generate", "--url",
                                 f"127.0.0.1:{grpc_port}", "--prompt-ids", "1,2,3", "--max-new-tokens", "16",
                                 "--ignore-eos"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert [int(t) for t in result.stdout.split()] == eager([1, 2, 3], 16)
    finally:
        serve.send_signal(signal.SIGINT)
        rest, _ = serve.communicate(timeout=60)
    assert serve.returncode == 130, rest  # the README's exit code for SIGINT, after stopping cleanly
    assert "stopped" in rest
    left = subprocess.run(["pgrep", "-f", f"grpc-port={grpc_port}"], capture_output=True, text=True).stdout
    assert left == ""


def test_serve_refuses_what_it_cannot_serve(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dsa_export.cli", "serve", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no dsa_generate/config.pbtxt" in result.stderr


def test_a_server_that_cannot_start_is_one_clear_error(build, tmp_path):
    """A model that fails to load: the error names it, from the server's log. Only dsa_onnx is broken (its graph
    missing): every other model's paths point back into the build, so which model fails is fixed."""
    import shutil

    from dsa_export.deploy.repository import config_text, read_config

    repository = tmp_path / "repo"
    shutil.copytree(build / "model_repository", repository)
    for model in (GENERATE, STEP_ONNX):
        path = repository / model / "config.pbtxt"
        config = read_config(path)
        for key, value in config.parameters.items():
            if key.endswith(("_file", "_dir")):  # absolute: into the original build
                value.string_value = str((build / "model_repository" / model / value.string_value).resolve())
        if model == STEP_ONNX:
            config.parameters["model_file"].string_value = str(tmp_path / "nowhere" / "model.onnx")
        path.write_text(config_text(config))
    from dsa_export.errors import DSAExportError

    with pytest.raises(DSAExportError, match="exited .* before it was ready: .*dsa_onnx"):
        TritonServer(repository, [STEP_ONNX, GENERATE], find_server(), log_path=tmp_path / "log").start()


def test_serving_environment_has_numpy_below_2():
    """The Python backend corrupts tensors with numpy >= 2 (trt-triton-recipes.md A2)."""
    install = find_server()
    python = install.python_bin / "python"
    code = "import json, numpy, onnxruntime, tokenizers, jinja2; print(json.dumps([numpy.__version__]))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    (numpy_version,) = json.loads(out.stdout)
    assert int(numpy_version.split(".")[0]) < 2
    assert Path(install.backend_dir, "python", "triton_python_backend_stub").is_file()


def test_every_sequence_was_released(server, build):
    """Last (it stops the module's server): every sequence of this module, cancelled or stopped early ones included,
    ended with a step flagged END, so the step model holds none when it unloads."""
    server.stop()
    log = (build.parent / "server.log").read_text()
    assert "dsa_onnx: unloading with 0 sequences held" in log
