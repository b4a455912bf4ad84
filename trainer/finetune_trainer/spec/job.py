"""The FineTuneJob manifest: the spec as a whole, cross-field rules, loading and `--set`."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator

from .base import SpecError, SpecModel
from .cluster import ClusterSpec, RunPolicySpec
from .exposure import cluster_problems
from .limits import MAX_DEPTH, MAX_MANIFEST_BYTES, MAX_VALUES, json_size_problems, raw_problems
from .model import DataSpec, ModelSpec
from .queueing import queue_problems
from .runtime import MAX_RAY_WORKERS, DeepSpeedSpec, OutputSpec, ResourcesSpec
from .search import SearchSpec
from .space_check import space_problems
from .storage import RESUME_MODES, StorageSpec
from .tracking import TrackingSpec
from .training import MAXIMIZED, EvaluationSpec, FreezingSpec, LRScheduleSpec, TrainingSpec

API_VERSION = "finetune.dev/v1alpha1"
KIND = "FineTuneJob"
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~5x faster
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MERGE = "tag:yaml.org,2002:merge"


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """YAML as Kubernetes reads it. PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string;
    Kubernetes (YAML 1.2/JSON) reads it as a number: resolved as a float here too, so `--set`
    values and untyped fields (deepspeed.config, lrSchedule.options) get the number a cluster
    would see. Unquoted dates stay strings, as kubectl keeps them (JSON has no date)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class FineTuneJobSpec(SpecModel):
    model: ModelSpec
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    freezing: FreezingSpec = Field(default_factory=FreezingSpec)
    lr_schedule: LRScheduleSpec = Field(default_factory=LRScheduleSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    search: SearchSpec | None = Field(default=None, description="Run a Ray Tune search over this spec instead of one training run.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="The Ray cluster KubeRay starts for the job (ignored by local runs).")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Suspension, deadline, retries and clean-up of the run on Kubernetes.")
    storage: StorageSpec | None = Field(default=None, description="S3-compatible storage for checkpoints, the model and results.json; unset: output.dir on this machine.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking: an MLflow server (parameters, metrics by step, artifacts, the registered model) and TensorBoard event files.")

    def ranked_metric(self) -> tuple[str, str]:
        """(reported key, mode) of what picks the best: the search's metric for a search, the
        evaluation's for a single run. One definition, because the trials' reports, Tune, the
        results table and status.json must all rank by the same key in the same direction."""
        ev = self.evaluation
        if self.search is None:
            return f"eval_{ev.metric}", ev.resolved_mode()
        return f"eval_{self.search.resolved_metric(ev.metric)}", self.search.resolved_mode(ev.metric)

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field rules pydantic's per-field checks cannot see, as (yaml path, message)."""
        task = self.model.task
        found: list[tuple[str, str]] = []
        sections = {
            "model": self.model.check(),
            "data": self.data.check(task),
            "freezing": self.freezing.check(),
            "lrSchedule": self.lr_schedule.check(),
            "deepspeed": itertools.chain(self.deepspeed.check(), self.deepspeed.config_problems(self.training.max_grad_norm)),
            "evaluation": self.evaluation.check(task),
            "resources": self.resources.check(),
            "training": self.training.non_finite_problems(self.deepspeed.zero_stage, self.deepspeed.config),
        }
        found += [(f"spec.model.{path}", msg) for path, msg in self.model.quantization_problems(
            strategy=self.freezing.strategy, gpus_per_worker=self.resources.gpus_per_worker, zero_stage=self.deepspeed.zero_stage)]
        for section, problems in sections.items():
            found += [(f"spec.{section}.{path}", msg) for path, msg in problems]
        found += list(self._s3_source_problems())
        found += [(f"spec.model.{path}", msg) for path, msg in self.model.speed_problems(
            gpus_per_worker=self.resources.gpus_per_worker, precision=self.deepspeed.precision, packing=self.data.packing)]
        if self.training.fused_optimizer and self.deepspeed.offload_optimizer:
            found.append(("spec.training.fusedOptimizer", "offloadOptimizer steps with DeepSpeed's own (already fused) CPU Adam: "
                                                          "remove training.fusedOptimizer or deepspeed.offloadOptimizer"))
        cpu = self.resources.gpus_per_worker == 0
        if cpu and self.deepspeed.precision == "fp16":
            found.append(("spec.deepspeed.precision", "fp16 needs GPUs (resources.gpusPerWorker: 1); on CPU use fp32, bf16 or auto"))
        if cpu and self.model.dtype == "float16":
            found.append(("spec.model.dtype", "float16 weights cannot train on CPU; use float32, bfloat16 or auto"))
        # only when the user chose everySteps: the default must not make a short run (maxSteps: 10) invalid
        every_set = "every_steps" in self.evaluation.model_fields_set
        if every_set and self.training.max_steps and self.evaluation.every_steps > self.training.max_steps:
            found.append(("spec.evaluation.everySteps", f"larger than training.maxSteps ({self.training.max_steps}): only the final evaluation would run"))
        if self.freezing.unfreeze_every == "epoch" and self.training.max_steps and self.training.epochs is None:
            found.append(("spec.freezing.unfreezeEvery", "unfreezeEvery: epoch needs training.epochs; with maxSteps give a number of steps"))
        lr, lr_end = self.training.learning_rate, self.lr_schedule.lr_end
        if self.lr_schedule.type == "polynomial" and lr_end is not None and lr_end >= lr:
            # transformers raises on this when the run starts; say it at validation instead
            found.append(("spec.lrSchedule.lrEnd", f"must be below training.learningRate ({lr}): polynomial decays to lrEnd"))
        if self.ray_workers_at_once() > MAX_RAY_WORKERS and self.search is not None:
            found.append(("spec.search.maxConcurrentTrials", (
                f"{self.search.max_concurrent_trials} trials at once x {self.resources.workers} workers each is "
                f"{self.ray_workers_at_once()} Ray Train workers, over {MAX_RAY_WORKERS}; lower it or resources.workers")))
            return found  # the cluster's default size derives from it
        found += [(f"spec.cluster.{path}", msg) for path, msg in self._cluster_problems()]
        if self.search is not None:
            found += self._search_problems(self.search, found)
        return found

    def _search_problems(self, search: SearchSpec, base_problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
        found = [(f"spec.search.{path}", msg) for path, msg in search.check()]
        if self.storage is not None and self.storage.resume not in RESUME_MODES:
            # Tune restores a search as a whole (every trial from its own latest checkpoint); one
            # checkpoint cannot seed it, and quietly restoring the latest search instead would not
            # be what the URI asked for
            found.append(("spec.storage.resume", "a search resumes as a whole: use auto or latest (every trial from "
                                                 "its own latest checkpoint) or never; a checkpoint URI resumes a single run"))
        ev = self.evaluation
        metric = search.resolved_metric(ev.metric)
        if metric not in ev.resolved_metrics(self.model.task):
            found.append(("spec.search.metric", f"{metric} is not evaluated; add it to evaluation.metrics or choose one of {', '.join(ev.resolved_metrics(self.model.task))}"))
        natural = "max" if metric in MAXIMIZED else "min"
        if search.mode is not None and search.mode != natural:
            found.append(("spec.search.mode", f"{metric} improves when it goes {'up' if natural == 'max' else 'down'}: mode must be {natural} (or left out)"))
        if not found and not base_problems:  # trial specs are only worth checking from a valid base
            found += space_problems(search, self)
        return found

    def _s3_source_problems(self) -> Iterator[tuple[str, str]]:
        """An s3:// data file or model is read through spec.storage's endpoint, with the job's own
        credentials (the pods' AWS variables from its Secret), never the operator's: without an S3
        storage section there is neither."""
        if self.storage is not None:
            return
        paths = {f"spec.data.{n}.path": source.path for n in ("train", "validation", "test") if (source := getattr(self.data, n))}
        if self.evaluation.reference is not None:
            paths["spec.evaluation.reference.data.path"] = self.evaluation.reference.data.path
        paths["spec.model.source"] = self.model.source
        for where, path in paths.items():
            if path.startswith("s3://"):
                yield (where, f"{path} is on S3: set spec.storage (its uri, endpoint and credentialsSecret) "
                              "so the job reads it with its own credentials")

    def ray_workers_at_once(self) -> int:
        """Ray Train workers running at the same time: one run's, or those of every concurrent trial."""
        return self.resources.workers * (self.search.max_concurrent_trials if self.search else 1)

    def _cluster_problems(self) -> Iterator[tuple[str, str]]:
        """Only a written cluster section is checked: its defaults derive from spec.resources and fit."""
        if "cluster" not in self.model_fields_set:
            return iter(())
        ds, res = self.deepspeed, self.resources
        hungry = ("deepspeed.offloadParams" if ds.offload_params else "deepspeed.offloadOptimizer" if ds.offload_optimizer
                  else "deepspeed.zeroStage: 3" if ds.zero_stage == 3 else None)
        return self.cluster.check(res.workers, res.cpus_per_worker, res.gpus_per_worker, hungry)


class Metadata(SpecModel):
    model_config = ConfigDict(**{**SpecModel.model_config, "extra": "allow"})  # Kubernetes metadata has many more fields
    name: str = Field(min_length=1, max_length=63)
    namespace: str = Field(default="default")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        # a field check (not a later pass), so it is reported together with every other field problem
        if not _DNS1123.match(name):
            raise ValueError(
                "must be lowercase letters, digits and '-', starting and ending with a letter or digit"
            )
        return name


class FineTuneJob(SpecModel):
    api_version: Literal["finetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: Metadata
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = Field(default=None, description="Written by the operator; ignored here.")

    @property
    def name(self) -> str:
        return self.metadata.name

    def ray_job_metadata(self) -> dict[str, str]:
        """What names a Ray job after this FineTuneJob, for a local Ray's job (driver.init_ray) and a
        RayJob's submission (rayjob.submission_metadata) alike: `job_name` is Ray's own key, the
        Name column of the dashboard's Jobs view; the job page lists all of it."""
        return {"job_name": self.name, "finetune.dev/job": self.name, "finetune.dev/namespace": self.metadata.namespace}


def parse_job(document: dict[str, Any], *, for_cluster: bool = False) -> FineTuneJob:
    """Validate a manifest dict completely: its raw shape (limits.py), fields, then cross-field
    rules. Raises SpecError, and nothing else for any input a YAML or JSON parser can produce.

    `for_cluster`: also the rules of a shared cluster (exposure.py), which a local run needs not."""
    if not isinstance(document, dict):
        raise SpecError([("<manifest>", "expected a mapping with apiVersion, kind, metadata and spec")])
    problems = raw_problems(document)  # first: everything after it may recurse or take time per value
    if not problems and for_cluster:
        problems = json_size_problems(document.get("spec"))
    if problems:
        raise SpecError(problems)
    try:
        # camelCase keys only, as the CRD schema has them: a snake_case key the cluster would
        # reject (or prune to a default) must not pass here
        job = FineTuneJob.model_validate(document, by_alias=True, by_name=False)
    except ValidationError as err:
        raise SpecError.from_validation_error(err) from None
    problems = job.spec.problems()
    if job.spec.storage is not None:  # needs the job's namespace and name: a rule of the whole manifest
        problems += job.spec.storage.resume_problems(job.metadata.namespace, job.name)
    if for_cluster:
        problems += list(cluster_problems(job.spec.storage))
        problems += queue_problems(job.metadata.labels, job.spec.run_policy.suspend)  # Kueue's labels (queueing.py)
    if problems:
        raise SpecError(problems)
    return job


def load_document(path: str | Path) -> dict[str, Any]:
    text = _source_text(path)
    try:
        docs = [d for d in _load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise SpecError([("<manifest>", f"{path}: not valid YAML: {_one_line(err)}")]) from None
    except RecursionError:  # `[[[[...` thousands deep: PyYAML's constructor recurses
        raise SpecError([("<manifest>", f"{path}: nested deeper than {MAX_DEPTH} levels")]) from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(jobs) != 1:
        raise SpecError([("<manifest>", f"{path} must hold exactly one {KIND} document (found {len(jobs)})")])
    problems = raw_problems(jobs[0])  # before --set copies it (recursively)
    if problems:
        raise SpecError(problems)
    return jobs[0]


def _load_all(text: str) -> Iterator[Any]:
    """yaml.load_all, refusing a key written twice in one mapping: YAML says keys are unique, PyYAML
    keeps the last one silently, and kubectl refuses the manifest. Checked on the composed nodes,
    where the key's path and lines are still known."""
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            duplicate = _duplicate_key(node)
            if duplicate:
                raise SpecError([duplicate])
            yield loader.construct_document(node)
    finally:
        loader.dispose()


def _duplicate_key(root: yaml.Node) -> tuple[str, str] | None:
    stack: list[tuple[str, yaml.Node]] = [("", root)]
    visited: set[int] = set()  # an alias is the same node again: walked once
    while stack:
        path, node = stack.pop()
        if len(visited) > MAX_VALUES:  # an alias bomb: raw_problems names it once it is constructed
            break
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key, line = key_node.value, key_node.start_mark.line + 1
                where = f"{path}.{key}" if path else key
                if key in lines:
                    return where, f"duplicate key (lines {lines[key]} and {line}): YAML keeps only one of them; write it once"
                lines[key] = line
                stack.append((where, value_node))
        elif isinstance(node, yaml.SequenceNode):
            stack += [(f"{path}[{i}]", item) for i, item in enumerate(node.value)]
    return None


def _one_line(err: yaml.YAMLError) -> str:
    """PyYAML's message without its multi-line excerpt of the file: the problem and where."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem or err.context} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


class ManifestFileError(SpecError):
    """The file itself cannot be a manifest (missing, a directory, binary, not UTF-8, too large):
    one line naming the file, before any YAML is parsed."""

    def __init__(self, path: str | Path, why: str):
        self.path, self.why = str(path), why
        super().__init__([("<manifest>", f"{path}: {why}")])

    def render(self) -> str:
        return f"{self.path}: {self.why}"


def _source_text(path: str | Path) -> str:
    """A file, or `env:NAME`: the manifest in an environment variable (how the operator's RayJob
    hands the FineTuneJob to the driver, without a ConfigMap or a volume). Its size is checked
    before it is read, so a huge file costs nothing."""
    if isinstance(path, str) and path.startswith("env:"):
        name = path[len("env:") :]
        if name not in os.environ:
            raise SpecError([("<manifest>", f"environment variable {name} is not set")])
        data = os.environ[name].encode("utf-8", "surrogateescape")
    else:
        file = Path(path)
        try:
            if file.is_dir():
                raise ManifestFileError(path, "is a directory, not a manifest file")
            size = file.stat().st_size
            if size > MAX_MANIFEST_BYTES:
                raise ManifestFileError(path, f"{size} bytes, over the {MAX_MANIFEST_BYTES // 1024} KiB a manifest may be")
            data = file.read_bytes()
        except FileNotFoundError:
            raise ManifestFileError(path, "no such file") from None
        except OSError as err:
            raise ManifestFileError(path, f"cannot be read: {err.strerror or err}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestFileError(path, f"{len(data)} bytes, over the {MAX_MANIFEST_BYTES // 1024} KiB a manifest may be")
    nul = data.find(b"\0")
    if nul >= 0:
        raise ManifestFileError(path, f"is a binary file (a NUL byte at offset {nul}), not YAML")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestFileError(path, f"is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") from None


def apply_overrides(document: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set training.maxSteps=20`: dotted paths under spec (or from the top with `spec.`/`metadata.`).

    Values are parsed as YAML scalars, so `true`, `3`, `1e-4` and `[a, b]` get their natural types.
    """
    result = yaml.safe_load(yaml.safe_dump(document))  # deep copy through the same representation
    for item in overrides:
        if "=" not in item:
            raise SpecError([("--set", f"{item!r} is not path=value (e.g. training.maxSteps=20)")])
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if keys[0] not in {"spec", "metadata"}:
            keys.insert(0, "spec")
        node = result
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise SpecError([(path, f"{key} is not a mapping, cannot set {keys[-1]} inside it")])
            node = child
        node[keys[-1]] = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    return result


def load_job(path: str | Path, overrides: list[str] | None = None, *, for_cluster: bool = False) -> FineTuneJob:
    return parse_job(apply_overrides(load_document(path), overrides or []), for_cluster=for_cluster)
