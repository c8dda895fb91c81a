"""The progress line of a local curate run: rows done, rows/s, kept, dropped, errors.

Beam reports Metrics only once a pipeline has finished, and with
``--direct_running_mode=multi_processing`` the rows are processed in other processes. So each
worker process counts the rows that reach the sinks (:class:`Tap`) and a thread of that process
writes the counts to a small JSON file in a local directory every 2 seconds; the launcher
(:class:`Reporter`) adds the files up and prints a line every ``--progress-every`` seconds.
Used with local runners only; remote runners have their own monitoring.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter

import apache_beam as beam

from capfilt.transforms.files import atomic

_LOCK = threading.Lock()
_COUNTS: dict[str, Counter] = {}  # progress dir -> this process's counts
_DIRTY: set[str] = set()  # dirs whose counts changed since they were last written
_FLUSH_EVERY = 2.0
_flusher: threading.Thread | None = None


def _write(progress_dir: str) -> None:
    try:
        atomic.write_json(os.path.join(progress_dir, f"{os.getpid()}.json"), dict(_COUNTS[progress_dir]))
    except OSError:
        pass  # the run finished and removed the directory: nothing left to report


def _flush() -> None:
    with _LOCK:
        for progress_dir in list(_DIRTY):
            _write(progress_dir)
        _DIRTY.clear()


def _flush_forever() -> None:
    while True:
        time.sleep(_FLUSH_EVERY)
        _flush()


def _start_flusher() -> None:
    """One daemon thread per worker process writes the changed counts every 2 s, so rows are
    published even when the next element is minutes away (big models, big batches)."""
    global _flusher
    with _LOCK:
        if _flusher is None or not _flusher.is_alive():
            _flusher = threading.Thread(target=_flush_forever, name="capfilt-progress-flush", daemon=True)
            _flusher.start()


class Tap(beam.DoFn):
    """Pass-through that counts rows on their way to a sink. ``kind``: ``curated`` elements
    are (shard, row, record) and count as kept or dropped; ``errors`` count as errors."""

    def __init__(self, progress_dir: str, kind: str):
        self._dir = progress_dir
        self._kind = kind

    def setup(self):
        _start_flusher()

    def process(self, element):
        if self._kind == "curated":
            field = "kept" if element[2]["keep"] else "dropped"
        else:
            field = "errors"
        with _LOCK:
            _COUNTS.setdefault(self._dir, Counter())[field] += 1
            _DIRTY.add(self._dir)
        yield element

    def finish_bundle(self):
        _flush()


def _read(progress_dir: str) -> Counter:
    total: Counter = Counter()
    try:
        names = os.listdir(progress_dir)
    except OSError:
        return total
    for name in names:
        if name.endswith(".json"):
            try:
                with open(os.path.join(progress_dir, name), encoding="utf-8") as f:
                    total.update(json.load(f))
            except (OSError, ValueError):
                continue
    return total


class Reporter:
    """Prints ``curate: done/total rows | rows/s | kept | dropped | errors`` to stderr."""

    def __init__(self, total_rows: int, every: float, stream=None):
        self.total = total_rows
        self.every = every
        self.stream = stream or sys.stderr
        self.base: Counter = Counter()  # counts of finished pipelines
        self.current: str | None = None
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="capfilt-progress", daemon=True)
        self._thread.start()

    def watch(self, progress_dir: str) -> None:
        self.current = progress_dir

    def unwatch(self, progress_dir: str) -> None:
        self.base.update(_read(progress_dir))
        self.current = None

    def counts(self) -> Counter:
        counts = Counter(self.base)
        if self.current:
            counts.update(_read(self.current))
        return counts

    def line(self) -> str:
        c = self.counts()
        done = c["kept"] + c["dropped"] + c["errors"]
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        eta_text = f"{eta:.0f}s" if eta == eta else "?"
        return (f"curate: {done}/{self.total} rows ({pct:.1f}%) | {rate:.2f} rows/s | kept {c['kept']} | "
                f"dropped {c['dropped']} | errors {c['errors']} | eta {eta_text}")

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            print(self.line(), file=self.stream, flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
