"""An independent implementation agrees: HF transformers' deepseek_v32 on the same HF-layout checkpoint."""

import pytest
import torch

from conftest import random_ids

import transformers  # a test dependency (pip install .[test]): the acceptance check must not skip silently


@pytest.mark.hf
@pytest.mark.parametrize("mode", ["sparse", "masked"])
def test_logits_match_hf_transformers(tiny_checkpoint, tiny_model, tiny_config, mode):
    assert tiny_config.rope_scaling is not None, "YaRN must be on"
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    ids = random_ids(tiny_config, 2, 40, seed=5)
    assert ids.shape[1] > tiny_config.index_topk
    tiny_model.attention = mode
    with torch.no_grad():
        ours = tiny_model(ids)
        theirs = hf(ids).logits.float()
    assert ours.shape == theirs.shape == (2, 40, tiny_config.vocab_size)
    assert (ours - theirs).abs().max() < 1e-4
