"""A Ray Train worker's training-stack imports, begun when its process starts (issue 19: trial start-up).

Ray Train starts a new worker group at every fit: every run, and every start and resume of a
search trial, gets fresh worker processes that import torch, transformers (with PEFT, which its
`trainer_utils` pulls in) and DeepSpeed: ~3.3 CPU-s each on the 2-core machine
(bench/trial_startup.py's `imports_s`), and ~1 s more inside `deepspeed.initialize` (below). Left to Ray Train, a worker imports torch when it receives
the run's context and the rest when our train function imports the recipe, each in its main thread
and only once Ray Train's set-up reaches that point; in between, the worker mostly waits on the
controller's round trips (actor creation, metadata, train context, process group, launch).

`start` runs as Ray's worker process setup hook, which `driver.make_trainer` sets for the Train
workers alone (RunConfig.worker_runtime_env; not the trials' actors, which stay light: trial.py):
it begins those imports in a thread the moment the process is up, so they run during that
waiting. The main thread's own imports then find the modules loaded, or wait on Python's
per-module import lock for the thread to finish one. The thread imports third-party modules
only, none of which imports Ray or this package: it never waits on a module the main thread is
importing, so no import-lock cycle can form. What fails here fails again, with its own error,
where the recipe imports it.
"""

from __future__ import annotations

import logging
import threading
import time

from . import logs

log = logging.getLogger(__name__)

HOOK = f"{__name__}.start"  # what Ray imports and calls in a Train worker's process, at its start


def start() -> None:
    """The worker's logging first (the thread's DeepSpeed import logs as the recipe's would be
    logged: held back in a quiet run), then the imports, in the background."""
    logs.configure_worker()
    threading.Thread(target=_import_training_stack, name="finetune-warm-imports", daemon=True).start()


def _import_training_stack() -> None:
    started = time.perf_counter()
    try:
        # The names are unused: importing is the point (the modules stay in sys.modules). DeepSpeed
        # imports torch first. deepspeed.initialize imports DeepSpeed's Muon optimizer for a type
        # check whatever the optimizer (zero/utils.py: is_zero_supported_optimizer), and that
        # module's torch.compile decorators import torch._dynamo and torch._inductor: 1.2 s of
        # initialize's 1.5 s in one process on the 2-core machine. get_scheduler's module,
        # transformers.optimization, imports trainer_utils and with it PEFT.
        import deepspeed
        import deepspeed.runtime.zero.muon.muon_optimizer
        import torch.distributed
        import transformers.modeling_utils
        import transformers.optimization
        import transformers.pytorch_utils

        del deepspeed, torch, transformers
    except Exception as err:  # the recipe's own import of the same module reports it
        log.debug("warm imports stopped: %s", err)
        return
    log.debug("warm imports done in %.2f s", time.perf_counter() - started)
