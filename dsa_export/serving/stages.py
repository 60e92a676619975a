"""The pipeline stages a server runs: its own (a graph in this process, stage i on GPU i of its node) and, when a build
spans several nodes, those of another node's Triton Inference Server, called over Triton's gRPC (tritonclient).

Shipped (standard library and numpy at import; tritonclient, ml_dtypes, onnxruntime or tensorrt when used). The
repository writer and `dsa-export serve` import its names from here: one definition of what crosses between nodes.

A stage on another node is a model of that node's server, `dsa_stage_<i>` (triton_stage.py), holding its graph and
its pools. The scheduler on the first node calls it like a local graph (`run(feeds, pools, outputs)`): the step's
inputs (ids or hidden states, positions, slots, block tables cut to the blocks the step's sequences have reached,
sampling) go in one request, the hidden states in the export's dtype as raw bytes (bfloat16 as ml_dtypes.bfloat16: 2
bytes a value), and its outputs come back the same way.
Every call has a deadline. A node's answer carries the epoch its model drew at load: a node that restarted has lost
the cache rows of every running sequence, so a new epoch, like a node that does not answer, raises StageLost, and the
scheduler fails every running request with that message (their blocks go back; waiting requests go on once the node
answers again). An error the stage model itself returns fails that step's requests only (RuntimeError).
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path

if __package__:  # imported from the package
    from .io_spec import BLOCK_TABLES, HIDDEN_OUT, LOGPROBS, NEXT_TOKENS, SAMPLES, SEQUENCES, TOKENS, GraphIO
else:  # shipped beside io_spec.py into the model repository
    from io_spec import BLOCK_TABLES, HIDDEN_OUT, LOGPROBS, NEXT_TOKENS, SAMPLES, SEQUENCES, TOKENS, GraphIO

NODES_ENV = "DSA_EXPORT_NODES"  # {"1": "host:port", ...}: where the first node's generation model finds the others
EPOCH = "epoch"  # a stage model's output: drawn at load, new after a restart
KEY = "dsa_stage_key"  # a request parameter: a stage model answers only the first node's scheduler, which knows it
KEY_FILE = "stage.key"  # the key, beside each model's config (a file: the server's model-config API shows parameters)
# gRPC statuses of a node that is down, restarting (its model not loaded yet) or too slow: its rows are lost to us
UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND", "UNKNOWN")
DEADLINE_SECONDS = 120.0  # the longest a remote step may take (a prefill step of the 671B stays well below)
# io.json dtypes → Triton's
TRITON_DTYPES = {"int64": "INT64", "int32": "INT32", "float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}


def stage_model(stage: int) -> str:
    """The name of stage `stage`'s model on its node's server."""
    return f"dsa_stage_{stage}"


def load_graph(here: Path, runtime: str, files: dict, device: int):
    """One stage's graph as its model's parameters name it (paths relative to the model directory `here`): a
    TensorRT engine on GPU `device`, or the ONNX graph with ONNX Runtime on the CPU."""
    io = GraphIO.load(here / files["io_file"])
    if runtime == "tensorrt":  # the runners are imported only where they run (tensorrt, torch; onnxruntime)
        profiles = json.loads((here / files["engine_json"]).read_text(encoding="utf-8"))["profiles"]
        return _runner("trt_graph").TrtGraph(here / files["plan_file"], io, profiles, device=device)
    cpu_graph = (here / files["cpu_graph"]).read_bytes() if "cpu_graph" in files else None  # fused for the CPU
    return _runner("ort_graph").OrtGraph(here / files["model_file"], io, providers=["CPUExecutionProvider"],
                                         model_bytes=cpu_graph)


def _runner(name: str):
    return import_module(f"{__package__}.{name}" if __package__ else name)


def read_key(model_dir: Path) -> str:
    """The key the repository drew, from a model's directory ("" for a build on one node, which has none)."""
    path = Path(model_dir) / KEY_FILE
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def node_addresses(text: str | None) -> dict[int, str]:
    """NODES_ENV's value: node index → host:port of its server's gRPC."""
    return {int(node): str(address) for node, address in json.loads(text or "{}").items()}


def wire_array(value, dtype: str):
    """A step tensor as it crosses the network: numpy in io.json's dtype (bfloat16: ml_dtypes')."""
    import numpy as np

    if dtype == "bfloat16":
        import ml_dtypes

        return np.ascontiguousarray(value, dtype=ml_dtypes.bfloat16)
    return np.ascontiguousarray(value, dtype=np.dtype(dtype))


