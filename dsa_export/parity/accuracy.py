"""Accuracy parity: the eager model vs each available backend on the same prompts, gated by thresholds.

Per prompt position: logits max/mean abs error, cosine similarity, KL divergence of the next-token distributions,
top-1 agreement. Per layer: recall of the eager indexer's top-k set. Then greedy generation token by token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dsa_export.files import ensure_output_dir, write_atomic, write_json_atomic
from dsa_export.parity.thresholds import PROMPT_BATCHES, Thresholds
from dsa_export.runtime import Session


@dataclass
class _Totals:
    non_finite: int = 0  # logits that are NaN or inf, in either backend
    max_abs: float = 0.0
    abs_sum: float = 0.0
    count: int = 0
    min_cosine: float = 1.0
    max_kl: float = 0.0
    kl_sum: float = 0.0
    top1_same: int = 0
    positions: int = 0
    recall_hits: list = field(default_factory=list)
    recall_total: list = field(default_factory=list)


def default_prompts(vocab_size: int, seed: int = 0) -> list[list[list[int]]]:
    """4 seeded prompts in 3 batches, the first a batch of 2 prompts of different lengths."""
    gen = torch.Generator().manual_seed(seed)

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=gen).tolist()

    return [[prompt(n) for n in batch] for batch in PROMPT_BATCHES]


def _compare_step(ref, cand, lengths: torch.Tensor, totals: _Totals) -> None:
    """Accumulate metrics over the valid (unpadded) positions of one step's results."""
    S = ref.logits.shape[1]
    valid = torch.arange(S) < lengths[:, None]  # [B,S]
    a, b = ref.logits[valid].double(), cand.logits[valid].double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    totals.non_finite += int((~finite).sum())
    a, b = torch.where(finite, a, 0.0), torch.where(finite, b, 0.0)  # the other metrics over the finite values
    diff = (a - b).abs()
    totals.max_abs = max(totals.max_abs, diff.max().item())
    totals.abs_sum += diff.sum().item()
    totals.count += diff.numel()
    totals.min_cosine = min(totals.min_cosine, torch.cosine_similarity(a, b, dim=-1).min().item())
    log_p, log_q = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0)
    totals.max_kl = max(totals.max_kl, kl.max().item())
    totals.kl_sum += kl.sum().item()
    totals.top1_same += (a.argmax(-1) == b.argmax(-1)).sum().item()
    totals.positions += a.shape[0]
    if not totals.recall_hits:
        totals.recall_hits = [0] * len(ref.indexer_topk)
        totals.recall_total = [0] * len(ref.indexer_topk)
    for layer, (x, y) in enumerate(zip(ref.indexer_topk, cand.indexer_topk)):
        for row_x, row_y in zip(x[valid], y[valid]):
            wanted = set(row_x.tolist()) - {-1}
            totals.recall_hits[layer] += len(wanted & set(row_y.tolist()))
            totals.recall_total[layer] += len(wanted)


def compare(reference, candidate, prompt_batches: list[list[list[int]]], new_tokens: int = 32) -> dict:
    """Run both backends on every batch: prefill, then greedy decoding step by step, comparing every step."""
    from dsa_export.progress import bar as progress_bar

    totals = _Totals()
    generations = []
    for batch in progress_bar(prompt_batches, desc=f"parity {candidate.name}", unit="batch"):
        ref, cand = Session(reference), Session(candidate)
        logits_ref, logits_cand = ref.prefill(batch), cand.prefill(batch)
        _compare_step(ref.last, cand.last, ref.lengths, totals)
        tokens_ref, tokens_cand = [[] for _ in batch], [[] for _ in batch]
        for step in range(new_tokens):
            # each backend continues with its own greedy choice: a divergence shows up as a token mismatch
            next_ref, next_cand = logits_ref.argmax(-1), logits_cand.argmax(-1)
            for row, token in zip(tokens_ref, next_ref.tolist()):
                row.append(token)
            for row, token in zip(tokens_cand, next_cand.tolist()):
                row.append(token)
            if step + 1 == new_tokens:
                break
            logits_ref, logits_cand = ref.decode(next_ref), cand.decode(next_cand)
            if torch.equal(next_ref, next_cand):
                _compare_step(ref.last, cand.last, torch.ones(len(batch), dtype=torch.long), totals)
        generations += [{"prompt_len": len(p), "reference": r, "candidate": c} for p, r, c in
                        zip(batch, tokens_ref, tokens_cand)]
    matched = sum(x == y for g in generations for x, y in zip(g["reference"], g["candidate"]))
    total = sum(len(g["reference"]) for g in generations)
    recall = [h / t if t else 1.0 for h, t in zip(totals.recall_hits, totals.recall_total)]
    return {
        "backend": candidate.name,
        "precision": str(candidate.cache_dtype).removeprefix("torch."),
        "prompts": [len(p) for batch in prompt_batches for p in batch],
        "batches": [len(batch) for batch in prompt_batches],
        "new_tokens": new_tokens,
        "metrics": {
            "non_finite_logits": totals.non_finite,
            "max_abs_logits": totals.max_abs,
            "mean_abs_logits": totals.abs_sum / max(totals.count, 1),
            "min_cosine": totals.min_cosine,
            "max_kl": totals.max_kl,
            "mean_kl": totals.kl_sum / max(totals.positions, 1),
            "top1": totals.top1_same / max(totals.positions, 1),
            "greedy_match": matched / max(total, 1),
            "min_indexer_recall": min(recall) if recall else 1.0,
        },
        "positions_compared": totals.positions,
        "indexer_recall_per_layer": recall,
        "generations": generations,
    }


