"""`finetune`: validate and run FineTuneJob manifests on this machine, and try the model a run exported.

Library errors become one clear message and a non-zero exit, never a stack trace for bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import environment, logs
from .embedded_s3 import EmbeddedS3Error
from .predict_source import MAX_INPUTS, PredictError
from .spec import ManifestFileError, SpecError, load_job
from .spec.cluster import RUN_ID_ENV
from .storage.errors import AccessDenied, BucketMissing, EndpointUnreachable, StorageError

EXIT_INVALID = 2
EXIT_FAILED = 1
EMBEDDED_URI = "s3://finetune/runs"

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    environment.prepare()  # before anything imports Ray (environment's docstring)
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("validate", "check a manifest: fields, then data and model fit"), ("run", "run a manifest on local Ray (or the cluster in RAY_ADDRESS)"),
                             ("preview", "print the first training examples exactly as tokenized, trained tokens marked")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("manifest", help="FineTuneJob YAML")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                       help="override a spec field, e.g. --set training.maxSteps=20 (repeatable)")
        p.add_argument("-v", "--verbose", action="count", default=0,
                       help="debug logs, and Ray, transformers and DeepSpeed at their own (noisy) defaults")
    sub.choices["validate"].add_argument("--static", action="store_true", help="fields only; do not read the model or data")
    sub.choices["preview"].add_argument("-n", dest="examples", type=_positive, default=3, metavar="N",
                                        help="how many training examples (default 3)")
    _predict_parser(sub)
    run_parser = sub.choices["run"]
    run_parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run_parser.add_argument("--resume", action="store_true",
                            help="continue from the job's latest complete checkpoint (a search: restore its latest Tune experiment)")
    run_parser.add_argument("--run-id", default=os.environ.get(RUN_ID_ENV) or None, metavar="RUN",
                            help="the run's folder name; with spec.storage.resume auto (the default) an existing run "
                                 f"of that name continues from its latest complete checkpoint (default: ${RUN_ID_ENV}, "
                                 "else a new run-<time>)")
    run_parser.add_argument("--embedded-s3", action="store_true",
                            help=f"start a local S3 server (SeaweedFS, data in <output.dir>/.s3) for this run; "
                                 f"spec.storage defaults to {EMBEDDED_URI}")
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    logs.quiet_third_party(args.verbose)  # before transformers or Ray is imported (logs' docstring)
    try:
        # validate checks a manifest as the operator will; a local run may use this machine's addresses
        if args.command == "predict":
            return _predict(args)
        job = load_job(args.manifest, args.overrides, for_cluster=args.command == "validate")
        if args.command == "validate":
            return _validate(job, static=args.static)
        if args.command == "preview":
            return _preview(job, args.examples)
        resume = "latest" if args.resume else None
        if args.embedded_s3:
            return _run_with_embedded_s3(job, progress=not args.no_progress, resume=resume, run_id=args.run_id)
        return _run(job, progress=not args.no_progress, resume=resume, run_id=args.run_id)
    except StorageError as err:  # the preflight's verdict (or a failed embedded server): what to fix, one line
        print(f"finetune: storage: {err}", file=sys.stderr)
        return EXIT_INVALID if isinstance(err, (AccessDenied, BucketMissing, EndpointUnreachable)) else EXIT_FAILED
    except EmbeddedS3Error as err:
        print(f"finetune: --embedded-s3: {err}", file=sys.stderr)
        return EXIT_FAILED
    except ManifestFileError as err:  # the file itself (a directory, binary, not UTF-8, too large): one line
        print(f"finetune: {err.render()}", file=sys.stderr)
        return EXIT_INVALID
    except SpecError as err:
        print(f"finetune: {args.manifest} is invalid\n{err.render()}", file=sys.stderr)
        return EXIT_INVALID
    except FileNotFoundError as err:
        print(f"finetune: {err}", file=sys.stderr)
        return EXIT_INVALID
    except PredictError as err:  # a wrong path, no model, an input that is not text: what to fix
        print(f"finetune: predict: {err}", file=sys.stderr)
        return EXIT_INVALID


def _validate(job, *, static: bool) -> int:
    from .report import say

    if not static:
        from .data_checks import summary
        from .preflight import prepare_job

        prepared = prepare_job(job)  # the first rows of every file, the model and the freezing plan: seconds
        stats = _full_counts(job)
        t = job.spec.training  # the plan again on the epoch's length (packing would make fewer, longer rows than counted)
        prepared.plan = prepared.plan_for(job.spec.freezing, t.steps_per_epoch(stats["table_rows"]["train"], job.spec.resources.workers))
        say(f"data: {stats['table_rows']} rows")
        if job.spec.model.task == "causal-lm":
            from .preview import describe

            say(f"  examples: {describe(job)} (finetune preview shows them)")
        for line in summary(stats):
            say(f"  {line}")
        say(f"model: {prepared.model_class} from {prepared.model_dir}")
        say(f"freezing: {prepared.plan.summary()}")
    search = job.spec.search
    if search is not None:
        ev = job.spec.evaluation
        say(f"search: {search.resolved_num_trials()} trials, {search.algorithm}, scheduler {search.scheduler.type}, "
            f"best by {search.resolved_metric(ev.metric)} ({search.resolved_mode(ev.metric)}), up to {search.max_concurrent_trials} at a time")
        for path, dist in search.space.items():
            say(f"  {path}: {dist.kind} {getattr(dist, dist.kind)}")
    say(f"{job.name}: valid")
    return 0


def _full_counts(job) -> dict:
    """The whole data's counts and refusals as a run's ingest makes them (ingest.count: read,
    cleaned, shuffled, carved and capped on Ray Data, streamed; nothing tokenized), on a local Ray
    or the cluster in RAY_ADDRESS. The data checks' warnings come through the logger."""
    from . import data_checks
    from .data import DataError
    from .driver import init_ray
    from .ingest import count

    spec = job.spec
    init_ray(job.ray_job_metadata())
    try:
        stats = count(spec.data, spec.model.task, spec.training.seed, storage=spec.storage, num_labels=spec.model.num_labels)
    except DataError as err:
        raise err.as_spec_error() from None
    data_checks.warn(stats)
    return stats


