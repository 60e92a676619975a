"""The model repository and the generation helpers, without a server: every config parses with Triton's own schema
and says what io.json says; the tokenizer `init` writes; text decoded incrementally; token picking; request checks."""

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer

from dsa_export.serving.generation import (GENERATE_INPUTS, GENERATE_OUTPUTS, GenerationRequest, RequestError,
                                          TextCodec, check_request, pick_token)
from dsa_export.deploy.repository import GENERATE, STEP_ENGINE, STEP_ONNX, read_config, write_repository
from dsa_export.formats import of
from dsa_export.exporter.graph_io import GraphIO
from dsa_export.models.tokenizer import BOS, EOS, TOKENIZER_FILES, copy_tokenizer


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_onnx, tiny_checkpoint):
    """The session's tiny export with the checkpoint's tokenizer beside it, as the export stage leaves it."""
    import shutil

    out = tmp_path_factory.mktemp("build") / "b"
    shutil.copytree(tiny_onnx, out)
    copy_tokenizer(tiny_checkpoint, out)
    return out


def test_init_writes_a_tokenizer_with_the_configs_special_ids(tiny_checkpoint, tiny_config):
    assert all((tiny_checkpoint / name).is_file() for name in TOKENIZER_FILES)
    codec = TextCodec(tiny_checkpoint)
    assert codec.tokenizer.get_vocab_size() <= tiny_config.vocab_size
    assert codec.tokenizer.token_to_id(BOS) == tiny_config.bos_token_id
    assert codec.eos_id == codec.tokenizer.token_to_id(EOS) == tiny_config.eos_token_id
    ids = codec.encode("Hello, world! 東京")
    assert ids[0] == tiny_config.bos_token_id and codec.decode(ids) == "Hello, world! 東京"
    chat = codec.encode_prompt("Hi", chat=True)  # the template writes BOS once; the special tokens are single ids
    assert chat[0] == tiny_config.bos_token_id and chat.count(tiny_config.bos_token_id) == 1
    assert codec.tokenizer.token_to_id("<｜Assistant｜>") == chat[-1]
    assert codec.render([{"role": "user", "content": "Hi"}]) == f"{BOS}<｜User｜>Hi<｜Assistant｜>"


def test_text_deltas_add_up_to_the_decoded_tokens(tiny_checkpoint):
    """Random ids (most byte tokens are not valid UTF-8 on their own): no delta splits a character, and the deltas
    always add up to decode(all ids), including bytes that never form a character."""
    codec = TextCodec(tiny_checkpoint)
    text = "naïve café 東京 🙂"
    held_back = 0
    for trial in range(200):
        rng = random.Random(trial)
        ids = codec.encode(text)[1:] if trial == 0 else [rng.randrange(320) for _ in range(30)]
        stream = codec.stream()
        deltas = [stream.step(t) for t in ids]
        deltas[-1] += stream.finish()
        assert "".join(deltas) == codec.decode(ids)
        held_back += deltas.count("")
        if trial == 0:  # valid UTF-8: every delta whole characters, none ends in a replacement character
            assert "".join(deltas) == text and not any(d.endswith("\ufffd") for d in deltas)
    assert held_back > 0  # multi-byte characters were held back at least sometimes


def test_pick_token_greedy_top_k_and_seed():
    logits = np.array([0.1, 3.0, 3.0, -1.0, 2.9], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert pick_token(logits, 0.0, 0, rng) == 1  # the first maximum, as torch.argmax
    assert {pick_token(logits, 1.0, 2, np.random.default_rng(s)) for s in range(50)} == {1, 2}
    assert pick_token(np.array([0.1, 3.0, 2.95, 2.9]), 5.0, 1, rng) == 1  # top-1 sampling is greedy
    draws = [pick_token(logits, 1.0, 0, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(draws)) == 1


@pytest.mark.parametrize("change, message", [
    ({"prompt_ids": []}, "the prompt is empty"),
    ({"prompt_ids": [1, 320]}, "token id 320 is outside the vocabulary [0, 320)"),
    ({"prompt_ids": [-1]}, "token id -1 is outside"),
    ({"max_new_tokens": 0}, "MAX_NEW_TOKENS must be >= 1"),
    ({"max_new_tokens": 62}, "a prompt of 3 tokens + 62 new tokens does not fit the cache capacity 63"),
    ({"temperature": -0.5}, "TEMPERATURE must be a number >= 0"),
    ({"temperature": float("nan")}, "TEMPERATURE must be a number >= 0"),
    ({"top_k": -1}, "TOP_K must be >= 0"),
    ({"seed": -2}, "SEED must be >= 0"),
])
def test_bad_requests_are_refused_with_one_line(change, message):
    good = dict(prompt_ids=[1, 2, 3], max_new_tokens=61)
    check_request(GenerationRequest(**good), 320, 63)  # the largest that fits: 3 + 61 - 1 = 63 rows
    with pytest.raises(RequestError, match=None) as error:
        check_request(GenerationRequest(**{**good, **change}), 320, 63)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_repository_configs_parse_and_follow_io_json(export_dir):
    from tritonclient.grpc import model_config_pb2 as mc

    written = write_repository(export_dir)
    repository = export_dir / "model_repository"
    assert written["step_models"] == [STEP_ONNX] and not written["engine"]  # no engine in this build
    io = GraphIO.load(export_dir / "io.json")
    configs = {path.parent.name: read_config(path) for path in repository.glob("*/config.pbtxt")}
    assert sorted(configs) == sorted([GENERATE, STEP_ONNX, STEP_ENGINE])
    for name in (STEP_ONNX, STEP_ENGINE):
        config = configs[name]
        assert config.name == name and config.backend == "python" and config.max_batch_size == 0
        expected = [(t.name, of(t.dtype).server, [d if isinstance(d, int) else -1 for d in t.dims])
                    for t in (*io.inputs[:2], io.outputs[0])]
        actual = [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in (*config.input, *config.output)]
        assert actual == expected
        # the export's files, relative to the model's directory (the models read the export from there)
        assert (repository / name / config.parameters["io_file"].string_value).resolve() == \
            (export_dir / "io.json").resolve()
        assert (repository / name / config.parameters["model_file"].string_value).resolve() == \
            (export_dir / "model.onnx").resolve()
        assert sorted(p.name for p in (repository / name / "1").iterdir()) == sorted(
            ["model.py", "io_spec.py", "trt_graph.py" if name == STEP_ENGINE else "ort_graph.py"])
    assert configs[STEP_ENGINE].instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert configs[STEP_ENGINE].parameters["runtime"].string_value == "tensorrt"
    assert configs[STEP_ONNX].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    generate = configs[GENERATE]
    assert generate.model_transaction_policy.decoupled
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims), t.optional) for t in generate.input] == \
        [(name, *spec) for name, (*spec,) in GENERATE_INPUTS.items()]
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in generate.output] == \
        [(name, dtype, dims) for name, (dtype, dims, _) in GENERATE_OUTPUTS.items()]
    assert generate.parameters["step_models"].string_value == STEP_ONNX
    assert (repository / GENERATE / generate.parameters["io_file"].string_value).resolve() == \
        (export_dir / "io.json").resolve()
    assert (repository / GENERATE / generate.parameters["tokenizer_dir"].string_value).resolve() == \
        export_dir.resolve()