def wire_block_tables(tables):
    """Block tables as they cross: without the columns no sequence of the step has reached (all 0, as the scheduler
    leaves them; the stage model pads them back), so that they grow with the step's longest context, not with the
    capacity."""
    import numpy as np

    used = np.flatnonzero(tables.any(axis=0))
    return tables[:, :used[-1] + 1 if used.size else 1]


def wire_bytes(io, tokens: int, sequences: int, samples: int, blocks: int | None = None) -> int:
    """Bytes one step sends to a remote stage (io: its GraphIO) and gets back, for `tokens` tokens of `sequences`
    sequences, `samples` of them sampled, whose longest context spans `blocks` blocks (default: the capacity): what
    the network between nodes carries."""
    sizes = {TOKENS: tokens, SEQUENCES: sequences, SAMPLES: samples}
    width = {"int64": 8, "int32": 4, "float32": 4, "float16": 2, "bfloat16": 2}
    total = 8  # the epoch
    for spec in (*io.step_inputs, *(t for t in io.step_outputs if t.name in (HIDDEN_OUT, NEXT_TOKENS, LOGPROBS))):
        count = 1
        for d in spec.dims:
            count *= sizes[d] if isinstance(d, str) else d
        if spec.name == BLOCK_TABLES and blocks is not None:
            count = sequences * blocks
        total += count * width[spec.dtype]
    return total


class StageLost(RuntimeError):
    """A stage on another node did not answer, or answered from a new load: the cache rows it held are gone."""


class RemoteStage:
    """Stage `stage` (io: its io_spec.GraphIO) on node `node`, whose server listens at `address`."""

    def __init__(self, io, stage: int, node: int, address: str, key: str, deadline: float = DEADLINE_SECONDS):
        import tritonclient.grpc as grpcclient

        self.io, self.stage, self.node, self.address, self.key, self.deadline = io, stage, node, address, key, deadline
        self.model = stage_model(stage)
        self.client = grpcclient.InferenceServerClient(address)
        self.epoch = None  # of the load that holds our sequences' rows

    def _reconnect(self) -> None:
        """A new channel for the next step: gRPC's own would wait out its reconnect backoff (up to 2 minutes)
        before it tried a node that is back."""
        import tritonclient.grpc as grpcclient

        self.client.close()
        self.client = grpcclient.InferenceServerClient(self.address)

    def new_pools(self, rows: int) -> None:
        return None  # the node's model holds them

    def forget_epoch(self) -> None:
        """No running sequence has rows on the node any more (the scheduler is idle): a restart while idle loses
        nothing, so the next load to answer is taken as it is."""
        self.epoch = None

    @property
    def where(self) -> str:
        return f"node {self.node} ({self.address}, {self.model})"

    def run(self, feeds: dict, pools: None, outputs: list[str] | None = None) -> dict:
        wanted = outputs if outputs is not None else [t.name for t in self.io.step_outputs]
        results, epoch = self._call(feeds, wanted)
        if self.epoch is not None and epoch != self.epoch:
            self.epoch = epoch  # the requests admitted from now on are served by this load
            raise StageLost(f"{self.where} restarted: the cache of the running requests is gone")
        self.epoch = epoch
        return results

    def _call(self, feeds: dict, wanted: list[str]) -> tuple[dict, int]:
        """One step on the node: its `wanted` outputs and the epoch of the load that ran it."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inputs = []
        for spec in self.io.step_inputs:
            value = wire_array(feeds[spec.name], spec.dtype)
            if spec.name == BLOCK_TABLES:
                value = wire_block_tables(value)
            inputs.append(grpcclient.InferInput(spec.name, list(value.shape), TRITON_DTYPES[spec.dtype]))
            inputs[-1].set_data_from_numpy(value)
        try:
            result = self.client.infer(self.model, inputs, outputs=[grpcclient.InferRequestedOutput(name)
                                                                    for name in [*wanted, EPOCH]],
                                       parameters={KEY: self.key}, client_timeout=self.deadline)
        except InferenceServerException as e:
            message = (e.message() or str(e)).splitlines()[0][:200]
            if str(e.status()).removeprefix("StatusCode.") not in UNREACHABLE:
                raise RuntimeError(f"{self.where}: {message}") from None  # the step failed there: its sequences fail
            self._reconnect()
            self.epoch = None  # every running sequence fails with this: the next load to answer starts afresh
            raise StageLost(f"{self.where} did not answer: {message}") from None
        return {name: result.as_numpy(name) for name in wanted}, int(result.as_numpy(EPOCH)[0])