def _preview(job, examples: int) -> int:
    from . import preview
    from .report import say

    shown = preview.load(job, examples)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    for line in preview.lines(shown, job.spec.data.max_seq_length, color=bool(color)):
        say(line)
    return 0


def _predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="try an exported model: a classifier's class and probabilities, or a causal LM's generations",
                       description="Load the model a run exported (safetensors only; the model's own code only with "
                                   "--trust-remote-code) and print, for each input, the class and every class's probability, "
                                   "or what the model writes, prompted through the run's chat template.")
    p.add_argument("target", metavar="RUN_DIR_OR_MODEL",
                   help="a run's folder (results.json + model/), or an exported model folder; local or s3://bucket/...")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", action="append", metavar="TEXT", help="an input (repeatable)")
    given.add_argument("--file", metavar="FILE", help=f"a UTF-8 text file, one input per line (at most {MAX_INPUTS})")
    p.add_argument("-m", "--manifest", metavar="JOB_YAML",
                   help="for s3://: the FineTuneJob whose spec.storage says how to reach the bucket (endpoint, region, "
                        "addressing); credentials come from the environment (AWS_ACCESS_KEY_ID, ...)")
    p.add_argument("--base", metavar="MODEL_DIR", help="an adapter-only export's base model (default: the run's spec.model.source)")
    p.add_argument("--max-new-tokens", type=_bounded(int, 1, 1024), metavar="N", help="causal LM (default: spec.evaluation.samples, else 64)")
    p.add_argument("--temperature", type=_bounded(float, 0.0, 5.0), metavar="T", help="causal LM: 0 greedy (default: the run's samples setting)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder's own Python code run (off whatever the run's spec says: only for code you trust)")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug logs")
    p.set_defaults(overrides=[])


def _predict(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from .predict_source import locate, read_inputs
    from .report import say

    texts = read_inputs(args.text, args.file)
    storage = None
    if args.manifest:
        storage = load_job(args.manifest, []).spec.storage
        if storage is None and args.target.startswith("s3://"):
            raise PredictError(f"--manifest {args.manifest} has no spec.storage; give the job that wrote {args.target}")
    with tempfile.TemporaryDirectory(prefix="finetune-predict-") as work:
        source = locate(args.target, workdir=Path(work), storage=storage)
        from . import predict  # torch and transformers: only once the target is known to hold a model

        loaded = predict.load(source, base=args.base, trust_remote_code=args.trust_remote_code)
        if loaded.task == "sequence-classification":
            rows = predict.classify(loaded, texts)
            lines = [f"{r['label']}  ({', '.join(f'{k} {v:.3f}' for k, v in r['probabilities'].items())})  {r['text'][:80]}" for r in rows]
        else:
            rows = predict.generate(loaded, texts, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
            lines = [f"> {r['text']}\n{r['completion']}\n" for r in rows]
    for row, line in zip(rows, lines, strict=True):
        say(json.dumps(row, ensure_ascii=False) if args.json else line)
    return 0


def _bounded(kind: type, low: float, high: float):
    def parse(text: str):
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value}: give {low} to {high}")
        return value

    return parse


def _positive(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{value}: give 1 to 1000 examples")
    return value


def _run_with_embedded_s3(job, *, progress: bool, resume: str | None, run_id: str | None = None) -> int:
    """A real S3 endpoint on loopback for this run only: the data stays in <output.dir>/.s3, so a
    later `--embedded-s3 --resume` finds the checkpoints again."""
    from .embedded_s3 import embedded_s3
    from .spec.storage import StorageSpec

    storage = job.spec.storage or StorageSpec(uri=EMBEDDED_URI)
    with embedded_s3(bucket=storage.bucket, data_dir=Path(job.spec.output.dir) / ".s3") as s3:
        os.environ.update(s3.env())  # read by this process and by the local Ray it starts next (workers inherit it)
        storage = storage.model_copy(update={"endpoint": s3.endpoint, "region": s3.region, "addressing": "path"})
        log.info("embedded S3 at %s: %s", s3.endpoint, storage.uri)
        return _run(job.model_copy(update={"spec": job.spec.model_copy(update={"storage": storage})}), progress=progress, resume=resume,
                    run_id=run_id)


def _run(job, *, progress: bool, resume: str | None = None, run_id: str | None = None) -> int:
    from .report import LiveProgress, print_search_summary, print_summary
    from .run import run

    live = LiveProgress() if progress else None
    try:
        result = run(job, on_progress=live.update if live else _print_rows(), resume=resume, run_id=run_id)
    except (SpecError, StorageError):
        if live:
            live.stop()
        raise
    except Exception as err:  # Ray wraps worker errors; show the cause, not the wrapper's trace
        if live:
            live.stop()
        print(f"finetune: run failed: {_root_cause(err)}", file=sys.stderr)
        return EXIT_FAILED
    if live:
        live.stop()
    (print_search_summary if result.results.get("kind") == "search" else print_summary)(result.results, result.run_dir)
    return 0


def _print_rows():
    seen: list[int] = [0]

    def show(_latest: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        from .report import format_row, say

        for row in rows[seen[0] :]:
            say(format_row(row))
        seen[0] = len(rows)

    return show


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
