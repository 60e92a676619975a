import json

import pytest

from dsa_export.models.config import ConfigError, DSAConfig, load_config
from dsa_export.models.presets import PRESETS, get_preset
from dsa_export.errors import DSAExportError


def test_hf_dict_round_trip_for_every_preset():
    for config in PRESETS.values():
        assert DSAConfig.from_hf_dict(config.to_hf_dict()) == config


def test_official_671b_values_and_derived_softmax_scale():
    config = get_preset("v3.2-exp")
    # dsa-architecture.md §3: 192^-0.5 × (0.1·ln 40 + 1)² = 0.135234
    assert config.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    assert config.latent_dim == 576 and config.index_topk == 2048


def test_transformers5_rope_parameters_are_accepted():
    raw = get_preset("tiny").to_hf_dict()
    raw["rope_parameters"] = {**raw.pop("rope_scaling"), "rope_theta": raw.pop("rope_theta")}
    assert DSAConfig.from_hf_dict(raw) == get_preset("tiny")


@pytest.mark.parametrize("field", ["index_topk", "kv_lora_rank", "n_group", "rms_norm_eps"])
def test_missing_field_is_named(field):
    raw = get_preset("tiny").to_hf_dict()
    del raw[field]
    with pytest.raises(ConfigError, match=f"'{field}' is missing"):
        DSAConfig.from_hf_dict(raw)


@pytest.mark.parametrize("changes, field", [
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 5}, "topk_group"),
    ({"index_head_dim": 4}, "index_head_dim"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"model_type": "deepseek_v3"}, "model_type"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling.original_max_position_embeddings"),
])
def test_inconsistent_field_is_named(changes, field):
    raw = {**get_preset("tiny").to_hf_dict(), **changes}
    with pytest.raises(ConfigError, match=f"'{field}'"):
        DSAConfig.from_hf_dict(raw)


def test_load_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON") as err:
        load_config(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)


def test_unknown_preset():
    with pytest.raises(DSAExportError, match="unknown preset 'huge'"):
        get_preset("huge")
