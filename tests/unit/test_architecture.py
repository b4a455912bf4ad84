"""The layering rules of ../shared/ARCHITECTURE.md, as tests: the trainer never imports the
operator, and the spec (which the slim operator image uses) imports nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TRAINER = Path(__file__).parents[2] / "trainer" / "finetune_trainer"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_trainer_never_imports_the_operator():
    offenders = {str(p.relative_to(TRAINER)): sorted(n for n in _imports(p) if n.split(".")[0] == "finetune_operator")
                 for p in TRAINER.rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_spec_imports_nothing_heavy():
    code = ("import sys, finetune_trainer.spec; "
            "heavy = {'torch', 'ray', 'deepspeed', 'transformers', 'pandas'} & set(sys.modules); "
            "print(sorted(heavy)); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"finetune_trainer.spec pulls in {done.stdout.strip()}"


def test_operator_imports_nothing_heavy():
    """The operator image has no torch, Ray or DeepSpeed: its modules must import with them blocked."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'torch', 'ray', 'deepspeed', 'transformers'}:\n"
        "            raise ImportError(f'{name} is blocked for the operator')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import finetune_operator.crd, finetune_operator.rayjob, finetune_operator.cli, finetune_operator.status_model\n"
        "finetune_operator.cli.main(['crd'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------------------- import graph
ROOTS = {"finetune_trainer": TRAINER, "finetune_operator": Path(__file__).parents[2] / "operator" / "finetune_operator"}
HEAVY = {"torch", "transformers", "deepspeed", "peft"}

# The worker side: what runs inside Ray Train workers and Ray tasks (and the preflight, which builds
# the model on the meta device). Nothing else in the trainer may import torch, transformers or
# DeepSpeed, at any level: the driver flows, the search's callbacks and the ranking stay light.
TORCH_MODULES = {
    "finetune_trainer.data", "finetune_trainer.deepspeed_load", "finetune_trainer.evaluation", "finetune_trainer.gguf",
    "finetune_trainer.layers", "finetune_trainer.modeling", "finetune_trainer.optim", "finetune_trainer.recipe",
    "finetune_trainer.resume", "finetune_trainer.rng", "finetune_trainer.scoring", "finetune_trainer.guards",
    "finetune_trainer.generation", "finetune_trainer.reference", "finetune_trainer.probes",
    "finetune_trainer.adapters", "finetune_trainer.worker_model", "finetune_trainer.memory", "finetune_trainer.baseline",
    "finetune_trainer.transfer",  # the step's host<->device copies, in the recipe
    "finetune_trainer.predict",  # `finetune predict` loads the model in the CLI's process, once predict_source found it
    "finetune_trainer.batches",
    "finetune_trainer.deepspeed_import",  # the recipe's `import deepspeed`
}
# importing these (with everything they import) loads none of HEAVY: the driver side (ARCHITECTURE.md,
# "Inside the trainer") loads torch only when the preflight runs and in Ray's workers; a search
# trial's actor imports `trial` only until it trains (trial.py says why)
LIGHT_MODULES = ("finetune_trainer.ranking", "finetune_trainer.job_status", "finetune_trainer.search_results",
                 "finetune_trainer.driver", "finetune_trainer.persist", "finetune_trainer.trial", "finetune_trainer.kube_progress",
                 "finetune_trainer.environment", "finetune_trainer.cli", "finetune_trainer.session", "finetune_trainer.single",
                 "finetune_trainer.tuning", "finetune_trainer.run", "finetune_trainer.sigterm",
                 "finetune_trainer.predict_source")


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ours that `name` imports, at any level (inside functions too: a lazy import
    is still an import, and lazy imports placed just so are how cycles hide)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # `from . import x` / `from .pkg import module` name modules
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {t for t in targets if t in modules and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it():
    """No import cycle in the trainer or the operator, counting imports inside functions: the
    driver's flows (single, tuning, trial) share `driver` and `session`, and none imports another."""
    graph = _graph()
    assert "finetune_trainer.driver" in graph["finetune_trainer.single"]  # the graph sees relative imports
    assert "finetune_trainer.driver" in graph["finetune_trainer.trial"]  # ... and lazy ones
    assert _cycles(graph) == []


def test_only_the_worker_side_imports_torch():
    """The list above is the whole list: a driver module that starts importing torch fails here
    (and so does a worker module that stops, so the list stays true)."""
    importers = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            if roots & HEAVY:
                importers.add(name)
    assert importers == TORCH_MODULES


def test_driver_side_modules_load_no_torch():
    code = ("import importlib, sys\n"
            f"for name in {LIGHT_MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            f"    heavy = sorted(set({sorted(HEAVY)!r}) & set(sys.modules))\n"
            "    if heavy:\n"
            "        print(name, heavy); sys.exit(1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout.strip()} {done.stderr[-1500:]}"


def test_importing_the_driver_changes_no_environment():
    """Environment set-up belongs to the entry points (environment.prepare), not to an import."""
    code = ("import os, json\n"
            "import ray, ray.train, ray.tune  # Ray's own import sets RAY_CLIENT_MODE: not ours to judge\n"
            "before = dict(os.environ)\n"
            "import finetune_trainer.run, finetune_trainer.driver, finetune_trainer.tuning\n"
            "print(json.dumps(sorted(set(os.environ.items()) ^ set(before.items()))))\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_GCS_SERVER_PORT"}}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
