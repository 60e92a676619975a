"""A build on two nodes, served by two real tritonservers on loopback: the tiny model cut into 2 pipeline stages,
deployed with --gpus-per-node 1, so that the first server (dsa_generate: the scheduler and stage 0) steps stage 1 on
the second (dsa_stage_1) over Triton's gRPC. The mixed, staggered, partly cancelled load of test_server.py gets every
request the eager model's tokens (which the one-server builds give too: test_server.py); the second server killed
mid-load fails every running request with an error naming it, leaves no block in use and no request hanging, refuses
new ones at once, and the load completes once it is started again (the first server never restarts); restarted
while nothing runs, it loses nothing. A client without the build's key cannot step the second server's stage."""

import os
import signal
import threading

import numpy as np
import pytest
from test_server import CAPACITY, MAX_TOKENS, build_tiny, eager_tokens, mixed_load, pool_empty, tokens, wait_until

from dsa_export.deploy import client
from dsa_export.deploy.client import GenerationError
from dsa_export.deploy.repository import GENERATE
from dsa_export.deploy.server import TritonServer, find_server

pytestmark = pytest.mark.server
STAGE = "dsa_stage_1"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("nodes") / "build", capacity=CAPACITY, max_tokens=MAX_TOKENS,
                      max_batch=16, gpus=2, gpus_per_node=1)


@pytest.fixture(scope="module")
def eager(build):
    return eager_tokens(build)


def node1(build, grpc_port=0):
    return TritonServer(build / "model_repository", [STAGE], find_server(), grpc_port=grpc_port,
                        log_path=build.parent / f"node1-{grpc_port}.log", exit_timeout=5)


@pytest.fixture(scope="module")
def servers(build):
    second = node1(build).start()
    try:
        with TritonServer(build / "model_repository", [GENERATE], find_server(), log_path=build.parent / "node0.log",
                          node_addresses={1: second.grpc_url}, exit_timeout=5) as first:
            yield first, second
    finally:
        second.stop()


def test_the_deployed_repository_has_a_model_per_node(build):
    assert sorted(p.name for p in (build / "model_repository").iterdir()) == [GENERATE, STAGE]


def test_two_servers_give_each_request_the_eager_models_tokens(servers, eager):
    first, _ = servers
    mixed_load(first.grpc_url, eager)
    wait_until(first, lambda: pool_empty(first))


def test_the_stage_model_answers_only_its_first_node(servers, build):
    """A well-formed step (one token) without the key the build drew for its first node is refused."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from dsa_export.exporter.artifacts import as_export
    from dsa_export.serving.stages import TRITON_DTYPES

    _, second = servers
    inputs = []
    for spec in as_export(build).stages[1].io.step_inputs:
        value = np.zeros([1 if isinstance(d, str) else d for d in spec.dims], dtype=np.dtype(spec.dtype))
        inputs.append(grpcclient.InferInput(spec.name, list(value.shape), TRITON_DTYPES[spec.dtype]))
        inputs[-1].set_data_from_numpy(value)
    with grpcclient.InferenceServerClient(second.grpc_url) as stranger:
        with pytest.raises(InferenceServerException, match="takes steps from its build's first node only"):
            stranger.infer(STAGE, inputs)


def test_a_node_that_goes_down_fails_its_requests_and_serving_resumes_when_it_is_back(servers, build, eager):
    first, second = servers
    results = {}

    def run(i):
        try:
            results[i] = tokens(client.generate(first.grpc_url, input_ids=[i + 2, 7, 9], max_new_tokens=1500,
                                                stop_ids=[]))
        except GenerationError as e:
            results[i] = str(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    wait_until(first, lambda: first.metrics()["dsa_generated_tokens_total"] >= 60)
    os.killpg(second.process.pid, signal.SIGKILL)  # the node fails: no drain, no goodbye
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a request hangs"
    assert all(isinstance(r, str) and "node 1 (127.0.0.1:" in r for r in results.values()), results
    wait_until(first, lambda: pool_empty(first))
    with pytest.raises(GenerationError, match="node 1 .* did not answer"):  # while it is down: at once
        client.generate(first.grpc_url, input_ids=[3, 4], max_new_tokens=4, stop_ids=[], timeout=30)
    second.cleanup()
    back = node1(build, second.grpc_port).start()  # the same address; the first server keeps running
    try:
        mixed_load(first.grpc_url, eager, requests=8, seed=1)
        wait_until(first, lambda: pool_empty(first))
        # restarted while nothing runs: nothing is lost, and the next request is served by the new load
        back.stop()
        back = node1(build, second.grpc_port).start()
        assert tokens(client.generate(first.grpc_url, input_ids=[4, 4, 4], max_new_tokens=8, stop_ids=[])) == \
            eager([4, 4, 4], 8)
    finally:
        back.stop()


@pytest.mark.parametrize("argv, message", [
    ((), "stages of this build run on node(s) 1: start each with `dsa-export serve"),
    (("--node", "2"), "the build runs on 2 node(s): --node takes 0 to 1"),
    (("--node-address", "2=127.0.0.1:9"), "the build has no node 2"),
    (("--node", "1", "--node-address", "1=127.0.0.1:9"), "--node-address is for the first node"),
    (("--node-address", "1=127.0.0.1"), "expected NODE=HOST:PORT"),
])
def test_serve_checks_the_nodes_before_it_starts_anything(build, capsys, argv, message):
    from dsa_export.cli import main

    assert main(["serve", str(build), "--port", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_hidden_states_cross_in_the_exports_dtype():
    """bfloat16 hidden states go as 2 bytes a value (ml_dtypes', as tritonclient takes BF16), not float32."""
    import ml_dtypes
    import tritonclient.grpc as grpcclient

    from dsa_export.serving.stages import TRITON_DTYPES, wire_array

    hidden = np.linspace(-3, 3, 7168 * 2, dtype=np.float32).reshape(2, 7168)
    wire = wire_array(hidden, "bfloat16")
    assert wire.dtype == ml_dtypes.bfloat16 and wire.nbytes == 2 * 7168 * 2
    np.testing.assert_allclose(wire.astype(np.float32), hidden, rtol=2**-8)
    grpcclient.InferInput("hidden_in", list(wire.shape), TRITON_DTYPES["bfloat16"]).set_data_from_numpy(wire)
    assert wire_array(hidden, "float32").nbytes == hidden.nbytes


def test_block_tables_cross_cut_to_the_blocks_reached():
    """Columns no sequence has reached (0s, as the scheduler leaves them) stay home; padded back with 0s, the stage
    gets the table the scheduler made, even where a sequence's last block is block 0."""
    from dsa_export.serving.stages import wire_block_tables

    tables = np.zeros((3, 32), dtype=np.int32)
    tables[0, :3] = [5, 6, 0]  # block 0 is a real block
    tables[1, :5] = [1, 2, 3, 4, 9]
    cut = wire_block_tables(tables)
    assert cut.shape == (3, 5)
    np.testing.assert_array_equal(np.pad(cut, ((0, 0), (0, 32 - cut.shape[1]))), tables)
    assert wire_block_tables(np.zeros((2, 32), dtype=np.int32)).shape == (2, 1)  # every sequence in block 0 alone
