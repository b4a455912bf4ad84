"""What a person sees on stdout: live progress, one line per evaluation, the final table; the
CLI's other output (`validate`) goes through `say`. Logs go to stderr (`logs`).

Colour and progress bars only on a terminal: in a file, a pipe or `kubectl logs` the evaluation
lines are the progress, and nothing writes escape codes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import eval_report


def format_row(row: dict[str, Any]) -> str:
    trial = f"{row['trial']} " if row.get("trial") else ""
    if "event" in row:
        return f"[search] {trial}{row['event']}"
    label = "baseline" if row.get("baseline") else f"step {row['step']}"
    metrics = "  ".join(f"{k[5:]}={v:.4f}" for k, v in row.items() if k.startswith("eval_") and isinstance(v, float))
    train = f"  train_loss={row['train_loss']:.4f}" if isinstance(row.get("train_loss"), float) else ""
    return "\n".join([f"[eval] {trial}{label}: {metrics}{train}", *eval_report.output_lines(row)])  # + generated samples


def say(text: str) -> None:
    """One line (or block) of the CLI's own output, as written: no markup, no highlighting."""
    print(text, flush=True)


class LiveProgress:
    def __init__(self) -> None:
        self.console = _console()
        self.bars = self.console.is_terminal  # a log gets the rows; a bar's final frame says nothing more
        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.tasks: dict[str | None, Any] = {}
        self.printed = 0

    def update(self, latest: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        """`latest` is one run's step progress, or {"trials": {name: progress}} for a search (a bar per trial)."""
        for row in rows[self.printed :]:
            self.progress.console.print(format_row(row), markup=False, highlight=False)
            if "event" in row and row.get("trial") in self.tasks and "stopped" in row["event"]:
                self.progress.update(self.tasks[row["trial"]], info="stopped by the scheduler")
                self.progress.stop_task(self.tasks[row["trial"]])
        self.printed = len(rows)
        if not self.bars:
            return
        for progress in (latest["trials"].values() if "trials" in latest else [latest] if latest else []):
            name = progress.get("trial")
            if name not in self.tasks:
                if not self.tasks:
                    self.progress.start()
                self.tasks[name] = self.progress.add_task(name or "train", total=progress["total"], info="", label=name or "training")
            info = f"loss {progress['loss']:.4f}  lr {progress['lr']:.2e}" if "loss" in progress else ""
            self.progress.update(self.tasks[name], completed=progress["step"], info=info)

    def stop(self) -> None:
        self.progress.stop()


def print_summary(results: dict[str, Any], run_dir: Path) -> None:
    console = _console()
    table = Table(title=f"{results['job']} — {results['run']}")
    table.add_column("split")
    table.add_column("metric")
    table.add_column("baseline", justify="right")
    table.add_column("fine-tuned", justify="right")
    val, test = results["metrics"]["validation"], results["metrics"]["test"]
    for split, pair in (("validation", (val.get("baseline"), val.get("finetuned"))), ("test", (test.get("baseline"), test.get("finetuned")))):
        before, after = pair[0] or {}, pair[1] or {}
        for metric in sorted(set(before) | set(after)):
            if metric in {"examples", "tokens"}:
                continue
            table.add_row(split, metric, _fmt(before.get(metric)), _fmt(after.get(metric)))
    console.print(table)
    tp, timings = results["throughput"], results["timings"]
    console.print(
        f"steps {results['steps']}/{results['total_steps']}"
        + (" (early stopped)" if results["early_stopped"] else "")
        + f" · train {_fmt(timings['train_seconds'], 1)} s of {_fmt(timings['total_seconds'], 1)} s total"
        + f" · {_fmt(tp['tokens_per_second'], 0)} tokens/s · peak {_fmt(results['peak_memory_mib'], 0)} MiB/worker"
    )
    best = results.get("best") or {}
    if best:
        console.print(f"best: step {best['step']} {best['metric']}={best['value']:.4f}")
    _print_forgetting(console, results)
    console.print(f"model: {results['model']}\nresults: {run_dir / 'results.json'}")
    _print_next(console, results, run_dir)


def print_search_summary(results: dict[str, Any], run_dir: Path) -> None:
    from .search_results import fmt_params

    console = _console()
    search = results["search"]
    metric = search["metric"][5:]
    table = Table(title=f"{results['job']} — {results['run']}: {search['trials']} trials, {search['algorithm']} search, {search['scheduler']} scheduler")
    numbers = {f"best {metric}", "steps", "trainable", "peak MiB"}
    for column in ("trial", "strategy", "parameters", "trainable", "peak MiB", f"best {metric}", "steps", "status", "checkpoint"):
        table.add_column(column, justify="right" if column in numbers else "left", overflow="fold")
    reverse = search["mode"] == "max"
    ranked = sorted(results["trials"], key=lambda t: (t["value"] is None, -(t["value"] or 0) if reverse else (t["value"] or 0)))
    best = results.get("best") or {}
    for t in ranked:
        mark = " *" if t["trial"] == best.get("trial") else ""
        checkpoint = _relative(t["checkpoint"], run_dir) if t["checkpoint"] else "—"
        status = t["status"] + (f": {t['error']}" if t.get("error") else "")
        params = {k: v for k, v in t["params"].items() if k != "freezing.strategy"}  # the strategy column names it
        trainable, total = t.get("trainable_params"), t.get("total_params")
        share = f" ({100 * trainable / total:.2g}%)" if trainable is not None and total else ""
        table.add_row(t["trial"] + mark, t.get("strategy") or "—", fmt_params(params, t["unused_params"]), _count(trainable) + share,
                      _fmt(t.get("peak_memory_mib"), 0), _fmt(t["value"]), f"{t['steps']}/{t['total_steps']}", status, checkpoint)
    console.print(table)
    if best:
        unused: list[str] = next((t["unused_params"] for t in results["trials"] if t["trial"] == best["trial"]), [])
        shown = {k: v for k, v in best["params"].items() if k not in unused}
        strategy = f" ({best['strategy']})" if best.get("strategy") else ""
        console.print(f"best: {best['trial']}{strategy} at step {best['step']}: {metric}={best['value']:.4f} ({fmt_params(shown)})")
    val, test = results["metrics"]["validation"], results["metrics"]["test"]
    for split, pair in (("validation", val), ("test", test)):
        before, after = pair.get("baseline") or {}, pair.get("finetuned") or {}
        metrics = [m for m in sorted(set(before) | set(after)) if m not in {"examples", "tokens"}]
        if metrics:
            console.print(f"{split}: " + "  ".join(f"{m} {_fmt(before.get(m))} -> {_fmt(after.get(m))}" for m in metrics))
    _print_forgetting(console, results)
    console.print(f"trial-steps spent: {search['trial_steps']} · {_fmt(results['timings']['total_seconds'], 1)} s total")
    console.print(f"model: {results['model']}\nplots: {', '.join(results.get('plots') or []) or '—'}\nresults: {run_dir / 'results.json'}")
    _print_next(console, results, run_dir)


def _print_next(console: Console, results: dict[str, Any], run_dir: Path) -> None:
    """Where the per-class figures are drawn, and how to try the model the run exported."""
    plot = (results.get("classes") or {}).get("plot")
    if plot:
        console.print(f"per-class figures: results.json classes, {plot}")
    if results.get("model"):
        console.print(f"try it: finetune predict {run_dir} --text '...'")


def _print_forgetting(console: Console, results: dict[str, Any]) -> None:
    """The exported model's perplexity on general text against the baseline's (spec.evaluation.reference)."""
    figure = results.get("forgetting")
    if figure:
        trial = f" ({figure['trial']})" if figure.get("trial") else ""
        console.print(f"forgetting{trial}: {eval_report.forgetting_text(figure)} (step {figure['step']})")


def _relative(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def _count(count: float | None) -> str:
    """A parameter count as people write it: 4.2M, 135M, 812K."""
    if count is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(int(count))


def _console() -> Console:
    """A terminal's own width and colours; in a log (CI, kubectl logs) no colour even where
    FORCE_COLOR is set, and wide enough that tables do not wrap."""
    return Console() if sys.stdout.isatty() else Console(width=160, color_system=None, force_terminal=False)


def _fmt(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
