"""The Dockerfile, read without a Docker engine: its stages, users and pinned versions.

A small parser (continuation lines, comments, `FROM ... AS name`) is enough for what is checked:
both targets exist, each final stage runs as a numeric non-root user, the operator image installs
only the operator extra, and the trainer's Ray / DeepSpeed / Python versions are the ones
pyproject.toml and the spec pin.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from finetune_trainer.spec.cluster import DEFAULT_IMAGE, RAY_VERSION

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HEAVY = ("torch", "ray", "deepspeed", "transformers", "cuda")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [a for k, a in self.instructions if k == keyword]


def parse(text: str) -> list[Stage]:
    """Instructions per stage, continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert match, f"cannot read FROM {rest}"
            stages.append(Stage(name=match.group(2) or str(len(stages)), base=match.group(1)))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {s.name: s for s in parse(DOCKERFILE.read_text())}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(pyproject: dict, extra: str, name: str) -> str:
    for item in pyproject["project"]["optional-dependencies"][extra]:
        req = Requirement(item)
        if req.name == name:
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name} in [{extra}] must be pinned with =="
            return spec.version
    raise AssertionError(f"{name} is not in the {extra} extra")


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """A target and the stages it copies from (COPY --from=...), which its image is built of."""
    seen = [stages[name]]
    for stage in seen:
        for arg in stage.args("COPY"):
            match = re.search(r"--from=(\S+)", arg)
            if match and match.group(1) in stages and stages[match.group(1)] not in seen:
                seen.append(stages[match.group(1)])
    return seen


def test_both_targets_exist(stages):
    assert {"operator", "trainer"} <= set(stages)


def test_base_images_are_pinned_by_tag(stages):
    for stage in stages.values():
        if stage.base in stages:
            continue
        image, _, tag = stage.base.rpartition(":")
        assert image and tag and tag != "latest", f"stage {stage.name}: pin {stage.base} to a tag"


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_final_stages_run_as_numeric_non_root_user(stages, target):
    users = stages[target].args("USER")
    assert users, f"{target} sets no USER: it would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{target}: USER {users[-1]} must be a numeric non-root uid (runAsNonRoot needs a number)"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_operator_image_installs_only_the_operator_extra(stages):
    chain = _chain(stages, "operator")
    runs = [arg for stage in chain for arg in stage.args("RUN")]
    installs = [r for r in runs if "pip install" in r]
    assert installs, "the operator image installs nothing"
    for run in installs:
        targets = re.findall(r"""["']?\.\[([^\]]*)\]["']?""", run)
        assert targets == ["operator"], f"the operator image must install .[operator] only: {run}"
    for stage in chain:
        assert not any(word in stage.base for word in HEAVY), stage.base
        for keyword, arg in stage.instructions:
            for word in HEAVY:
                assert not re.search(rf"\b{word}\b", arg, re.IGNORECASE), f"operator stage {stage.name}: {keyword} mentions {word}"


def test_trainer_versions_agree_with_pyproject_and_the_spec(stages, pyproject):
    trainer = stages["trainer"]
    ray = _pin(pyproject, "trainer", "ray")
    deepspeed = _pin(pyproject, "trainer", "deepspeed")
    assert ray == RAY_VERSION, "spec.cluster.rayVersion's default must be the Ray the trainer image has"
    match = re.fullmatch(r"rayproject/ray:([0-9.]+)-py3(\d+)-gpu", trainer.base)
    assert match, f"trainer base {trainer.base}: expected rayproject/ray:<ray>-py3XX-gpu"
    assert match.group(1) == ray, f"trainer base has Ray {match.group(1)}, pyproject pins {ray}"
    installs = " ".join(r for r in trainer.args("RUN") if "pip install" in r)
    assert f"ray[default,train,tune]=={ray}" in installs
    assert f"deepspeed=={deepspeed}" in installs
    assert ".[trainer]" in installs
    assert DEFAULT_IMAGE.rsplit(":", 1)[1] == pyproject["project"]["version"], "the default trainer image is tagged with the project version"


def test_python_versions_satisfy_requires_python(stages, pyproject):
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    found = {}
    for stage in stages.values():
        python = re.fullmatch(r"python:(\d+\.\d+)[-.\w]*", stage.base)
        ray = re.fullmatch(r"rayproject/ray:[0-9.]+-py3(\d+)-\w+", stage.base)
        if python:
            found[stage.name] = python.group(1)
        elif ray:
            found[stage.name] = f"3.{ray.group(1)}"
    assert {"operator", "trainer"} <= set(found)
    for name, version in found.items():
        assert version in requires, f"stage {name} has Python {version}, pyproject requires {requires}"
    assert found["operator"] == found["trainer"], "both images on one Python: the spec models run in both"


def test_dockerignore_keeps_the_context_small():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list: ignore everything, then re-include what the build copies"
    included = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for stage in parse(DOCKERFILE.read_text()):
        for arg in stage.args("COPY"):
            if "--from=" in arg:
                continue
            sources = [w for w in arg.split() if not w.startswith("--")][:-1]
            copied |= {s.rstrip("/") for s in sources}
    assert copied <= included, f"COPY sources the .dockerignore leaves out: {sorted(copied - included)}"


def test_trainer_image_runs_as_the_uid_the_pods_declare(stages):
    """runAsUser/runAsGroup of every Ray pod default to these (pod_security.py); a USER change in the
    Dockerfile without them would run the pods as a user the image's files do not belong to."""
    from finetune_trainer.spec.pod_security import TRAINER_GID, TRAINER_UID

    assert stages["trainer"].args("USER")[-1] == f"{TRAINER_UID}:{TRAINER_GID}"
