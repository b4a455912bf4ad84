"""Checkpoint scratch folders left by killed Train workers are swept, and nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from finetune_trainer import scratch


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_new_folder_sweeps_this_hosts_dead_workers_folders_only(tmp_path: Path):
    host = scratch._host()
    dead = tmp_path / f"{scratch.PREFIX}{host}-{_dead_pid()}-abc"
    (dead / "deepspeed").mkdir(parents=True)
    (dead / "deepspeed" / "states.pt").write_bytes(b"x" * 1024)
    live = tmp_path / f"{scratch.PREFIX}{host}-{os.getpid()}-def"  # a report in progress in this process
    live.mkdir()
    other_host = tmp_path / f"{scratch.PREFIX}{host}x-{_dead_pid()}-ghi"  # a pod sharing the temp dir
    other_host.mkdir()
    unrelated = tmp_path / "ftj-ckpt-old_unnamed"
    unrelated.mkdir()

    made = Path(scratch.checkpoint_folder(str(tmp_path)))

    assert not dead.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()
    assert made.is_dir() and not any(made.iterdir())
    assert made.name.startswith(f"{scratch.PREFIX}{host}-{os.getpid()}-")
    # the folder just made is this (live) process's: the next one leaves it to the caller
    scratch.checkpoint_folder(str(tmp_path))
    assert made.exists()


def test_hostnames_with_dashes_still_parse(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(scratch.socket, "gethostname", lambda: "raycluster-abc-worker-7f9")
    host = scratch._host()
    dead = tmp_path / f"{scratch.PREFIX}{host}-{_dead_pid()}-x1"
    dead.mkdir()
    assert scratch.sweep(str(tmp_path)) == [dead]
    assert not dead.exists()


def test_a_killed_worker_not_yet_reaped_counts_as_gone(tmp_path: Path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        # wait for it to exit without reaping it: a zombie, which answers signal 0
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        os.kill(child.pid, 0)
        folder = tmp_path / f"{scratch.PREFIX}{scratch._host()}-{child.pid}-z"
        folder.mkdir()
        assert scratch.sweep(str(tmp_path)) == [folder]
    finally:
        child.wait()


def test_the_driver_waits_for_a_worker_still_exiting(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(scratch.tempfile, "gettempdir", lambda: str(tmp_path))
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    folder = tmp_path / f"{scratch.PREFIX}{scratch._host()}-{worker.pid}-w"
    folder.mkdir()
    try:
        assert scratch.sweep_when_gone(seconds=20) == [folder]
    finally:
        worker.wait()
