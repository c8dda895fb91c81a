"""Resource probes for benchmarks/bench_scale.py: what one curate launcher process reads and
holds, and the peak memory of the worker processes around it.

* :func:`launch` runs ``capfilt ARGV`` in this process (the launcher), with Beam's
  ``FileSystems.open`` and ``FileSystems.match`` counted (bytes read per path, files opened,
  listings), for ``s3://`` the bytes Beam's S3 downloader fetched, and the start time of each
  Beam pipeline (curate runs one per group of shards); at exit it writes its
  own ``/proc/self/io`` (``rchar``: bytes passed to read()/pread(), sockets' recv() excluded;
  ``read_bytes``: bytes fetched from the block device), with the part of it that came from the
  children it reaped (the kernel adds a reaped child's counters to its parent's: SDK worker
  processes, ``pip freeze``, ``git describe``) measured apart, ``VmHWM`` (peak resident set)
  and ``getrusage`` figures to a JSON file. Bench runs it as
  ``python -c "from scale_probe import launch; launch(RESULT, ARGV)"``.
* :class:`Sampler` polls ``/proc`` for the descendants of some processes whose command line
  holds a marker (the SDK workers) and keeps each one's ``VmHWM``. A worker that grows in the
  last poll interval before it exits is under-reported by at most that growth.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections import Counter, defaultdict

# Children's I/O counters as they were when this process reaped them (the kernel then adds them
# to this process's own): ``launch`` reports them so that the launcher's own reads can be told
# apart. ``os.waitpid`` is wrapped before ``subprocess`` is imported, which binds it as a default.
REAPED: Counter = Counter()
_waitpid = os.waitpid


def _waitpid_counted(pid, options):
    if pid > 0:
        flags = os.WEXITED | os.WNOWAIT | (os.WNOHANG if options & os.WNOHANG else 0)
        try:
            if os.waitid(os.P_PID, pid, flags) is not None:  # exited, not reaped yet: a zombie
                REAPED.update({k: v for k, v in proc_io(pid).items() if k in ("rchar", "read_bytes")})
                REAPED["children"] += 1
        except ChildProcessError:
            pass
    return _waitpid(pid, options)


os.waitpid = _waitpid_counted


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmHWM`` and ``VmRSS`` of a process in kB ({} when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmHWM", "VmRSS"):
                    out[name] = int(value.split()[0])
    except OSError:
        return {}
    return out


def proc_io(pid: int | str = "self") -> dict[str, int]:
    """``/proc/<pid>/io`` as ints ({} when it is gone or not readable)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f if ":" in line)}
    except OSError:
        return {}


class _CountedFile:
    """A file object whose read calls add the bytes they return to ``tally[path]``."""

    def __init__(self, f, path: str, tally: Counter):
        self._f, self._path, self._tally = f, path, tally

    def read(self, *args):
        data = self._f.read(*args)
        self._tally[self._path] += len(data)
        return data

    def read1(self, *args):
        data = self._f.read1(*args)
        self._tally[self._path] += len(data)
        return data

    def readinto(self, buffer):
        n = self._f.readinto(buffer)
        self._tally[self._path] += n or 0
        return n

    def readline(self, *args):
        data = self._f.readline(*args)
        self._tally[self._path] += len(data)
        return data

    def __iter__(self):
        return iter(self.readline, b"")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _count_beam_reads(tally: dict) -> None:
    """Wrap ``FileSystems.open``/``match`` and the S3 downloader's range reads (class attributes,
    so every caller in this process goes through the counters)."""
    from apache_beam.io.filesystems import FileSystems

    opened, listed = tally["opened"], tally["listed"]
    read, fetched = tally["read"], tally["s3_fetched"]
    open_, match_ = FileSystems.open, FileSystems.match

    def counted_open(path, *args, **kwargs):
        opened[path] += 1
        return _CountedFile(open_(path, *args, **kwargs), path, read)

    def counted_match(patterns, *args, **kwargs):
        for pattern in patterns:
            listed[pattern] += 1
        return match_(patterns, *args, **kwargs)

    FileSystems.open = staticmethod(counted_open)
    FileSystems.match = staticmethod(counted_match)
    try:
        from apache_beam.io.aws import s3io
    except ImportError:  # Beam without its aws extra: no s3:// in this run
        return
    get_range = s3io.S3Downloader.get_range

    def counted_range(self, start, end):
        data = get_range(self, start, end)
        fetched[self._path] += len(data)
        return data

    s3io.S3Downloader.get_range = counted_range


