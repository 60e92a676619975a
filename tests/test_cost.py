"""Cost model: analytic FLOPs vs torch.utils.flop_counter, calibration against the paper, curve shapes, the CLI."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dsa_export.cli import main
from dsa_export.models import DSAForCausalLM, get_preset
from dsa_export.models.cache import Paging
from dsa_export.cost.model import (Assumptions, calibration, cost_curves, step_cost, token_components,
                                   token_cost)
from dsa_export.targets import get_target


@pytest.mark.parametrize("variant", ["dsa", "dense"])
def test_analytic_decode_flops_equal_flop_counter(variant):
    # 8 experts, 2 chosen per token: the eager MoE runs only the chosen ones, as the cost model prices it
    config = get_preset("tiny")
    model = DSAForCausalLM(config).eval()
    model.attention = "sparse" if variant == "dsa" else "dense"
    past = 99
    L = config.num_hidden_layers
    cache = model.new_cache(1, capacity=past + 1)  # a pool of 2 blocks: 128 rows, 28 of them beyond the capacity
    for t in cache.tensors():
        t.normal_()
    positions = torch.tensor([[past]])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_with_cache(torch.tensor([[5]]), positions, cache.latent, cache.index_keys,
                                 Paging.identity(positions, cache.rows))
    analytic = sum(p.flops for p in token_components(config, past + 1, "decode", variant))
    if variant == "dense":
        # the eager "dense" mode is the MHA reference (expands every cached latent per step), not the absorbed MQA
        # decode the cost model prices: compare the parts both share, attention excluded
        parts = token_components(config, past + 1, "decode", "dense")
        shared = sum(p.flops for p in parts if p.name != "attention_dense")
        H, T = config.num_attention_heads, past + 1
        mha = L * (2 * T * config.kv_lora_rank * H * (config.qk_nope_head_dim + config.v_head_dim)
                   + 2 * H * T * (config.qk_head_dim + config.v_head_dim))
        absorbed_query = L * 2 * config.kv_lora_rank * H * (config.qk_nope_head_dim + config.v_head_dim)
        index_keys = L * 2 * config.hidden_size * config.index_head_dim  # eager dense still fills the index-key cache
        analytic = shared - absorbed_query + mha + index_keys
    assert counter.get_total_flops() == analytic


def test_step_flops_price_the_logits_of_each_rows_last_token_only():
    """A chunk of 5 tokens on a past of 99 in 2 rows, the logits of each row's last token only (what a serving step
    asks for: `logits_index`): torch's flop counter on the eager step against cost/model.py `step_cost`."""
    config = get_preset("tiny")
    model = DSAForCausalLM(config).eval()
    past, B, S = 99, 2, 5
    cache = model.new_cache(B, capacity=past + S)
    for t in cache.tensors():
        t.normal_()
    positions = (past + torch.arange(S)).expand(B, S).contiguous()
    paging = Paging.identity(positions, cache.rows)
    ids = torch.randint(0, config.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))

    def flops(**kw):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.forward_with_cache(ids, positions, cache.latent, cache.index_keys, paging, **kw)
        return counter.get_total_flops()

    # the readable indexer scores every key up to the step's last position, then masks the ones a token cannot see
    masked = config.num_hidden_layers * B * sum(S - 1 - s for s in range(S)) * (
        2 * config.index_n_heads * config.index_head_dim + 2 * config.index_n_heads)
    closed = step_cost(config, B, S, past, 4, 4).flops
    assert flops(logits_index=torch.tensor([S - 1, 2 * S - 1])) == closed + masked
    assert flops() == closed + masked + (B * S - B) * 2 * config.hidden_size * config.vocab_size  # every token's


def test_calibration_reproduces_the_papers_four_points_within_10_percent():
    cal = calibration(get_preset("v3.2-exp"), get_target("h800"), Assumptions(), price=2.0)
    assert {(r["phase"], r["variant"]) for r in cal["points"]} == {
        ("prefill", "dense"), ("prefill", "dsa"), ("decode", "dense"), ("decode", "dsa")}
    for r in cal["points"]:
        assert abs(r["relative_error"]) < 0.10, r
    crossings = {c["phase"]: c["model_position"] for c in cal["crossovers"]}
    assert 5_000 < crossings["prefill"] < 20_000 and 2_000 < crossings["decode"] < 8_000


