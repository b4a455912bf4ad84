"""Shared test set-up: everything stays on loopback and offline, Ray is started once per session.

Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when first imported, so it is set here before any
test module can import Ray: the local Ray then advertises 127.0.0.1 and torch.distributed's
rendezvous (gloo, pinned to `lo`) never leaves the machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
