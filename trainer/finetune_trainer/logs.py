"""What a run writes besides its evaluation lines: the `finetune_trainer` logger, and third-party
noise silenced where it starts.

Library modules only call `logging.getLogger(__name__)`. The process set-up is the entry points':
`configure(verbose)` and `quiet_third_party(verbose)` in the CLI, `worker_env(verbose, ...)` in the
driver's `runtime_env` (a worker on a cluster inherits nothing from the driver's process) and
`configure_worker()` first in every Ray Train worker. `-v` turns all of it back into the libraries'
defaults and our logger to DEBUG.

What a quiet run silences, and where (each found in the library's own source, versions of 2026-12):
- transformers' "LOAD REPORT" (a warning listing the new head's weights as MISSING: what a
  fine-tune from a body means) and its "Loading weights"/"Writing model shards" tqdm bars
  (`transformers.utils.logging.tqdm`): TRANSFORMERS_VERBOSITY=error and
  HF_HUB_DISABLE_PROGRESS_BARS=1, which transformers and huggingface_hub read at import.
- DeepSpeed's "Setting accelerator to CPU" warning (accelerator/real_accelerator.py), logged by the
  "DeepSpeed" logger while deepspeed is imported. That import resets the logger's level, so a
  filter (which it keeps) holds its records under ERROR back.
- torch's FutureWarning "`all_gather_into_tensor` is deprecated": not our call, DeepSpeed's ZeRO
  (deepspeed/comm/torch.py) makes it on every step's gather.
- Ray's "Token authentication is enabled" notice (_private/authentication/
  authentication_token_setup.py): a warning every new local Ray logs while RAY_AUTH_MODE is
  unset; token mode stays on, the notice is held back by that logger's level.
- Ray's own INFO lines (the local instance's start, Train's worker-group start, every process
  group set-up): `ray_log_level()` for `ray.init(logging_level=...)` and Train's `LoggingConfig`.
- "Actor ... 'PreemptionWatcher' has constructor arguments in the object store and
  max_restarts > 0" (a C++ error line of Ray core, ray-project/ray#53727): Ray Train 2.60's
  PreemptionCallback hands worker actor handles to its watcher actor, which Ray core always warns
  about. Nothing of ours is misconfigured; the watcher polls for drained nodes, and a local Ray
  is one node that nothing drains, so a local run turns the watcher off
  (RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0). On a cluster it keeps watching (the line stays).
- Colour codes around Ray's "(pid=...)" prefixes when stderr is not a terminal: RAY_COLOR_PREFIX=0.
- Ray Data's INFO lines ("Starting execution of Dataset ...", its plan, "execution finished"):
  every process that runs a dataset prints them, the driver's ingest and each worker reading the
  validation split alike. Ray Data (re)configures its logger from RAY_DATA_LOGGING_CONFIG
  at import and again in an actor at each new dataset (ray/data/_internal/logging.py,
  update_dataset_logger_for_worker), so a level set once in a process does not hold; the variable
  does: it names ray_data_logging.yaml (Ray's default with the console at ERROR; the file
  ray-data.log keeps every line). The path is this package's, the same in the driver and the
  workers: one trainer image on a cluster, one environment locally.
- Ray Train's controller warns "`ExecutionOptions.exclude_resources` is deprecated" once per run
  that is given datasets: its own state export (RAY_TRAIN_ENABLE_STATE_TRACKING, on for the
  dashboard) builds `DataConfig.default_ingest_options()`, which passes that deprecated argument
  (ray/train/_internal/data_config.py, Ray 2.60). Not our call: PYTHONWARNINGS in the workers'
  environment ignores DeprecationWarnings raised in that options module (_QUIET_WORKER_ENV).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

LOGGER = "finetune_trainer"
VERBOSE_ENV = "FINETUNE_VERBOSE"  # how the verbosity reaches Ray workers (worker_env)

RAY_DATA_LOGGING_CONFIG = "RAY_DATA_LOGGING_CONFIG"  # read by Ray Data in every process (module docstring)
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    RAY_DATA_LOGGING_CONFIG: str(Path(__file__).with_name("ray_data_logging.yaml")),
}
_QUIET_WORKER_ENV = {  # the Ray workers' only, not this process's (it imported warnings long ago)
    # Ray Train's own state tracking (on for the dashboard) reads a Ray Data option Ray itself has
    # deprecated, in every TrainController: a warning the user can do nothing about. Any -W option
    # also stops ray.util.annotations forcing its "module" filter for RayDeprecationWarning, leaving
    # Python's default (DeprecationWarning shown only in __main__); -v keeps Ray's behaviour
    "PYTHONWARNINGS": "ignore::DeprecationWarning:ray.data._internal.execution.interfaces.execution_options",
}
_QUIET_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",  # the token-mode notice
)
_DEEPSPEED_LOGGER = "DeepSpeed"
_GATHER_WARNING = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
_COLOURS = {logging.DEBUG: "\x1b[2m", logging.WARNING: "\x1b[33m", logging.ERROR: "\x1b[31m", logging.CRITICAL: "\x1b[31m"}


class _Formatter(logging.Formatter):
    """`[finetune] message`; a warning or error says so; -v adds the module; colour only on a TTY."""

    def __init__(self, *, colour: bool, verbose: int) -> None:
        super().__init__()
        self.colour = colour
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING or self.verbose else ""
        where = f" {record.name}" if self.verbose else ""
        line = f"[finetune{where}] {level}{text}"
        code = _COLOURS.get(record.levelno) if self.colour else None
        return f"{code}{line}\x1b[0m" if code else line


class _Handler(logging.StreamHandler):
    """Writes to the given stream, or to whatever sys.stderr is when a record is emitted (so a
    test's captured stderr, replaced after `configure`, still gets it)."""

    def __init__(self, stream: TextIO | None, verbose: int) -> None:
        super().__init__(stream)
        self.fixed = stream
        self.setFormatter(_Formatter(colour=is_terminal(stream or sys.stderr), verbose=verbose))

    def emit(self, record: logging.LogRecord) -> None:
        if self.fixed is None:
            self.stream = sys.stderr
        super().emit(record)


def is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def configure(verbose: int = 0, *, stream: TextIO | None = None) -> logging.Logger:
    """For entry points: the `finetune_trainer` logger at INFO (DEBUG with -v) with one plain
    handler; calling it again replaces that handler. The logger still propagates, so a host's
    own handlers (pytest's caplog) see its records too."""
    logger = logging.getLogger(LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(old)
    logger.addHandler(_Handler(stream, verbose))
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ[VERBOSE_ENV] = str(verbose)  # read by worker_env's caller and by child processes
    return logger


def verbosity() -> int:
    """The verbosity `configure` was given in this process (or its parent's, inherited)."""
    try:
        return int(os.environ.get(VERBOSE_ENV, "0"))
    except ValueError:
        return 0


def quiet_third_party(verbose: int = 0, env: MutableMapping[str, str] | None = None) -> None:
    """For entry points, before transformers, huggingface_hub or Ray is imported: this process's
    share of the silencing in the module docstring. A variable the user set is left as it is.
    -v: nothing is changed, every library at its default. `env`: a mapping to fill instead of this
    process's environment, and then nothing else is changed either."""
    if verbose:
        return
    target = os.environ if env is None else env
    for name, value in _QUIET_ENV.items():
        target.setdefault(name, value)
    if not is_terminal(sys.stderr):
        target.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's driver prints workers' lines with colour codes otherwise
    if env is not None:
        return
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet_loaded_libraries()


def ray_log_level(verbose: int | None = None) -> str:
    """For `ray.init(logging_level=...)` and Ray Train's `LoggingConfig(log_level=...)`."""
    return "INFO" if (verbosity() if verbose is None else verbose) else "WARNING"


def worker_env(verbose: int | None = None, *, local: bool) -> dict[str, str]:
    """Variables for `runtime_env["env_vars"]`: every Ray worker (Train's workers and controller,
    the scoring task) starts with them, so they hold before the worker imports transformers.
    `local`: a Ray this process started (one node: no preemption watcher)."""
    verbose = verbosity() if verbose is None else verbose
    env = {VERBOSE_ENV: str(verbose)}
    if not verbose:
        env |= {name: os.environ.get(name, value) for name, value in (_QUIET_ENV | _QUIET_WORKER_ENV).items()}
        if local:
            env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


def configure_worker(verbose: int | None = None) -> logging.Logger:
    """First thing in a Ray Train worker: our logger at INFO (DEBUG with -v) through our own
    handler instead of Ray Train's plain root handler (whose lines would lack the `[finetune]`
    mark), and this process's share of the silencing."""
    verbose = verbosity() if verbose is None else verbose
    logger = configure(verbose)
    logger.propagate = False
    if not verbose:
        # Ray Train logs every report and checkpoint of every rank at INFO; our rows say the same once
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        # ...including "Reporting training result N: TrainingReport(...)" from a logger Ray names by
        # its file path (getLogger(__file__)), outside the ray.train hierarchy
        train_context = sys.modules.get("ray.train.v2._internal.execution.context")  # private: in a later Ray maybe gone
        if train_context is not None and train_context.__file__:
            logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=_GATHER_WARNING, category=FutureWarning)
        _quiet_loaded_libraries()
        deepspeed = logging.getLogger(_DEEPSPEED_LOGGER)
        if not any(isinstance(f, _BelowError) for f in deepspeed.filters):
            deepspeed.addFilter(_BelowError())
    return logger


class _BelowError(logging.Filter):
    """Drops a record under ERROR: DeepSpeed sets its logger's level itself when imported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _quiet_loaded_libraries() -> None:
    """The environment above is read at import: a library this process has imported already is
    told directly. Looked up, not imported: this module loads neither (test_architecture)."""
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    hub_utils = sys.modules.get("huggingface_hub.utils")
    if hub_utils is not None:
        hub_utils.disable_progress_bars()


def quiet_ray_data() -> None:
    """For the driver once it has imported Ray Data (ingest.py): without -v, Ray Data's console
    lines (each execution's plan, start and finish at INFO, its warnings about its own settings)
    are held back as ray_data_logging.yaml holds them back in the workers; they still go to Ray's
    ray-data.log. Needed where Ray Data was imported before `quiet_third_party` set
    RAY_DATA_LOGGING_CONFIG (an in-process caller): it reads the variable when imported."""
    if verbosity():
        return
    for handler in logging.getLogger("ray.data").handlers:
        # Ray's own console handler only: a host's handlers can sit on this logger too (pytest's
        # session-wide capture handlers did, and at ERROR every later test's caplog went deaf)
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and type(handler).__module__.startswith("ray."):
            handler.setLevel(logging.ERROR)


def world_rank() -> int:
    """This process's Ray Train world rank; 0 anywhere else (the driver, a Ray task)."""
    if "ray.train" not in sys.modules:  # nothing imported Ray Train: not one of its workers
        return 0
    import ray.train

    try:
        return int(ray.train.get_context().get_world_rank())
    except RuntimeError:  # Ray Train's context exists only inside a training worker
        return 0


class _RankZero(logging.LoggerAdapter):
    def isEnabledFor(self, level: int) -> bool:
        return self.logger.isEnabledFor(level) and world_rank() == 0

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs


def rank_zero(logger: logging.Logger) -> logging.LoggerAdapter:
    """`logger`, but only Ray Train's world rank 0 logs through it: a line every worker would
    write the same is written once."""
    return _RankZero(logger, {})