def test_curve_shapes():
    curves = cost_curves(get_preset("v3.2-exp"), get_target("h800"))
    for phase in ("prefill", "decode"):
        dense = [p["usd_per_mtok"] for p in curves[phase]["dense"]]
        dsa = [p["usd_per_mtok"] for p in curves[phase]["dsa"]]
        assert all(b > a for a, b in zip(dense, dense[1:])), phase  # dense grows with every position
        assert all(b >= a for a, b in zip(dsa, dsa[1:])), phase  # DSA never gets cheaper further out
        assert dsa[-1] < dense[-1] / 3  # at 128K DSA is several times cheaper
        assert dsa[0] >= dense[0]  # and no cheaper at the start (the indexer costs something)
        half = [p["position"] for p in curves[phase]["dense"]].index(65536)
        assert dsa[-1] - dsa[half] < (dense[-1] - dense[half]) / 5  # from 64K to 128K DSA grows 5x+ slower


def test_price_and_gpu_scale_the_cost():
    config, h800 = get_preset("v3.2-exp"), get_target("h800")
    at_2 = token_cost(config, 65536, "decode", "dsa", h800, Assumptions(), 2.0)["usd_per_mtok"]
    assert token_cost(config, 65536, "decode", "dsa", h800, Assumptions(), 4.0)["usd_per_mtok"] == pytest.approx(2 * at_2)
    assert token_cost(config, 65536, "decode", "dsa", get_target("b200"), Assumptions(), 2.0)["usd_per_mtok"] < at_2


def test_cost_command_writes_every_point_and_the_plots(capsys, tmp_path):
    code = main(["cost", "--preset", "v3.2-exp", "--gpu", "h800", "--price", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "decode   dense  at 128K" in out
    tmp_path = tmp_path / "cost"
    report = json.loads((tmp_path / "cost.json").read_text())
    points = report["curves"]["decode"]["dsa"]
    assert points[0]["position"] == 0 and points[-1]["position"] == 131072 and len(points) > 60
    assert set(points[-1]["seconds_by_component"]) >= {"attention_sparse", "indexer_scoring", "moe"}
    assert "Calibration against DeepSeek's figure" in (tmp_path / "cost.md").read_text()
    assert (tmp_path / "cost_by_position.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["cost", "--gpu", "v100", "--out", str(tmp_path)]) == 2


def test_one_crossover_figure_exact_to_the_token(tmp_path):
    """The report and the calibration give the same crossover, and it is the first position where DSA is cheaper."""
    from dsa_export.cost.model import crossover, token_cost
    from dsa_export.cost.report import write_cost_report

    config, gpu, eff = get_preset("v3.2-exp"), get_target("h800"), Assumptions()
    report = write_cost_report(config, gpu, tmp_path, 2.0, eff)
    for c in report["calibration"]["crossovers"]:
        position = report["crossovers"][c["phase"]]
        assert c["model_position"] == position == crossover(config, gpu, eff, 2.0, c["phase"])

        def usd(t, variant, phase=c["phase"]):
            return token_cost(config, t, phase, variant, gpu, eff, 2.0)["usd_per_mtok"]

        assert usd(position, "dsa") < usd(position, "dense") and usd(position - 1, "dsa") >= usd(position - 1, "dense")
    text = (tmp_path / "cost.md").read_text()
    assert text.count(f"{report['crossovers']['decode']:,}") >= 2  # the table and the calibration: one figure


def test_a_small_builds_report_says_whose_shapes_the_curves_are(tmp_path, tiny_checkpoint):
    from dsa_export.cost.report import build_cost

    build_cost(get_preset("tiny"), get_target("h100"), tmp_path, 2.0, Assumptions(), label=str(tiny_checkpoint),
               log=lambda line: None)
    text = (tmp_path / "cost.md").read_text()
    assert "Modelled shapes: DeepSeek-V3.2-Exp (671B): the build's model" in text and str(tiny_checkpoint) in text


def test_measured_decode_runs_on_the_threads_asked_and_restores_torchs():
    from dsa_export.cost.measure import measure_decode

    before = torch.get_num_threads()
    model = DSAForCausalLM(get_preset("tiny")).eval()
    measured = measure_decode(model, contexts=(64,), repeat=1, threads=1)
    assert measured["threads"] == 1 and torch.get_num_threads() == before
