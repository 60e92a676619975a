"""Triton Inference Server model `dsa_generate` (Python backend, decoupled): token ids or text in, one response per
new token out, as each is made.

Copied into the model repository as `dsa_generate/1/model.py`, beside generation.py (the request contract, its
checks, token picking and text decoding, shared with dsa-export's client). execute() reads and checks each request
and hands it to a thread, which runs the sequence through the step models by BLS (one per pipeline stage, in
order): the prefill flagged SEQUENCE_START, then one decode step per token; the step after which no more are needed
carries SEQUENCE_END, and a sequence that stops early (stop id, cancelled client, a failed step) is closed by a step
flagged END sent to every stage, so the step models always free the sequence's caches. A bad request gets one error
response; the model keeps serving.
"""

import itertools
import json
import random
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from generation import GenerationRequest, RequestError, TextCodec, check_request, pick_token
from io_spec import HIDDEN_IN, HIDDEN_OUT, INPUT_IDS, LOGITS, POSITIONS, GraphIO

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


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


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"])  # the model's directory: the other paths are relative to it
        self.step_models = parameters["step_models"].split(",")  # one per pipeline stage, in layer order
        io = GraphIO.load(here / parameters["io_file"])  # the first stage's graph
        model_config = json.loads((here / parameters["config_file"]).read_text(encoding="utf-8"))
        self.capacity, self.vocab_size, self.hidden_size = io.capacity, io.vocab_size, io.hidden_size
        tokenizer_dir = here / parameters["tokenizer_dir"]
        self.codec = TextCodec(tokenizer_dir) if TextCodec.exists(tokenizer_dir) else None
        eos = model_config.get("eos_token_id")  # one id or a list of them
        if eos is None and self.codec is not None:
            eos = self.codec.eos_id
        self.default_stop_ids = [] if eos is None else [int(t) for t in (eos if isinstance(eos, list) else [eos])]
        # correlation ids are server-wide: a random base, so that two instances (or a restart) never collide
        self.sequence_ids = itertools.count(random.SystemRandom().randrange(1 << 40, 1 << 62))
        self.lock = threading.Lock()
        self.running = 0
        self.idle = threading.Condition(self.lock)
        pb_utils.Logger.log_info(f"dsa_generate: steps by {' -> '.join(self.step_models)}, capacity {self.capacity}, "
                                 f"text {'on' if self.codec else 'off (no tokenizer.json)'}, "
                                 f"default stop ids {self.default_stop_ids}")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:  # read everything now: a thread may use only the sender
                generation = self.parse(request)
                check_request(generation, self.vocab_size, self.capacity)
            except Exception as e:  # every request gets an answer: a bad one, its error
                message = str(e) if isinstance(e, RequestError) else \
                    f"cannot read the request ({type(e).__name__}: {e})"
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
                continue
            with self.lock:
                self.running += 1
            threading.Thread(target=self.generate, args=(sender, generation), daemon=True).start()
        return None

    def parse(self, request) -> GenerationRequest:
        ids, prompt = _input(request, "INPUT_IDS"), _input(request, "PROMPT")
        chat = bool(_scalar(request, "APPLY_CHAT_TEMPLATE", False))
        if (ids is None) == (prompt is None):
            raise RequestError("send either INPUT_IDS (token ids) or PROMPT (text), not both or neither")
        if prompt is not None:
            if self.codec is None:
                raise RequestError("PROMPT: this build has no tokenizer (tokenizer.json in the checkpoint); send "
                                   "INPUT_IDS")
            if prompt.size != 1:
                raise RequestError(f"PROMPT must hold one string, got {prompt.size}")
            try:
                text = prompt[0].decode("utf-8") if isinstance(prompt[0], bytes) else str(prompt[0])
            except UnicodeDecodeError:
                raise RequestError("PROMPT is not valid UTF-8") from None
            prompt_ids = self.codec.encode_prompt(text, chat)
        elif chat:
            raise RequestError("APPLY_CHAT_TEMPLATE applies to a text PROMPT, not to INPUT_IDS")
        else:
            prompt_ids = [int(t) for t in ids]
        stop_ids = _input(request, "STOP_IDS")
        max_new_tokens = _scalar(request, "MAX_NEW_TOKENS", None)
        if max_new_tokens is None:
            raise RequestError("MAX_NEW_TOKENS is required: the most tokens to generate")
        return GenerationRequest(
            prompt_ids=prompt_ids, max_new_tokens=int(max_new_tokens),
            temperature=float(_scalar(request, "TEMPERATURE", 0.0)), top_k=int(_scalar(request, "TOP_K", 0)),
            seed=int(_scalar(request, "SEED", 0)),
            stop_ids=self.default_stop_ids if stop_ids is None else [int(t) for t in stop_ids])

    def _step_request(self, stage, sequence, first, positions, flags):
        """One step of one pipeline stage; the response's output (logits from the last stage, else the hidden
        state), or a RuntimeError with the stage model's error."""
        model = self.step_models[stage]
        output = LOGITS if stage == len(self.step_models) - 1 else HIDDEN_OUT
        response = pb_utils.InferenceRequest(
            model_name=model, inputs=[first, positions], requested_output_names=[output], correlation_id=sequence,
            flags=flags, preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)).exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy()

    def step(self, sequence, ids, position, flags):
        """The next-token logits [vocab] after feeding `ids` at position..; a step model's error as RuntimeError.
        Through every pipeline stage in turn: each takes the previous one's hidden state (in host memory, float32
        [1, S, H] per step) and keeps its own layers' caches under the same correlation id and flags."""
        positions = pb_utils.Tensor(POSITIONS, np.arange(position, position + len(ids), dtype=np.int64)[None])
        out = np.asarray(ids, dtype=np.int64)[None]
        for stage in range(len(self.step_models)):
            first = pb_utils.Tensor(INPUT_IDS if stage == 0 else HIDDEN_IN, out)
            out = self._step_request(stage, sequence, first, positions, flags)
        return out[0, -1]

    def close(self, sequence):
        """Free `sequence`'s caches in every stage that may hold them: a one-token step flagged END sent to each
        stage on its own (zeros at position 0, the result dropped). A stage that holds none answers with an error,
        as expected when a step failed before reaching it."""
        positions = pb_utils.Tensor(POSITIONS, np.zeros((1, 1), dtype=np.int64))
        for stage in range(len(self.step_models)):
            first = pb_utils.Tensor(INPUT_IDS, np.zeros((1, 1), dtype=np.int64)) if stage == 0 else \
                pb_utils.Tensor(HIDDEN_IN, np.zeros((1, 1, self.hidden_size), dtype=np.float32))
            try:
                self._step_request(stage, sequence, first, positions, END)
            except RuntimeError as e:
                pb_utils.Logger.log_info(f"dsa_generate: sequence {sequence}: closing: {e}")

    def generate(self, sender, request: GenerationRequest):
        with self.lock:
            sequence = next(self.sequence_ids)
        text = self.codec.stream() if self.codec else None
        rng = np.random.default_rng(request.seed)
        last = request.max_new_tokens - 1
        started = ended = False
        position = None
        try:
            started = True  # from here a stage may hold caches for the sequence, until a step flagged END succeeds
            logits = self.step(sequence, request.prompt_ids, 0, START | (END if last == 0 else 0))
            ended, position = last == 0, len(request.prompt_ids)
            for index in range(request.max_new_tokens):
                token = pick_token(logits, request.temperature, request.top_k, rng)
                done = index == last or token in request.stop_ids
                delta = (text.step(token) + (text.finish() if done else "")) if text else ""
                if sender.is_cancelled():
                    pb_utils.Logger.log_info(f"dsa_generate: sequence {sequence} cancelled after {index} tokens")
                    break
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("TOKEN", np.array([token], dtype=np.int64)),
                    pb_utils.Tensor("INDEX", np.array([index], dtype=np.int64)),
                    pb_utils.Tensor("TEXT", np.array([delta.encode("utf-8")], dtype=np.object_))]))
                if done:
                    break
                closing = index + 1 == last  # the step whose logits give the last token
                logits = self.step(sequence, [token], position, END if closing else 0)
                ended, position = closing, position + 1
            sender.send(flags=FINAL)
        except Exception as e:  # a failed step: tell the client, keep serving
            pb_utils.Logger.log_error(f"dsa_generate: sequence {sequence}: {e}")
            try:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
            except Exception as e2:
                pb_utils.Logger.log_error(f"dsa_generate: sequence {sequence}: cannot send the error: {e2}")
        finally:
            if started and not ended:  # stopped early, or a step failed: free what the stages hold
                try:
                    self.close(sequence)
                except Exception as e:
                    pb_utils.Logger.log_warn(f"dsa_generate: sequence {sequence}: closing failed: {e}")
            with self.lock:
                self.running -= 1
                self.idle.notify_all()

    def finalize(self):
        with self.lock:
            self.idle.wait_for(lambda: self.running == 0, timeout=10)
