"""Generated samples and the forgetting figure in status.json and FineTuneJob.status: each trial's
latest, bounded in size whatever the trainer writes (the status lives in etcd)."""

from __future__ import annotations

import json

import pytest

from finetune_operator.status_mapping import apply_progress
from finetune_operator.status_model import FineTuneJobStatus, Phase
from finetune_trainer import eval_report
from finetune_trainer.spec.progress import SAMPLE_CHARS, STATUS_SAMPLES, STATUS_TRIALS, ProgressDocument


def _rows(trial: str | None, ppl: list[float], text: str = "ok") -> list[dict]:
    rows = []
    for i, value in enumerate(ppl):
        rows.append({**({"trial": trial} if trial else {}), "step": 5 * i, **({"baseline": True} if i == 0 else {}),
                     "eval_loss": 1.0, "eval_referencePerplexity": value,
                     "samples": [{"prompt": f"Q{k}", "completion": f"{text} at {5 * i}"} for k in range(2)]})
    return rows


def test_status_fields_hold_each_trials_latest_samples_and_forgetting():
    rows = [*_rows("t1", [20.0, 22.0, 25.0]), {"trial": "t1", "event": "finished"}, *_rows("t2", [20.0, 19.0])]
    fields = eval_report.status_fields(rows)
    assert [(s["trial"], s["step"]) for s in fields["samples"]] == [("t1", 10), ("t2", 5)]
    assert fields["samples"][0]["samples"][0] == {"prompt": "Q0", "completion": "ok at 10"}
    t1, t2 = fields["forgetting"]
    assert (t1["baseline"], t1["latest"], t1["step"]) == (20.0, 25.0, 10)
    assert abs(t1["change"] - 0.25) < 1e-12 and abs(t2["change"] + 0.05) < 1e-12


def test_a_single_runs_forgetting_is_reported_as_a_change():
    figure = eval_report.forgetting(_rows(None, [24.1, 28.0, 31.0]))
    assert figure is not None and figure["finetuned"] == 31.0
    assert eval_report.forgetting_text(figure) == "general-text perplexity 24.10 -> 31.00, +29%"
    at_best = eval_report.forgetting(_rows(None, [24.1, 28.0, 31.0]), step=5)  # the exported model's evaluation
    assert at_best is not None and at_best["finetuned"] == 28.0
    assert eval_report.forgetting(_rows(None, [24.1])) is None  # no evaluation after the baseline yet


def test_status_is_bounded_whatever_the_trainer_writes():
    huge = "x" * 100_000
    rows = [r for t in range(50) for r in _rows(f"t{t}", [10.0, 11.0], text=huge)]
    rows = [{**r, "samples": r["samples"] * 16} for r in rows]  # 32 samples each
    doc = ProgressDocument.model_validate({"job": "j", "updated": "2026-01-01T00:00:00Z", "state": "running", "kind": "search",
                                           **eval_report.status_fields(rows)})
    assert len(doc.samples) == STATUS_TRIALS and [s.trial for s in doc.samples] == [f"t{t}" for t in range(42, 50)]
    assert all(len(s.samples) == STATUS_SAMPLES for s in doc.samples)
    assert all(len(x.completion) == SAMPLE_CHARS + 1 and x.completion.endswith("…") for s in doc.samples for x in s.samples)
    status = apply_progress(FineTuneJobStatus(phase=Phase.RUNNING), ProgressDocument.read(doc.as_dict()))
    patch = status.to_patch()
    assert len(patch["samples"]) == STATUS_TRIALS and len(patch["forgetting"]) == STATUS_TRIALS
    assert len(json.dumps(patch)) < 16_000
    # the operator bounds a document it reads too, not only the trainer when it writes
    raw = {"job": "j", "updated": "2026-01-01T00:00:00Z", "state": "running", "kind": "single",
           "samples": [{"step": 1, "samples": [{"prompt": huge, "completion": huge}] * 40}] * 40}
    read = ProgressDocument.read(raw)
    assert read is not None and len(json.dumps(read.as_dict())) < 16_000
    assert read.samples[0].samples[0].prompt.startswith("…")  # a prompt keeps its end, where it asks


def test_a_diverged_latest_perplexity_is_null_not_a_lost_document():
    raw = {"job": "j", "updated": "2026-01-01T00:00:00Z", "state": "running", "kind": "single",
           "forgetting": [{"baseline": 20.0, "latest": float("nan"), "step": 4}]}
    doc = ProgressDocument.read(raw)
    assert doc is not None and doc.forgetting[0].latest is None


def test_the_runs_output_shows_each_evaluations_samples_and_the_summary_the_forgetting(tmp_path, capsys):
    from finetune_trainer import report

    row = _rows(None, [20.0, 26.0], text="line one\nline two " + "y" * 300)[1]
    shown = report.format_row(row).splitlines()
    assert shown[0].startswith("[eval] step 5: loss=1.0000  referencePerplexity=26.0000")
    assert shown[1].startswith("  sample 1: line one ⏎ line two yyy") and shown[1].endswith("…")
    assert len(shown) == 3 and all(len(line) < 200 for line in shown)
    results = {"job": "j", "run": "r", "metrics": {"validation": {"baseline": {}, "finetuned": {}}, "test": {}},
               "steps": 5, "total_steps": 5, "early_stopped": False, "timings": {"train_seconds": 1.0, "total_seconds": 2.0},
               "throughput": {"tokens_per_second": 10.0}, "peak_memory_mib": 1.0, "model": None,
               "forgetting": eval_report.forgetting(_rows(None, [24.1, 31.0]))}
    report.print_summary(results, tmp_path)
    assert "forgetting: general-text perplexity 24.10 -> 31.00, +29% (step 5)" in capsys.readouterr().out


def test_a_searchs_results_hold_every_trials_samples_and_forgetting_at_its_best_step():
    rows = [*_rows("t1", [20.0, 22.0, 25.0]), *_rows("t2", [20.0, 19.0])]
    strip = lambda r: {k: v for k, v in r.items() if k != "samples"}  # noqa: E731  # Tune's rows carry no samples
    results = {"best": {"trial": "t1", "step": 5},
               "trials": [{"trial": "t1", "best_step": 5, "history": [strip(r) for r in rows[:3]]},
                          {"trial": "t2", "best_step": 5, "history": [strip(r) for r in rows[3:]]}]}
    eval_report.add_to_search_results(results, [*rows, {"trial": "t2", "event": "finished"}])
    assert [(s["trial"], s["step"], s["baseline"]) for s in results["samples"]] == [
        ("t1", 0, True), ("t1", 5, False), ("t1", 10, False), ("t2", 0, True), ("t2", 5, False)]
    assert results["trials"][0]["forgetting"]["finetuned"] == 22.0 and results["trials"][1]["forgetting"]["finetuned"] == 19.0
    assert results["forgetting"]["trial"] == "t1" and results["forgetting"]["change"] == pytest.approx(0.1)
