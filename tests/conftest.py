import os

# The Triton interpreter is chosen when triton is imported, so set it before anything imports triton. AOT compilation
# (tests/test_aot.py) then runs in a child process without it (dsa_export/kernels/aot.py explains why).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from dsa_export.models import get_preset, init_checkpoint, load_checkpoint


@pytest.fixture(scope="session")
def tiny_config():
    return get_preset("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_config):
    """A bf16 tiny checkpoint in HF layout, written once per session."""
    return init_checkpoint(tiny_config, tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


@pytest.fixture()
def tiny_model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint, progress=False)


def random_ids(config, batch, length, seed=0):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


TINY_CAPACITY = 256  # cache rows of the session's tiny export: > the longest parity sequence (29 + 32 tokens)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_checkpoint):
    """The tiny checkpoint exported to ONNX (fp32, weights streamed from the checkpoint), once per session."""
    from dsa_export.exporter.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny_checkpoint, out, capacity=TINY_CAPACITY)
    return out


# The longest modules first (minutes each on 2 cores): `--dist loadfile --no-loadscope-reorder` hands whole modules
# to the two workers in collection order (xdist's default order, most tests first, started the two longest modules,
# of two and six tests, last), so starting with these keeps one worker from being left with a long module at the end.
LONGEST_FIRST = ("test_interruptions", "test_readme", "test_server", "test_cli", "test_nodes", "test_bad_input",
                 "test_streamed_export", "test_aot", "test_openai_api", "test_onnx_export")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.module.__name__.rpartition(".")[2] if item.module else ""
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module's tests keep their order
