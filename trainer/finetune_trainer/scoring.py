"""Scoring whole models on the test split after training, outside DeepSpeed.

Runs as one Ray task with a worker's resources, so in a cluster it lands where a GPU is. It
also proves the exported folder reloads as a plain Hugging Face model (for an adapter: the merged
model, or with output.mergeAdapter false the base with the exported adapter loaded by PEFT).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapters import load_adapted
from .class_report import CONFUSION_KEY
from .evaluation import evaluate
from .modeling import load_model
from .persist import ADAPTER_DIR
from .remote_model import on_this_node
from .spec import FineTuneJob

if TYPE_CHECKING:
    import ray.data


def score_models(job_doc: dict[str, Any], models: dict[str, str], test_dataset: ray.data.Dataset, label_names: list[str] | None,
                 pad_token_id: int) -> dict[str, dict[str, Any]]:
    from .batches import gather

    test = gather(test_dataset.iter_batches(batch_format="numpy"))
    job = FineTuneJob.model_validate(job_doc)
    spec = job.spec
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    num_labels = len(label_names) if label_names else None
    wanted = set(spec.evaluation.resolved_metrics(spec.model.task)) | {"loss"}
    # the baseline is the driver's path to the model: an s3:// one's copy on this node (remote_model.py)
    if "baseline" in models:
        models = {**models, "baseline": on_this_node(models["baseline"], spec.model.source, spec.storage)}
    scores: dict[str, dict[str, Any]] = {}
    for name, folder in models.items():
        torch.manual_seed(spec.training.seed)  # the baseline's new head: the same one training started from
        adapter = Path(folder) / ADAPTER_DIR
        if name != "baseline" and adapter.is_dir() and not (Path(folder) / "config.json").is_file():  # not merged
            model = load_adapted(models["baseline"], adapter, spec, num_labels=num_labels, pad_token_id=pad_token_id).to(device)
        else:
            model = load_model(folder, spec.model, num_labels=num_labels, dropout=None, pad_token_id=pad_token_id).to(device)
        metrics = evaluate(
            model, test, task=spec.model.task, batch_size=spec.training.per_device_batch_size * 2,
            pad_token_id=pad_token_id, device=device, num_labels=num_labels,
        )
        scores[name] = {k: v for k, v in metrics.items() if k in wanted or k == CONFUSION_KEY}  # the matrix: class_report
        del model
    return scores