def _time_pipelines(started: float, starts: list[float]) -> None:
    """Note when each Beam pipeline is started (seconds since `started`): curate runs one per
    group of ``--shards-per-pipeline`` shards, one after the other."""
    from apache_beam.pipeline import Pipeline

    run = Pipeline.run

    def timed_run(self, *args, **kwargs):
        starts.append(round(time.monotonic() - started, 3))
        return run(self, *args, **kwargs)

    Pipeline.run = timed_run


def launch(result_path: str, argv: list[str]) -> None:
    """``capfilt ARGV`` in this process; its resource figures to ``result_path`` at exit."""
    started = time.monotonic()
    tally = {"opened": Counter(), "listed": Counter(), "read": Counter(), "s3_fetched": Counter()}
    _count_beam_reads(tally)
    pipeline_starts: list[float] = []
    _time_pipelines(started, pipeline_starts)
    from capfilt.jobs.cli import main_entry

    code = 1
    try:
        main_entry(argv)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
        raise
    finally:
        self_ru, child_ru = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        record = {"exit_code": code, "seconds_in_process": round(time.monotonic() - started, 3),
                  "pipeline_starts_s": pipeline_starts,
                  "io": proc_io(), "reaped_children_io": dict(REAPED), "status": proc_status(),
                  "rusage": {"maxrss_kb": self_ru.ru_maxrss, "utime_s": self_ru.ru_utime, "stime_s": self_ru.ru_stime},
                  "children_rusage": {"maxrss_kb": child_ru.ru_maxrss, "utime_s": child_ru.ru_utime,
                                      "stime_s": child_ru.ru_stime},
                  **{k: dict(v) for k, v in tally.items()}}
        with open(result_path, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)


def _children() -> dict[int, list[int]]:
    kids = defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after the comm, which may hold spaces
        except (OSError, IndexError, ValueError):
            continue
        kids[ppid].append(int(name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Every ``interval`` s, the ``VmHWM`` and ``rchar`` of each descendant of ``roots`` whose
    command line holds ``marker``: :attr:`peaks_kb` maps pid -> the largest VmHWM seen,
    :attr:`rchar` pid -> the last rchar seen, :attr:`commands` pid -> its command line."""

    def __init__(self, roots: list[int], marker: str, interval: float = 0.5):
        super().__init__(daemon=True)
        self.roots, self.marker, self.interval = list(roots), marker, interval
        self.peaks_kb: dict[int, int] = {}
        self.rchar: dict[int, int] = {}  # the last value seen: a reaped child's reads join its parent's
        self.commands: dict[int, str] = {}
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def sample(self) -> None:
        kids, todo = _children(), list(self.roots)
        while todo:
            pid = todo.pop()
            for child in kids.get(pid, ()):
                todo.append(child)
                # read again each time: between fork and exec a child still shows its parent's
                if child not in self.peaks_kb and self.marker not in _cmdline(child):
                    continue
                hwm = proc_status(child).get("VmHWM")
                if hwm:
                    self.peaks_kb[child] = max(hwm, self.peaks_kb.get(child, 0))
                    self.commands[child] = _cmdline(child)  # the latest: a fresh child still shows its parent's
                    self.rchar[child] = proc_io(child).get("rchar", self.rchar.get(child, 0))

    def stop(self) -> None:
        self._done.set()
        self.join()


if __name__ == "__main__":
    sys.exit("scale_probe is used by benchmarks/bench_scale.py; see its --help")
