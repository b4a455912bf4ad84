"""Shared test set-up: everything stays on loopback and offline, Ray is started once per session.

The test session is an entry point like `finetune run`: it prepares the process environment
(finetune_trainer.environment) before any test module can import Ray, so the local Ray advertises
127.0.0.1, torch.distributed's rendezvous (gloo, pinned to `lo`) never leaves the machine, and the
session's Ray has a GCS port of its own.
"""

from __future__ import annotations

import os

from finetune_trainer import environment

environment.prepare()
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
