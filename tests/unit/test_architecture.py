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
