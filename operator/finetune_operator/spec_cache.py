"""The parsed spec of each FineTuneJob, kept per (uid, generation).

Why: every watch event of a RayJob and every progress tick needs the job's parsed spec
(`parse_job` runs pydantic validation and the cluster rules over the whole manifest). A spec
changes only with a new `metadata.generation` (the API server bumps it on spec writes, not on
status ones), so parsing it once per generation is enough: at 1,000 running jobs the polls would
otherwise parse 1,000 specs every interval, and one large search spec took seconds each time.

One entry per job uid (its latest generation): the cache holds at most the jobs the operator
watches, and `forget` drops a job when the watch says it is gone. A spec that does not parse is
kept as its problems, and each caller gets a fresh SpecError (an exception object raised in two
threads at once would share one traceback).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from finetune_trainer.spec import FineTuneJob, SpecError, parse_job

from .crd import GROUP, KIND, VERSION
from .status_writer import plain

Parse = Callable[[dict[str, Any]], FineTuneJob]


def parse_for_cluster(manifest: dict[str, Any]) -> FineTuneJob:
    return parse_job(manifest, for_cluster=True)


def manifest_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the user wrote, as parse_job takes it: the object without status and server metadata.
    A deep copy of the spec: built only when the cache misses."""
    meta = body["metadata"]
    return {"apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"), "kind": body.get("kind", KIND),
            "metadata": {"name": meta["name"], "namespace": meta.get("namespace", "default")},
            "spec": plain(body.get("spec") or {})}


def _spec_error(problems: list[tuple[str, str]]) -> SpecError:
    """A fresh SpecError with these (already shortened) problems: its constructor would shorten
    a list that already ends in "and N more" once more."""
    err = SpecError.__new__(SpecError)
    err.problems = list(problems)
    ValueError.__init__(err, err.render())
    return err


class SpecCache:
    """`job(body)`: the FineTuneJob's parsed spec, parsed only when its uid or generation is new."""

    def __init__(self, parse: Parse = parse_for_cluster):
        self._parse = parse
        self._entries: dict[str, tuple[int, FineTuneJob | list[tuple[str, str]]]] = {}
        self._lock = threading.Lock()

    def job(self, body: Mapping[str, Any]) -> FineTuneJob:
        """The parsed spec of this FineTuneJob object; raises SpecError as parse_job would."""
        meta = body["metadata"]
        uid, generation = meta.get("uid"), meta.get("generation", 1)
        if not uid:  # nothing to key it by (never so for an object read from the API server)
            return self._parse(manifest_of(body))
        with self._lock:
            entry = self._entries.get(uid)
        if entry is None or entry[0] != generation:
            try:
                parsed: FineTuneJob | list[tuple[str, str]] = self._parse(manifest_of(body))
            except SpecError as err:
                parsed = list(err.problems)
            with self._lock:
                current = self._entries.get(uid)
                if current is None or current[0] <= generation:  # never replace a newer generation's
                    self._entries[uid] = (generation, parsed)
            entry = (generation, parsed)
        value = entry[1]
        if isinstance(value, list):
            raise _spec_error(value)
        return value

    def forget(self, uid: str | None) -> None:
        """The job is gone: drop its entry."""
        if uid:
            with self._lock:
                self._entries.pop(uid, None)

    def __len__(self) -> int:
        return len(self._entries)
