"""One `capfilt ingest` per --out, and img2dataset's processes ended with it.

img2dataset starts its pool and logger with the ``spawn`` method, so no file descriptor (and no
``flock``) reaches them, and it offers no hook in them for a parent-death signal. So
``download`` runs in a process of ours that leads a new process group, which img2dataset's
processes join, and that process kills the group when capfilt is gone (:func:`run_download`).
:class:`OutLock` records the group in ``OUT/.capfilt-ingest/lock``, the file it holds the lock on
(``transforms.files.locks``): a second ingest, or one started while a killed ingest's processes
still live, is refused naming them.
"""
from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import traceback

from capfilt.transforms.files import atomic, locks


# --- one ingest per --out ----------------------------------------------------------------------

# In --out, a directory: the globs over --out (img2dataset's `*.json` for done shards, curate's
# `raw/*`) do not descend into it.
LOCK_DIR = ".capfilt-ingest"
# How long a new ingest waits for the processes of a killed one to die before refusing: they are
# being killed by their group leader when capfilt was killed a moment ago.
ORPHAN_GRACE_S = 3.0


def _boot_id() -> str | None:
    """Linux's id of this boot: a process group recorded before a reboot is gone."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of process group ``pgid``."""
    if not os.path.isdir("/proc"):  # no procfs: the kernel can still tell whether the group exists
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]  # the name may hold spaces
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(name))
    return sorted(members)


class OutLock:
    """One ingest at a time in ``out``: ``OUT/.capfilt-ingest/lock``, locked by the capfilt
    process and holding JSON ``{"pid", "pgid", "boot_id"}``: capfilt's pid and the process group
    that runs img2dataset (:func:`run_download`).

    img2dataset spawns its processes, which do not inherit the descriptor, so the flock alone
    would let a second ingest in while the processes of a killed one still write; hence the
    recorded group, whose live members make a new ingest refuse to start."""

    def __init__(self, out: str):
        self.out = out
        self.path = os.path.join(out, LOCK_DIR, "lock")
        self.lock = None  # the held transforms.files.locks lock
        self.pgid: int | None = None

    def __enter__(self) -> OutLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            self.lock = locks.acquire(self.path)
        except locks.Busy:
            holder = _read_record(self.path).get("pid", "?")
            raise ValueError(f"another capfilt ingest (pid {holder}) is still running in {self.out}: "
                             f"wait for it or kill it") from None
        try:
            self._refuse_live_group(_read_record(self.path))
            self._write(None)
        except BaseException:
            self._close()
            raise
        return self

    def _refuse_live_group(self, record: dict) -> None:
        pgid = record.get("pgid")
        if not isinstance(pgid, int) or pgid == os.getpgrp() or record.get("boot_id") != _boot_id():
            return
        deadline = time.monotonic() + ORPHAN_GRACE_S
        while (live := group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if live:
            raise ValueError(
                f"another ingest is still running in {self.out}: pid(s) {', '.join(map(str, live))} of process "
                f"group {pgid}, started by capfilt ingest pid {record.get('pid', '?')}, write img2dataset shards "
                f"there: wait for it or kill it (kill -9 -- -{pgid})")

    def record_group(self, pgid: int) -> None:
        self.pgid = pgid
        self._write(pgid)

    def _write(self, pgid: int | None) -> None:
        data = json.dumps({"pid": os.getpid(), "pgid": pgid, "boot_id": _boot_id()}).encode()
        fd = os.open(self.path, os.O_WRONLY)  # in place: the lock is on this file
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self.pgid is not None and not group_members(self.pgid):
            self._write(None)  # nothing left of the group: a later run need not look for it
        self._close()

    def _close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _read_record(path: str) -> dict:
    record = atomic.read_json(path, default={})  # {} also for a run killed while writing it
    return record if isinstance(record, dict) else {}


# --- img2dataset in a process group of its own ---------------------------------------------------

def _kill_group_when_parent_dies(sentinel) -> None:
    multiprocessing.connection.wait([sentinel])  # readable once capfilt's end of the pipe is closed
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _download_in_group(download, kwargs: dict, conn) -> None:
    """Body of the spawned process that calls img2dataset's ``download``.

    It leads a new process group before img2dataset starts anything, so img2dataset's logger,
    pool workers and resource tracker are in it; a thread waits on the pipe to the capfilt
    process (``multiprocessing.parent_process().sentinel``) and kills the whole group when
    capfilt is gone, killed or not."""
    os.setpgid(0, 0)
    threading.Thread(target=_kill_group_when_parent_dies, args=(multiprocessing.parent_process().sentinel,),
                     name="kill-group-when-capfilt-dies", daemon=True).start()
    try:
        download(**kwargs)
    except BaseException as err:  # noqa: BLE001 - handed to capfilt, which raises it
        if not isinstance(err, ValueError):
            traceback.print_exc()
        if not isinstance(err, Exception):  # e.g. SystemExit(0) from img2dataset's SIGINT handler
            err = RuntimeError(f"img2dataset stopped: {err!r}")
        try:
            pickle.dumps(err)
        except Exception:  # noqa: BLE001 - an exception that cannot travel: its text can
            err = RuntimeError(f"img2dataset failed: {err!r}")
        conn.send(err)
        sys.exit(1)
    conn.send(None)


def run_download(download, kwargs: dict, lock: OutLock) -> None:
    """``download(**kwargs)`` in a spawned process that leads a new process group (see
    :func:`_download_in_group`); its exception is raised here. The group is recorded in ``lock``.
    When the process fails or capfilt is interrupted, whatever is left of the group is killed."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_download_in_group, args=(download, kwargs, sender), name="capfilt-ingest-download")
    proc.start()
    sender.close()
    lock.record_group(proc.pid)  # the group's id is its leader's pid
    outcome, finished = None, False
    try:
        try:
            outcome = receiver.recv()
        except EOFError:  # it died without a word (killed)
            pass
        proc.join()
        finished = proc.exitcode == 0 and outcome is None
        if not finished and outcome is None:
            outcome = RuntimeError(f"img2dataset's process (pid {proc.pid}) died with exit code {proc.exitcode}")
    finally:
        receiver.close()
        if not finished:  # its logger or pool workers may live on
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + ORPHAN_GRACE_S  # gone before the lock is released
            while group_members(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
    if outcome is not None:
        raise outcome
