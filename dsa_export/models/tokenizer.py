"""The tokenizer files a checkpoint carries (HF layout: tokenizer.json + tokenizer_config.json with its chat
template), and a small byte-level BPE tokenizer that `init` writes beside a preset's random weights, with
DeepSeek's special tokens and a chat template of the same shape, so that the text path (encode, chat template,
incremental decoding in the Triton generation model) runs on the tiny model. Real checkpoints ship their own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dsa_export.files import regular_file_inside

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT)  # ids 0, 1, 2, 3: bos and eos are the config's bos/eos_token_id
# DeepSeek-V3.1/V3.2's tool-call markup: added tokens that decode as text (what the API's tool-call parser reads)
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_SEP, TOOL_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOL_TOKENS = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_SEP, TOOL_CALL_END, TOOL_OUTPUT_BEGIN,
               TOOL_OUTPUT_END)

# DeepSeek-V3.2's conversation format, reduced: system prompts first, then the tools (`tools`, OpenAI's function
# list), then user, assistant (with its tool calls) and tool turns; the thinking switch (chat_template_kwargs
# {"thinking": true}) opens the assistant's turn with a <think> block, else it starts closed
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] or '' }}{% endif %}{% endfor %}"
    "{% if tools %}{{ '\n\n## Tools\nYou have access to the following tools:\n' }}"
    "{% for tool in tools %}{{ '\n### ' + tool['function']['name'] + '\nDescription: '"
    " + (tool['function']['description'] or '') + '\n\nParameters: ' + (tool['function']['parameters'] | tojson)"
    " + '\n' }}{% endfor %}"
    "{{ '\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n" + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN
    + "tool_call_name" + TOOL_SEP + "tool_call_arguments" + TOOL_CALL_END + TOOL_CALLS_END + "\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + (message['content'] or '') }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜></think>' + (message['content'] or '') }}"
    "{% if message['tool_calls'] %}{{ '" + TOOL_CALLS_BEGIN + "' }}{% for call in message['tool_calls'] %}"
    "{{ '" + TOOL_CALL_BEGIN + "' + call['function']['name'] + '" + TOOL_SEP + "' + call['function']['arguments']"
    " + '" + TOOL_CALL_END + "' }}{% endfor %}{{ '" + TOOL_CALLS_END + "' }}{% endif %}{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}{{ '" + TOOL_OUTPUT_BEGIN + "' + (message['content'] or '') + '" + TOOL_OUTPUT_END
    + "' }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}"
    "{% if thinking is defined and thinking %}{{ '<think>' }}{% else %}{{ '</think>' }}{% endif %}{% endif %}"
)

# What the small tokenizer learns its merges from: a few sentences, so that common English pieces are single tokens.
CORPUS = """\
DeepSeek Sparse Attention makes long-context inference cheap.
A lightning indexer scores every past token with a few ReLU heads and picks the top-k tokens.
Multi-head latent attention then runs over the selected tokens only.
The routed experts of each layer are chosen per token by a gate; a shared expert always runs.
The model is exported to ONNX, built into TensorRT engines and served by Triton Inference Server.
Hello, world! How are you today? The quick brown fox jumps over the lazy dog.
Café, naïve, 東京, Привет, emoji 🙂: text is encoded as UTF-8 bytes, one byte-level token each at least.
"""


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files present in a checkpoint directory: regular files of its own (a link out of it, or a FIFO,
    is refused: the export copies them, serving reads them)."""
    directory = Path(directory)
    present = [directory / name for name in TOKENIZER_FILES if (directory / name).exists()
               or (directory / name).is_symlink()]
    return [regular_file_inside(path, directory, "tokenizer file of the checkpoint") for path in present]


def copy_tokenizer(checkpoint_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy a checkpoint's tokenizer files into out_dir (an export: what serving reads); returns their names."""
    copied = []
    for path in tokenizer_files(checkpoint_dir):
        shutil.copyfile(path, Path(out_dir) / path.name)
        copied.append(path.name)
    return copied


def small_tokenizer(vocab_size: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json (file name → text) of a byte-level BPE tokenizer of at most
    `vocab_size` tokens: the 4 special tokens, the 256 byte symbols, then merges learned from CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < len(SPECIAL_TOKENS) + len(TOOL_TOKENS) + 256:
        raise ValueError(f"a byte-level tokenizer needs a vocabulary of at least "
                         f"{len(SPECIAL_TOKENS) + len(TOOL_TOKENS) + 256} tokens, "
                         f"the model has {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(TOOL_TOKENS), special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer)
    tokenizer.add_tokens(list(TOOL_TOKENS))  # single tokens, decoded as text (not special: never skipped)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                             special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    return {"tokenizer.json": tokenizer.to_str(pretty=True) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n"}


def check_text(directory: str | Path) -> None:
    """The tokenizer files of a checkpoint are tried before anything is built from it, the way serving uses them
    (serving/generation.py's TextWorker: in a process of its own, with time and memory limits): a text prompt is
    encoded, and a conversation rendered by the chat template. A checkpoint without tokenizer files passes (token ids
    are served)."""
    from dsa_export.errors import DSAExportError
    from dsa_export.serving.generation import RequestError, TextCodec, TextWorker

    directory = Path(directory)
    tokenizer_files(directory)  # regular files of its own
    if not TextCodec.exists(directory):
        return
    worker = None
    try:
        worker = TextWorker(directory)
        worker.encode("Hello, world!")
        if (directory / "tokenizer_config.json").is_file() and TextCodec(directory).chat_template:
            worker.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    except (ValueError, RequestError) as e:
        raise DSAExportError(f"{directory}: its tokenizer cannot serve text ({' '.join(str(e).split())})") from None
    finally:
        if worker is not None:
            worker.close()
