"""Triton Inference Server model `dsa_stage_<i>` (Python backend): pipeline stage i of a build that spans several
nodes, on a node other than the first. The first node's scheduler (scheduler.py, through stages.RemoteStage) sends it
every step that reaches stage i; it runs its graph over its pools (allocated once at load, written in place) and
answers with the hidden states for the next stage (or, for the last stage, the sampled tokens and their
log-probabilities), in the export's dtype, and the epoch it drew at load.

Copied into the model repository as `dsa_stage_<i>/1/model.py`, beside stages.py, io_spec.py and the graph runners.
One instance, one request at a time: the steps of a stage run in the order they arrive, like a local stage's. It
answers only requests that carry the repository's stage key (a request parameter only the first node's scheduler
sends), so no other client can step, or read, the sequences it holds.
"""

import hmac
import json
import secrets
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from io_spec import BLOCK_TABLES
from stages import EPOCH, KEY, KEY_FILE, load_graph, read_key


def _feed(request, spec, io):
    tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
    if tensor is None:
        raise ValueError(f"the step has no {spec.name}")
    if spec.dtype == "bfloat16":  # numpy has no bfloat16: through DLPack (a TensorRT node has torch)
        import torch

        return torch.from_dlpack(tensor.to_dlpack())
    value = tensor.as_numpy()
    if spec.name == BLOCK_TABLES:  # sent without the blocks no sequence has reached (stages.wire_block_tables)
        if value.ndim != 2 or not 1 <= value.shape[1] <= io.blocks:
            raise ValueError(f"block_tables of shape {list(value.shape)}: expected [sequences, 1..{io.blocks}]")
        value = np.pad(value, ((0, 0), (0, io.blocks - value.shape[1])))
    return value


def _output(name, value, dtype):
    if dtype == "bfloat16":
        import torch

        return pb_utils.Tensor.from_dlpack(name, torch.as_tensor(value).to(torch.bfloat16).contiguous())
    return pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=np.dtype(dtype)))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"])  # the model's directory: the export's paths are relative to it
        self.graph = load_graph(here, parameters["runtime"], json.loads(parameters["stage"]), int(parameters["gpu"]))
        self.pools = self.graph.new_pools(int(parameters["pool_tokens"]))
        self.key = read_key(here)
        if not self.key:
            raise RuntimeError(f"{here / KEY_FILE} is missing: deploy the build again")
        self.epoch = secrets.randbits(62)
        self.outputs = [t for t in self.graph.io.step_outputs if t.name in json.loads(parameters["outputs"])]
        pb_utils.Logger.log_info(f"{config['name']}: layers {self.graph.io.layers[0]}-{self.graph.io.layers[1] - 1} "
                                 f"on {parameters['runtime']} (GPU {parameters['gpu']} of this node), a pool of "
                                 f"{parameters['pool_tokens']} tokens")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                if not hmac.compare_digest(str(json.loads(request.parameters() or "{}").get(KEY, "")), self.key):
                    raise PermissionError("the step does not carry this repository's stage key: this model takes "
                                          "steps from its build's first node only, deployed with the same "
                                          "model_repository/ (each deploy draws a new key: copy node 0's here)")
                feeds = {spec.name: _feed(request, spec, self.graph.io) for spec in self.graph.io.step_inputs}
                results = self.graph.run(feeds, self.pools, [t.name for t in self.outputs])
                responses.append(pb_utils.InferenceResponse(
                    [_output(t.name, results[t.name], t.dtype) for t in self.outputs]
                    + [pb_utils.Tensor(EPOCH, np.array([self.epoch], dtype=np.int64))]))
            except Exception as e:  # this step fails; the model keeps serving
                message = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses
