"""The model repository and the generation helpers, without a server: the config parses with Triton's own schema and
points at the export's files; the tokenizer `init` writes; text decoded incrementally; request checks."""

import json
import random

import onnx
import pytest
from tokenizers import Tokenizer

from dsa_export.deploy.repository import GENERATE, read_config, serving_parameters, write_repository
from dsa_export.exporter.plan import EngineShapes
from dsa_export.serving.generation import (GENERATE_INPUTS, GENERATE_OUTPUTS, GenerationRequest, RequestError,
                                          TextCodec, check_request)
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
    assert codec.tokenizer.token_to_id("<｜Assistant｜>") in chat
    assert codec.render([{"role": "user", "content": "Hi"}]) == f"{BOS}<｜User｜>Hi<｜Assistant｜></think>"
    # DeepSeek-V3.2's thinking switch opens the assistant's turn with <think> (what the API's reasoning split reads)
    assert codec.render([{"role": "user", "content": "Hi"}], thinking=True).endswith("<｜Assistant｜><think>")
    assert codec.decode(codec.encode_chat([{"role": "user", "content": "Hi"}], thinking=True)).endswith("<think>")


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


@pytest.mark.parametrize("change, message", [
    ({"prompt_ids": []}, "the prompt is empty"),
    ({"prompt_ids": [1, 320]}, "token id 320 is outside the vocabulary [0, 320)"),
    ({"prompt_ids": [-1]}, "token id -1 is outside"),
    ({"max_new_tokens": 0}, "MAX_NEW_TOKENS must be >= 1"),
    ({"max_new_tokens": 62}, "a prompt of 3 tokens + 62 new tokens does not fit the cache capacity 63"),
    ({"temperature": -0.5}, "TEMPERATURE must be a number >= 0"),
    ({"temperature": float("nan")}, "TEMPERATURE must be a number >= 0"),
    ({"top_k": -1}, "TOP_K must be >= 0"),
    ({"top_p": 0.0}, "TOP_P must be in (0, 1]"),
    ({"top_p": 1.5}, "TOP_P must be in (0, 1]"),
    ({"seed": -2}, "SEED must be >= 0"),
    ({"prompt_ids": [1] * 64}, "a prompt of 64 tokens does not fit the cache capacity 63"),
    ({"stop_ids": list(range(1025))}, "at most 1024 STOP_IDS"),
])
def test_bad_requests_are_refused_with_one_line(change, message):
    good = dict(prompt_ids=[1, 2, 3], max_new_tokens=61)
    check_request(GenerationRequest(**good), 320, 63)  # the largest that fits: 3 + 61 - 1 = 63 rows
    with pytest.raises(RequestError, match=None) as error:
        check_request(GenerationRequest(**{**good, **change}), 320, 63)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_repository_is_one_batching_model_that_reads_the_export(export_dir):
    from tritonclient.grpc import model_config_pb2 as mc

    written = write_repository(export_dir, shapes=EngineShapes(max_batch=4, max_tokens=100, pool_tokens=1000))
    repository = export_dir / "model_repository"
    assert written["models"] == [GENERATE] and written["runtime"] == "onnxruntime" and not written["engine"]
    assert sorted(p.name for p in repository.iterdir()) == [GENERATE]  # nothing else a client could call
    config = read_config(repository / GENERATE / "config.pbtxt")
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert not config.HasField("sequence_batching")  # no correlation ids: a request reaches only itself
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and config.instance_group[0].count == 1
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims), t.optional) for t in config.input] == \
        [(name, *spec) for name, (*spec,) in GENERATE_INPUTS.items()]
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.output] == \
        [(name, dtype, dims) for name, (dtype, dims, _) in GENERATE_OUTPUTS.items()]
    parameters = serving_parameters(repository)
    # the pool in whole blocks of 64 rows; at most 100 tokens per step
    assert (parameters["max_batch"], parameters["max_tokens"], parameters["pool_tokens"]) == ("4", "100", "1024")
    (stage,) = json.loads(parameters["stages"])
    model_dir = repository / GENERATE
    assert (model_dir / stage["io_file"]).resolve() == (export_dir / "io.json").resolve()
    assert (model_dir / stage["model_file"]).resolve() == (export_dir / "model.onnx").resolve()
    assert (model_dir / parameters["tokenizer_dir"]).resolve() == export_dir.resolve()
    # the graph as ONNX Runtime runs it on the CPU: the routed experts fused, no weights (they stay in the export)
    cpu_graph = onnx.load(model_dir / stage["cpu_graph"], load_external_data=False)
    assert (model_dir / stage["cpu_graph"]).resolve() == (model_dir / "stage_0.cpu.onnx").resolve()
    branches = [g.node for n in cpu_graph.graph.node if n.op_type == "If" for g in (a.g for a in n.attribute)]
    assert sorted({n.op_type for nodes in branches for n in nodes} & {"MoE", "RoutedExperts"}) == [
        "MoE", "RoutedExperts"] and "RoutedExperts" not in {n.op_type for n in cpu_graph.graph.node}
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == sorted(
        ["model.py", "generation.py", "io_spec.py", "scheduler.py", "stages.py", "ort_graph.py", "trt_graph.py"])


