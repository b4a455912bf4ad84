"""What `finetune predict` reads: the inputs, and the exported model a run left (local or s3://).

Torch-free (the CLI fails on a wrong path, a missing model or a binary input file within a second,
before torch and transformers are imported). `predict` loads what `locate` finds.

Nothing from the model folder is executed: only the files transformers and PEFT read as data are
fetched from S3 (JSON, safetensors, tokenizer vocabularies, Jinja chat templates), weights must be
safetensors (a pickled `.bin` is refused, not loaded), and the model's own Python code runs only
with `--trust-remote-code` (predict.py). results.json, written by the job, is read as JSON data.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .persist import ADAPTER_DIR, MODEL_DIR, RESULTS_FILE
from .spec import FineTuneJobSpec, StorageSpec

log = logging.getLogger(__name__)

MAX_INPUTS = 256  # texts per call: predict is for trying a model, not batch inference
MAX_TEXT_CHARS = 32_000  # one input; the model sees at most the run's maxSeqLength tokens of it anyway
MAX_FILE_BYTES = 4 << 20
MAX_RESULTS_BYTES = 64 << 20  # results.json of a long search is a few MB
# What transformers, tokenizers and PEFT read as data; anything else in an S3 model folder
# (*.py, *.bin, *.pt, *.pkl) is not fetched, so it cannot be loaded or run.
FETCHED_SUFFIXES = (".json", ".safetensors", ".txt", ".jinja", ".model", ".tiktoken")
HINT = ("give a run's folder (the one holding results.json and model/: `finetune run` prints it) or an exported "
        "model folder, local or s3://bucket/...")


class PredictError(ValueError):
    """What is wrong and the fix, in one line; the CLI prints it and exits 2."""


@dataclass
class Source:
    """A located model: `model_dir` holds config.json + safetensors (a full or merged model), or
    only `adapter` (an adapter-only export, loaded onto `base`)."""

    model_dir: Path
    results: dict[str, Any] = field(default_factory=dict)  # the run's results.json; {} for a bare model folder
    adapter: Path | None = None
    full: bool = True  # model_dir has its own config.json and weights

    def spec(self) -> FineTuneJobSpec | None:
        """The run's spec (task, chat template, maxSeqLength, samples settings), if results.json has one
        this version understands."""
        raw = (self.results.get("config") or {}).get("spec")
        if not isinstance(raw, dict):
            return None
        try:
            return FineTuneJobSpec.model_validate(raw)
        except ValueError as err:
            log.warning("results.json's config.spec does not validate (%s); using the model folder's own settings",
                        str(err).splitlines()[0])
            return None


def read_inputs(texts: list[str] | None, file: str | None) -> list[str]:
    """--text (repeatable) or --file (one input per line, blank lines skipped), bounded."""
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise PredictError(f"--file {file}: {'is a folder' if path.is_dir() else 'no such file'}; give a UTF-8 text file, one input per line")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise PredictError(f"--file {file}: {path.stat().st_size} bytes, above {MAX_FILE_BYTES}; give at most "
                               f"{MAX_INPUTS} inputs of at most {MAX_TEXT_CHARS} characters")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        if (not text and raw) or "\x00" in text:
            raise PredictError(f"--file {file}: not a text file (binary, or not UTF-8); give a UTF-8 text file, one input per line")
        texts = [line for line in text.splitlines() if line.strip()]
    texts = list(texts or [])
    if not texts:
        raise PredictError("nothing to predict: give --text TEXT (repeatable) or --file FILE (one input per line)")
    if len(texts) > MAX_INPUTS:
        raise PredictError(f"{len(texts)} inputs, above {MAX_INPUTS}; split them over several calls")
    for i, text in enumerate(texts, 1):
        if len(text) > MAX_TEXT_CHARS:
            raise PredictError(f"input {i}: {len(text)} characters, above {MAX_TEXT_CHARS}; shorten it")
    return texts


def locate(target: str, *, workdir: Path, storage: StorageSpec | None = None) -> Source:
    """The model `target` names: a run folder or a model folder, local or under s3:// (fetched into
    `workdir` through `storage`'s endpoint settings, credentials from the environment)."""
    if target.startswith("s3://"):
        target = str(fetch(target, workdir, storage))
    path = Path(target).expanduser()
    if not path.exists():
        raise PredictError(f"{target}: no such folder; {HINT}")
    if not path.is_dir():
        raise PredictError(f"{target}: is a file, not a folder; {HINT}")
    results: dict[str, Any] = {}
    if (path / RESULTS_FILE).is_file():
        results = _read_results(path / RESULTS_FILE)
        model_dir = path / MODEL_DIR
        if not model_dir.is_dir():
            raise PredictError(f"{target}: the run exported no model (no {MODEL_DIR}/ beside results.json: spec.output.export "
                               "none, or no evaluation had a finite metric); rerun with spec.output.export: best")
    else:
        model_dir = path
        if (path.parent / RESULTS_FILE).is_file():  # the run's model/ given directly
            results = _read_results(path.parent / RESULTS_FILE)
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        adapter: Path | None = model_dir  # the adapter folder itself
    else:
        adapter = model_dir / ADAPTER_DIR if (model_dir / ADAPTER_DIR / "adapter_config.json").is_file() else None
    full = (model_dir / "config.json").is_file()
    if not full and adapter is None:
        raise PredictError(f"{target}: no model in {model_dir} (neither config.json nor {ADAPTER_DIR}/adapter_config.json); {HINT}")
    if full and not any(model_dir.glob("*.safetensors")):
        raise PredictError(f"{model_dir}: no *.safetensors weights (pickled .bin weights are never loaded); save the model "
                           "with transformers' save_pretrained, which writes safetensors")
    if not full and adapter is not None and not (adapter / "adapter_model.safetensors").is_file():
        raise PredictError(f"{adapter}: no adapter_model.safetensors (a pickled adapter_model.bin is never loaded); save it "
                           "with PEFT's save_pretrained, which writes safetensors")
    return Source(model_dir, results, adapter, full)