def failures(report: dict, thresholds: Thresholds) -> list[str]:
    m, t = report["metrics"], thresholds
    checks = [("non_finite_logits", m["non_finite_logits"] == 0, "==", 0),
              ("max_abs_logits", m["max_abs_logits"] <= t.max_abs_logits, "<=", t.max_abs_logits),
              ("min_cosine", m["min_cosine"] >= t.min_cosine, ">=", t.min_cosine),
              ("max_kl", m["max_kl"] <= t.max_kl, "<=", t.max_kl),
              ("top1", m["top1"] >= t.min_top1, ">=", t.min_top1),
              ("greedy_match", m["greedy_match"] >= t.min_greedy_match, ">=", t.min_greedy_match),
              ("min_indexer_recall", m["min_indexer_recall"] >= t.min_indexer_recall, ">=", t.min_indexer_recall)]
    # `not ok` also catches a NaN metric: every comparison with NaN is False
    return [f"{report['backend']}: {name} = {_distinct(m[name], limit)}, needs {op} {limit:g}"
            for name, ok, op, limit in checks if not ok]


def _distinct(value: float, limit: float) -> str:
    """The value with as many digits as it takes to see it differ from the limit (0.99998 is not "1")."""
    for digits in range(6, 18):
        text = f"{value:.{digits}g}"
        if text != f"{limit:.{digits}g}":
            return text
    return repr(value)


def junit_xml(report: dict) -> str:
    """parity.json's verdicts as JUnit XML (a test case per backend and metric, a failure where a threshold is
    missed), for CI systems that show test reports."""
    import xml.etree.ElementTree as ET

    cases = []
    for backend in report["backends"]:
        missed = {f.split(": ", 1)[1].split(" = ")[0]: f for f in failures(backend, Thresholds(**backend["thresholds"]))}
        for metric, value in backend["metrics"].items():
            if metric in ("mean_abs_logits", "mean_kl"):  # reported, not gated
                continue
            cases.append((backend["backend"], metric, value, missed.get(metric)))
    suite = ET.Element("testsuite", name="dsa-export parity", tests=str(len(cases)),
                       failures=str(sum(m is not None for *_, m in cases)), errors="0")
    for backend, metric, value, missed in cases:
        case = ET.SubElement(suite, "testcase", classname=f"parity.{backend}", name=metric, time="0")
        if missed is not None:
            ET.SubElement(case, "failure", message=missed, type="threshold").text = missed
        else:
            ET.SubElement(case, "system-out").text = f"{metric} = {value!r}"
    root = ET.Element("testsuites", name="dsa-export", tests=suite.get("tests"), failures=suite.get("failures"))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_report(reports: list[dict], thresholds: Thresholds, out_dir: str | Path) -> dict:
    """parity.json + parity.md in out_dir; returns what parity.json holds ("failures" empty: every backend passed)."""
    out_dir = ensure_output_dir(out_dir)
    for r in reports:  # each backend is judged by the thresholds of its precision, recorded beside its metrics
        r["thresholds"] = asdict(thresholds.for_precision(r["precision"]))
    missed = [f for r in reports for f in failures(r, Thresholds(**r["thresholds"]))]
    report = {"thresholds": asdict(thresholds), "passed": not missed, "failures": missed, "backends": reports}
    write_json_atomic(out_dir / "parity.json", report)
    lines = ["# Accuracy parity against the eager model", "",
             "| backend | max abs logits | mean abs | min cosine | max KL | top-1 | greedy match | min indexer recall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        m = r["metrics"]
        lines.append(f"| {r['backend']} | {m['max_abs_logits']:.3g} | {m['mean_abs_logits']:.3g} | "
                     f"{m['min_cosine']:.6f} | {m['max_kl']:.3g} | {m['top1']:.3f} | {m['greedy_match']:.3f} | "
                     f"{m['min_indexer_recall']:.3f} |")
    lines.append("")
    for precision in dict.fromkeys(r["precision"] for r in reports):
        t = thresholds.for_precision(precision)
        lines.append(f"Thresholds ({precision}): max abs logits <= {t.max_abs_logits:g}, cosine >= {t.min_cosine:g}, "
                     f"KL <= {t.max_kl:g}, top-1 >= {t.min_top1:g}, greedy match >= {t.min_greedy_match:g}, indexer "
                     f"recall >= {t.min_indexer_recall:g}.")
    lines.append("")
    for r in reports:
        lines.append(f"{r['backend']}: prompts of {r['prompts']} tokens in batches of {r['batches']}, "
                     f"{r['new_tokens']} greedy tokens each; {r['positions_compared']} positions compared; indexer "
                     f"recall per layer {', '.join(f'{x:.3f}' for x in r['indexer_recall_per_layer'])}.")
    lines += ["", "**PASSED**" if not missed else "**FAILED**: " + "; ".join(missed)]
    write_atomic(out_dir / "parity.md", "\n".join(lines) + "\n")
    write_atomic(out_dir / "junit.xml", junit_xml(report))
    return report
