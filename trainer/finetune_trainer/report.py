"""What a person sees in the terminal: live progress, one line per evaluation, the final table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def format_row(row: dict[str, Any]) -> str:
    label = "baseline" if row.get("baseline") else f"step {row['step']}"
    metrics = "  ".join(f"{k[5:]}={v:.4f}" for k, v in row.items() if k.startswith("eval_") and isinstance(v, float))
    train = f"  train_loss={row['train_loss']:.4f}" if isinstance(row.get("train_loss"), float) else ""
    return f"[eval] {label}: {metrics}{train}"


class LiveProgress:
    def __init__(self) -> None:
        self.console = Console()
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.task = None
        self.printed = 0

    def update(self, latest: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        for row in rows[self.printed :]:
            self.progress.console.print(format_row(row))
        self.printed = len(rows)
        if not latest:
            return
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=latest["total"], info="")
        info = f"loss {latest['loss']:.4f}  lr {latest['lr']:.2e}" if "loss" in latest else ""
        self.progress.update(self.task, completed=latest["step"], info=info)

    def stop(self) -> None:
        self.progress.stop()


def print_summary(results: dict[str, Any], run_dir: Path) -> None:
    console = Console()
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
    console.print(f"model: {results['model']}\nresults: {run_dir / 'results.json'}")


def _fmt(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"
