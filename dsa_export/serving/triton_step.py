"""Triton Inference Server step models `dsa_onnx` (CPU: the exported graph with ONNX Runtime) and `dsa_engine` (GPU:
the TensorRT engine, run in process): one step of a sequence per request, the caches kept in the model. A build cut
into pipeline stages has one step model per stage (`dsa_onnx_0`, ...), each holding the caches of its layers.

Copied into the model repository as `<model>/1/model.py`, beside io_spec.py and ort_graph.py or trt_graph.py (the
runners the package's own graph backend uses); the `runtime` parameter picks one, the other parameters say where the
stage's files are (relative to the model's directory: the repository is served inside its build directory). Each sequence is a
correlation id: SEQUENCE_START allocates its caches at the export's capacity (host memory, or the GPU's), every
step writes them in place, SEQUENCE_END (on the sequence's last step) frees them; sequences the caller abandoned
are dropped after `idle_seconds`. Requests run one at a time (one instance), so a sequence's caches are only ever
touched by one step.
"""

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from io_spec import POSITIONS, GraphIO

START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


class StepError(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"])
        self.name = args["model_name"]
        io = GraphIO.load(here / parameters["io_file"])
        if parameters["runtime"] == "tensorrt":
            from trt_graph import TrtGraph

            profiles = json.loads((here / parameters["engine_json"]).read_text(encoding="utf-8"))["profiles"]
            self.graph = TrtGraph(here / parameters["plan_file"], io, profiles,
                                  device=int(args["model_instance_device_id"]))
        else:
            from ort_graph import OrtGraph

            self.graph = OrtGraph(here / parameters["model_file"], io, providers=["CPUExecutionProvider"])
        self.idle_seconds = float(parameters["idle_seconds"])
        self.sequences = {}  # correlation id -> [caches, last used (monotonic seconds)]
        where = (here / parameters["io_file"]).parent.resolve()
        pb_utils.Logger.log_info(f"{self.name}: {parameters['runtime']} over {where}, capacity {self.graph.capacity}")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                out = self.step(request)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.graph.output, out)]))
            except StepError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses

    def step(self, request):
        """input_ids (or, in a later pipeline stage, hidden_in [1, S, H]) and positions [1, S] → logits (or
        hidden_out for the next stage)."""
        sequence, flags = request.correlation_id(), request.flags()
        first = pb_utils.get_input_tensor_by_name(request, self.graph.first_input).as_numpy()
        positions = pb_utils.get_input_tensor_by_name(request, POSITIONS).as_numpy()
        if first.shape[:2] != positions.shape or positions.shape[0] != 1 or positions.shape[1] < 1:
            raise StepError(f"{self.graph.first_input} and positions must both start [1, S >= 1], got "
                            f"{list(first.shape)} and {list(positions.shape)}")
        if self.graph.io.first and (first.min() < 0 or first.max() >= self.graph.vocab_size):
            raise StepError(f"token ids must be in [0, {self.graph.vocab_size})")
        start = int(positions[0, 0])
        if start < 0 or positions[0, -1] >= self.graph.capacity or \
                not np.array_equal(positions[0], np.arange(start, start + positions.shape[1])):
            raise StepError(f"positions must be consecutive within the capacity [0, {self.graph.capacity})")
        now = time.monotonic()
        if flags & START:
            self.drop_idle(now)
            self.sequences[sequence] = [self.graph.new_caches(1), now]
        state = self.sequences.get(sequence)
        if state is None:
            raise StepError(f"sequence {sequence} was not started (its first step carries SEQUENCE_START) or has "
                            f"ended")
        state[1] = now
        try:
            (out,) = self.graph.run(first, positions, state[0])
        finally:
            if flags & END:
                del self.sequences[sequence]
        return out

    def drop_idle(self, now):
        for sequence in [s for s, (_, used) in self.sequences.items() if now - used > self.idle_seconds]:
            pb_utils.Logger.log_warn(f"{self.name}: dropping sequence {sequence}, idle for {self.idle_seconds:.0f} s")
            del self.sequences[sequence]

    def finalize(self):
        pb_utils.Logger.log_info(f"{self.name}: unloading with {len(self.sequences)} sequences held")
        self.sequences.clear()
