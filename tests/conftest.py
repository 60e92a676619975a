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
