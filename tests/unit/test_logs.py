"""The `finetune_trainer` logger's set-up and what a quiet run hands its Ray workers (logs.py).
What a whole run writes into a pipe: tests/integration/test_quiet_output.py."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from finetune_trainer import logs


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logger(monkeypatch):
    """The package logger as it was before the test: level, handlers and the verbosity variable."""
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    package = logging.getLogger(logs.LOGGER)
    level, handlers = package.level, list(package.handlers)
    yield package
    package.handlers[:] = handlers
    package.setLevel(level)


def test_configure_writes_plain_lines_and_replaces_its_handler(logger):
    first, second = io.StringIO(), io.StringIO()
    logs.configure(0, stream=first)
    logs.configure(0, stream=second)
    child = logging.getLogger("finetune_trainer.persist")
    child.info("resume: from %s", "s3://b/k")
    child.warning("not resuming from %s", "k")
    child.debug("hidden")
    assert first.getvalue() == ""
    assert second.getvalue() == "[finetune] resume: from s3://b/k\n[finetune] warning: not resuming from k\n"
    assert logger.level == logging.INFO


def test_verbose_logs_debug_with_the_module_and_reaches_child_processes(logger):
    stream = io.StringIO()
    logs.configure(2, stream=stream)
    logging.getLogger("finetune_trainer.tuning").debug("slots %d", 3)
    assert stream.getvalue() == "[finetune finetune_trainer.tuning] debug: slots 3\n"
    assert logs.verbosity() == 2 and logs.ray_log_level() == "INFO"


def test_colour_only_on_a_terminal(logger):
    pipe, terminal = io.StringIO(), _Terminal()
    for stream in (pipe, terminal):
        logs.configure(0, stream=stream)
        logging.getLogger("finetune_trainer.x").warning("careful")
    assert "\x1b" not in pipe.getvalue()
    assert terminal.getvalue().startswith("\x1b[33m[finetune] warning: careful")


def test_without_a_stream_it_writes_to_stderr_as_it_is_when_logging(logger, capsys):
    logs.configure(0)
    capsys.readouterr()
    logging.getLogger("finetune_trainer.x").info("now")
    assert capsys.readouterr().err == "[finetune] now\n"


def test_a_quiet_local_run_hands_its_workers_the_quiet_environment(logger, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")  # the user's choice wins
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv(logs.RAY_DATA_LOGGING_CONFIG, raising=False)
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    assert logs.worker_env(0, local=True) == {
        logs.VERBOSE_ENV: "0", "TRANSFORMERS_VERBOSITY": "info", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        logs.RAY_DATA_LOGGING_CONFIG: str(Path(logs.__file__).with_name("ray_data_logging.yaml")),
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "PYTHONWARNINGS": "ignore::DeprecationWarning:ray.data._internal.execution.interfaces.execution_options",
    }
    # a cluster's nodes can be drained: its preemption watcher stays
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in logs.worker_env(0, local=False)
    # -v: every library at its default, and the verbosity itself
    assert logs.worker_env(1, local=True) == {logs.VERBOSE_ENV: "1"}
    assert logs.ray_log_level(0) == "WARNING" and logs.ray_log_level(1) == "INFO"


def test_the_workers_get_the_verbosity_the_entry_point_configured(logger):
    logs.configure(1, stream=io.StringIO())
    assert logs.worker_env(local=True) == {logs.VERBOSE_ENV: "1"}
    logs.configure(0, stream=io.StringIO())
    assert logs.worker_env(local=True)[logs.VERBOSE_ENV] == "0"


def test_quiet_third_party_leaves_what_the_user_set_and_verbose_changes_nothing(capsys):
    env = {"TRANSFORMERS_VERBOSITY": "debug"}
    logs.quiet_third_party(1, env)
    assert env == {"TRANSFORMERS_VERBOSITY": "debug"}
    logs.quiet_third_party(0, env)
    assert env == {"TRANSFORMERS_VERBOSITY": "debug", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   logs.RAY_DATA_LOGGING_CONFIG: str(Path(logs.__file__).with_name("ray_data_logging.yaml")),
                   "RAY_COLOR_PREFIX": "0"}  # pytest's stderr is not a terminal


def test_ray_datas_own_configuration_reads_the_quiet_config_console_at_warning_file_keeps_all(monkeypatch):
    """What every Ray process of a quiet run does with RAY_DATA_LOGGING_CONFIG (Ray Data's own
    configure_logging, which its actors call again for each new dataset): the console handler
    lets no INFO or WARNING line through, the ray-data.log handler takes them all."""
    from ray.data._internal import logging as ray_data_logging

    def reconfigure() -> None:
        # configure_logging replaces the handlers without closing them; after a Ray session in this
        # process (an ingest earlier in the run), its file handler holds that session's ray-data.log open
        for handler in logging.getLogger("ray.data").handlers:
            handler.close()
        ray_data_logging.configure_logging()

    monkeypatch.setenv(logs.RAY_DATA_LOGGING_CONFIG, logs.worker_env(0, local=True)[logs.RAY_DATA_LOGGING_CONFIG])
    try:
        reconfigure()
        logger = logging.getLogger("ray.data")
        handlers = {h.name: h for h in logger.handlers}
        assert set(handlers) == {"file", "console"}
        info = logging.LogRecord("ray.data", logging.INFO, __file__, 1, "Starting execution of Dataset train_epoch_0", None, None)
        assert logger.isEnabledFor(logging.DEBUG)
        assert info.levelno < handlers["console"].level == logging.ERROR
        assert handlers["file"].level <= logging.DEBUG  # ray-data.log keeps every line
        assert isinstance(handlers["file"], ray_data_logging.SessionFileHandler)
    finally:
        monkeypatch.delenv(logs.RAY_DATA_LOGGING_CONFIG)
        reconfigure()  # Ray's default again for the tests after this one
    assert {h.name: h.level for h in logging.getLogger("ray.data").handlers}["console"] == logging.INFO


def test_rank_zero_logs_outside_a_training_worker(logger):
    stream = io.StringIO()
    logs.configure(0, stream=stream)
    logs.rank_zero(logging.getLogger("finetune_trainer.recipe")).info("step %d: unfroze %s", 3, "layer.1")
    assert logs.world_rank() == 0
    assert stream.getvalue() == "[finetune] step 3: unfroze layer.1\n"


def test_quiet_ray_data_holds_back_only_ray_s_own_console_handler(monkeypatch):
    """A host's handler on the ray.data logger keeps its level: pytest's session-wide capture
    handlers sat there, and set to ERROR they left every later test's caplog empty."""
    from ray._private.log import PlainRayHandler

    logger = logging.getLogger("ray.data")
    ray_console, host = PlainRayHandler(), logging.StreamHandler(io.StringIO())
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")
    logger.addHandler(ray_console)
    logger.addHandler(host)
    try:
        logs.quiet_ray_data()
        assert ray_console.level == logging.ERROR
        assert host.level == logging.NOTSET
    finally:
        logger.removeHandler(ray_console)
        logger.removeHandler(host)
