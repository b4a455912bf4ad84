"""The chart's Grafana dashboard: every query names only metrics the code exports, every exported
metric is on it, and the chart ships it as a ConfigMap with Grafana's sidecar label only when asked.

The exported names come from the code's own declarations (parsed, not listed here): the
operator's prometheus-client metrics (operator/finetune_operator/metrics.py; a Counter is scraped
as <name>_total, a Histogram as <name>_bucket/_sum/_count) and the trainer's ray.util.metrics
(trainer/finetune_trainer/ray_metrics.py; Ray exports them as ray_<name>). Label names in selectors
and `by (...)` must be ones those declarations carry.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from tests.unit.test_helm_chart import CHART, by_kind, render

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = CHART / "dashboards" / "finetune-operator.json"
OPERATOR_METRICS = ROOT / "operator" / "finetune_operator" / "metrics.py"
RAY_METRICS = ROOT / "trainer" / "finetune_trainer" / "ray_metrics.py"

SUFFIXES = {"Gauge": [""], "Counter": ["_total"], "Histogram": ["_bucket", "_sum", "_count"]}
PROMQL_WORDS = {"sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "avg", "max", "min", "count",
                "label_values", "topk", "on", "ignoring", "group_left", "group_right"}


def _constants(tree: ast.Module) -> dict[str, list[str]]:
    """Module-level tuples of strings (tag key lists), with `*OTHER` expanded."""
    found: dict[str, list[str]] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Tuple)):
            found[node.targets[0].id] = _strings(node.value, found)
    return found


def _strings(node: ast.AST, constants: dict[str, list[str]]) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name):
        return list(constants.get(node.id, []))
    if isinstance(node, ast.Starred):
        return _strings(node.value, constants)
    if isinstance(node, (ast.Tuple, ast.List)):
        return [s for elt in node.elts for s in _strings(elt, constants)]
    return []


def declared(path: Path, prefix: str = "") -> dict[str, set[str]]:
    """{exported series name: its labels} for every Gauge/Counter/Histogram(...) call in `path`."""
    tree = ast.parse(path.read_text())
    constants, out = _constants(tree), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SUFFIXES and node.args:
            first = node.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), ast.dump(node)
            labels = set(_strings(node.args[2], constants)) if len(node.args) > 2 else set()
            for kw in node.keywords:
                if kw.arg in ("labelnames", "tag_keys"):
                    labels |= set(_strings(kw.value, constants))
            extra = {"le"} if node.func.id == "Histogram" else set()
            for suffix in SUFFIXES[node.func.id]:
                out[f"{prefix}{first.value}{suffix}"] = labels | (extra if suffix == "_bucket" else set())
    return out


def exported() -> dict[str, set[str]]:
    return declared(OPERATOR_METRICS) | declared(RAY_METRICS, prefix="ray_")


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def names_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """Metric names and label names a PromQL expression uses (enough PromQL for our dashboard)."""
    labels = set()
    for body in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    for body in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {s.strip() for s in body.split(",") if s.strip()}
    if m := re.match(r"label_values\((?:[^,{]*(?:\{[^}]*\})?),\s*([A-Za-z_]\w*)\)", expr):
        labels.add(m.group(1))
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", bare)
    bare = re.sub(r"label_values\(([^,]*),[^)]*\)", r"\1", bare)
    idents = set(re.findall(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(?!\w)", bare))
    return {i for i in idents if i not in PROMQL_WORDS}, labels


def test_the_declarations_are_found():
    names = exported()
    assert "finetune_operator_jobs" in names and "finetune_operator_reconcile_errors_total" in names
    assert "ray_finetune_train_loss" in names and names["ray_finetune_eval_metric"] >= {"metric", "trial", "finetune_job"}


def test_every_query_names_an_exported_metric_and_every_metric_is_shown():
    dashboard, names = json.loads(DASHBOARD.read_text()), exported()
    used: set[str] = set()
    for expr in queries(dashboard):
        metrics, labels = names_and_labels(expr)
        assert metrics, f"no metric in {expr!r}"
        unknown = metrics - set(names)
        assert not unknown, f"{expr!r} names {sorted(unknown)}, which the code does not export (exported: {sorted(names)})"
        known_labels = set().union(*(names[m] for m in metrics))
        assert labels <= known_labels, f"{expr!r} uses labels {sorted(labels - known_labels)} its metrics do not carry"
        used |= metrics
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families <= shown, f"exported but on no panel: {sorted(families - shown)}"


def test_the_parser_catches_a_wrong_name():
    metrics, labels = names_and_labels('sum by (phase) (rate(finetune_operator_reconcile_error_total{handler="x"}[5m]))')
    assert metrics == {"finetune_operator_reconcile_error_total"} and labels == {"phase", "handler"}
    assert metrics - set(exported())  # a typo is caught


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def test_the_chart_ships_the_dashboard_only_when_enabled(chart):
    objects, _ = render(chart, {})
    assert not [o for o in by_kind(objects, "ConfigMap") if "grafana_dashboard" in o["metadata"].get("labels", {})]
    objects, _ = render(chart, {"grafanaDashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "ML"}}})
    [config] = [o for o in by_kind(objects, "ConfigMap") if "grafana_dashboard" in o["metadata"].get("labels", {})]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1" and config["metadata"]["namespace"] == "monitoring"
    assert config["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert json.loads(config["data"]["finetune-operator.json"]) == json.loads(DASHBOARD.read_text())