def _read_results(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_RESULTS_BYTES:
        raise PredictError(f"{path}: {path.stat().st_size} bytes, too large for a results.json; give the model/ folder instead")
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise PredictError(f"{path}: not JSON ({str(err).splitlines()[0][:120]}); give the model/ folder instead") from None
    return loaded if isinstance(loaded, dict) else {}


def fetch(uri: str, workdir: Path, storage: StorageSpec | None) -> Path:
    """The run (results.json + model/) or model folder under `uri`, copied into `workdir`; only
    FETCHED_SUFFIXES files. `storage`: the job's spec.storage (endpoint, region, addressing, TLS),
    else AWS S3 or the endpoint in AWS_ENDPOINT_URL. Storage problems come out as StorageError."""
    from .storage import S3Store
    from .storage.s3 import S3Location

    location = S3Location.parse(uri.rstrip("/"))
    spec = (storage or StorageSpec(uri=location.uri)).model_copy(update={"uri": location.uri})
    store = S3Store(spec)
    objects = store.list(location.key)
    if wanted_run(objects, location.key):  # a run: results.json and its model only
        wanted = [k for k in objects if k == f"{location.key}/{RESULTS_FILE}" or k.startswith(f"{location.key}/{MODEL_DIR}/")]
    else:
        wanted = list(objects)
    prefix = f"{location.key}/" if location.key else ""
    # a key is a path below the fetch folder: no empty, "." or ".." segment (a//b would be absolute there)
    fetched = [k for k in wanted if k.endswith(FETCHED_SUFFIXES) and all(p not in {"", ".", ".."} for p in k[len(prefix):].split("/"))]
    if not fetched:
        raise PredictError(f"{uri}: no model files there (results.json, config.json, *.safetensors); {HINT}")
    skipped = len(wanted) - len(fetched)
    if skipped:
        log.info("%s: %d file(s) not fetched (not weights, config or tokenizer data: code and pickles are never read)", uri, skipped)
    root = workdir / "fetched"
    parent, _, last = location.key.rpartition("/")
    if last == MODEL_DIR and not wanted_run(objects, location.key):  # a run's model/: its results.json says task and template
        results = store.read(f"{parent}/{RESULTS_FILE}") if parent else None
        if results is not None:
            (root / MODEL_DIR).mkdir(parents=True)
            (root / RESULTS_FILE).write_bytes(results)
            root = root / MODEL_DIR
    for key in fetched:
        data = store.read(key)
        if data is None:
            continue  # deleted between the listing and the read
        target = root / key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    log.info("fetched %d file(s) from %s", len(fetched), uri)
    return root


def wanted_run(objects: dict[str, Any], key: str) -> bool:
    """Whether the S3 folder `key` is a run's (it holds results.json)."""
    return bool(key) and f"{key}/{RESULTS_FILE}" in objects