def test_the_engines_shapes_win_where_the_build_has_engines(export_dir, tmp_path):
    """An engine's profile and pool are built in: the repository serves with them, whatever the options say."""
    import shutil

    build = tmp_path / "b"
    shutil.copytree(export_dir, build, ignore=shutil.ignore_patterns("model_repository"))
    (build / "engine").mkdir()
    (build / "engine" / "model.plan").write_bytes(b"plan")
    (build / "engine" / "engine.json").write_text(json.dumps(
        {"profiles": ["step"], "shapes": {"max_batch": 2, "max_tokens": 64, "pool_tokens": 640}}))
    written = write_repository(build, shapes=EngineShapes(max_batch=16))
    assert written["runtime"] == "tensorrt" and (written["max_batch"], written["pool_tokens"]) == (2, 640)
    parameters = serving_parameters(build / "model_repository")
    (stage,) = json.loads(parameters["stages"])
    assert parameters["runtime"] == "tensorrt" and "cpu_graph" not in stage
    assert (build / "model_repository" / GENERATE / stage["plan_file"]).resolve() == \
        (build / "engine" / "model.plan").resolve()


def test_a_staged_build_lists_its_stages_in_layer_order(export_dir, tmp_path):
    """Pipeline stages: one model still, which runs stage i's graph (engine i on GPU i) for every step; on several
    nodes, a model for each stage after the first node's."""
    import shutil

    from dsa_export.exporter.graph_io import graph_io
    from dsa_export.models import get_preset

    build = tmp_path / "staged"
    for i in range(3):  # a bf16 build of three stages: the repository reads only each stage's io.json
        shutil.copytree(export_dir, build / f"stage-{i}", ignore=shutil.ignore_patterns("model_repository"))
        io = graph_io(get_preset("tiny"), "bfloat16", capacity=64, layers=(i, i + 1))
        (build / f"stage-{i}" / "io.json").write_text(json.dumps(io.to_json()))
    written = write_repository(build)
    assert written["stages"] == 3
    stages = json.loads(serving_parameters(build / "model_repository")["stages"])
    assert [(build / "model_repository" / GENERATE / s["io_file"]).resolve() for s in stages] == \
        [(build / f"stage-{i}" / "io.json").resolve() for i in range(3)]
    assert "float32 exports only" in written["note"]  # a bf16 build without engines is not served on the CPU

    # on nodes of 2 GPUs: the first node runs stages 0-1 in dsa_generate, the second stage 2 as a model of its own,
    # whose inputs and outputs are the stage graph's (hidden states in bfloat16, the export's dtype), and the epoch
    from tritonclient.grpc import model_config_pb2 as mc

    written = write_repository(build, gpus_per_node=2)
    repository = build / "model_repository"
    assert written["nodes"] == [[GENERATE], ["dsa_stage_2"]] and written["models"] == [GENERATE, "dsa_stage_2"]
    parameters = serving_parameters(repository)
    stages = json.loads(parameters["stages"])
    assert [(s.get("node", 0), s["gpu"]) for s in stages] == [(0, 0), (0, 1), (1, 0)] and "model_file" not in stages[2]
    config = read_config(repository / "dsa_stage_2" / "config.pbtxt")
    remote = {k: v.string_value for k, v in config.parameters.items()}
    key = (repository / GENERATE / "stage.key").read_text()  # a file: Triton's model-config API shows parameters
    assert (repository / "dsa_stage_2" / "stage.key").read_text() == key and len(key.strip()) == 32
    assert "key" not in parameters and "key" not in remote and remote["gpu"] == "0"
    assert (repository / "dsa_stage_2" / json.loads(remote["stage"])["io_file"]).resolve() == \
        (build / "stage-2" / "io.json").resolve()
    hidden = get_preset("tiny").hidden_size
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in config.input][:2] == \
        [("hidden_in", "TYPE_BF16", [-1, hidden]), ("positions", "TYPE_INT64", [-1])]
    assert [t.name for t in config.output] == ["next_tokens", "logprobs", "epoch"]
    assert not config.model_transaction_policy.decoupled and config.instance_group[0].count == 1
    assert [s["cpu_graph"] for s in stages[:2]] == [f"../{GENERATE}/stage_{i}.cpu.onnx" for i in range(2)]
    assert (repository / "dsa_stage_2" / json.loads(remote["stage"])["cpu_graph"]).is_file()
    assert sorted(p.name for p in (repository / "dsa_stage_2" / "1").iterdir()) == \
        sorted(["model.py", "io_spec.py", "stages.py", "ort_graph.py", "trt_graph.py"])


def test_a_broken_config_is_one_clear_error(tmp_path):
    from dsa_export.errors import DSAExportError

    (tmp_path / "config.pbtxt").write_text('name: "x"\nmax_batch_size: "eight"\n')
    with pytest.raises(DSAExportError, match="not a valid Triton model config"):
        read_config(tmp_path / "config.pbtxt")


def test_tokenizer_json_is_hf_tokenizers_own_format(tiny_checkpoint):
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    assert tokenizer.decode(tokenizer.encode("DeepSeek Sparse Attention").ids, skip_special_tokens=True) == \
        "DeepSeek Sparse Attention"


def test_serve_waits_in_proportion_to_what_the_server_loads(export_dir, tmp_path):
    """The readiness wait grows with the bytes the stages load (a v3.2 stage's plan is tens of GB), from 3 minutes."""
    from dsa_export.deploy.server import bytes_to_load, ready_timeout

    repository = tmp_path / "repository"
    write_repository(export_dir, repository, served_from=repository)
    graph = sum(f.stat().st_size for f in export_dir.glob("model.onnx*"))
    assert bytes_to_load(repository, [GENERATE]) == graph > 0
    assert ready_timeout(0) == 180 and ready_timeout(40 * 10**9) == 380  # a 40 GB plan: 200 s more