def test_repository_steps_by_the_engine_where_the_build_has_one(export_dir, tmp_path):
    import shutil

    build = tmp_path / "b"
    shutil.copytree(export_dir, build, ignore=shutil.ignore_patterns("model_repository"))
    (build / "engine").mkdir()
    (build / "engine" / "model.plan").write_bytes(b"plan")
    (build / "engine" / "engine.json").write_text('{"profiles": ["prefill", "decode"]}')
    assert write_repository(build)["step_models"] == [STEP_ENGINE]
    assert read_config(build / "model_repository" / GENERATE / "config.pbtxt").parameters["step_models"] \
        .string_value == STEP_ENGINE


def test_a_staged_build_gets_a_step_model_per_stage_each_on_its_gpu(export_dir, tmp_path):
    """Pipeline stages: dsa_onnx_i / dsa_engine_i for stage i (engine i on GPU i), chained by dsa_generate."""
    import shutil

    from tritonclient.grpc import model_config_pb2 as mc

    from dsa_export.exporter.graph_io import graph_io
    from dsa_export.models import get_preset

    build = tmp_path / "staged"
    for i in range(3):  # a bf16 build of three stages: the repository reads only each stage's io.json
        shutil.copytree(export_dir, build / f"stage-{i}", ignore=shutil.ignore_patterns("model_repository"))
        io = graph_io(get_preset("tiny"), "bfloat16", capacity=64, layers=(i, i + 1))
        (build / f"stage-{i}" / "io.json").write_text(json.dumps(io.to_json()))
        (build / f"stage-{i}" / "engine").mkdir()
        (build / f"stage-{i}" / "engine" / "model.plan").write_bytes(b"plan")
        (build / f"stage-{i}" / "engine" / "engine.json").write_text('{"profiles": ["prefill", "decode"]}')
    written = write_repository(build)
    assert written["step_models"] == [f"{STEP_ENGINE}_{i}" for i in range(3)] and written["stages"] == 3
    repository = build / "model_repository"
    for i in range(3):
        engine = read_config(repository / f"{STEP_ENGINE}_{i}" / "config.pbtxt")
        assert engine.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and list(engine.instance_group[0].gpus) \
            == [i]
        assert (repository / f"{STEP_ENGINE}_{i}" / engine.parameters["plan_file"].string_value).resolve() == \
            (build / f"stage-{i}" / "engine" / "model.plan").resolve()
        assert (repository / f"{STEP_ONNX}_{i}" / "config.pbtxt").is_file()
        # the hidden state crosses between stages in float32 (numpy has no bfloat16; the step model casts it)
        wire = {t.name: mc.DataType.Name(t.data_type) for t in (*engine.input, *engine.output)}
        assert wire == {"input_ids" if i == 0 else "hidden_in": "TYPE_INT64" if i == 0 else "TYPE_FP32",
                        "positions": "TYPE_INT64", "logits" if i == 2 else "hidden_out": "TYPE_FP32"}
    generate = read_config(repository / GENERATE / "config.pbtxt")
    assert generate.parameters["step_models"].string_value == ",".join(written["step_models"])


def test_a_broken_config_is_one_clear_error(tmp_path):
    from dsa_export.errors import DSAExportError

    (tmp_path / "config.pbtxt").write_text('name: "x"\nmax_batch_size: "eight"\n')
    with pytest.raises(DSAExportError, match="not a valid Triton model config"):
        read_config(tmp_path / "config.pbtxt")


def test_tokenizer_json_is_hf_tokenizers_own_format(tiny_checkpoint):
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    assert tokenizer.decode(tokenizer.encode("DeepSeek Sparse Attention").ids, skip_special_tokens=True) == \
        "DeepSeek Sparse Attention"
