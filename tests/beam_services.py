"""Beam's portable services on 127.0.0.1, for tests and benchmarks: the local job service and
an external SDK worker pool (the protocol of Flink, Spark and Dataflow), each a process of this
Python in its own session and working directory, stopped with the SDK workers it started.

Beam's Python job service runs every job on one SDK worker: its runner never reads
``--direct_num_workers``, and ``--sdk_worker_parallelism`` is read by Flink and Spark only.
``portable_services(workers=N)`` with N > 1 starts it with its runner's worker count set to N,
so that the pool starts N SDK worker processes per pipeline.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

START_S = 120  # a loaded 2-core machine takes tens of seconds to import Beam

_JOB_SERVICE_WITH_WORKERS = """import sys
from apache_beam.runners.portability import local_job_service_main
from apache_beam.runners.portability.fn_api_runner import fn_runner
init = fn_runner.FnApiRunner.__init__
def with_workers(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self._num_workers = {workers}
fn_runner.FnApiRunner.__init__ = with_workers
local_job_service_main.run(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service(argv: list[str], port: int, cwd: Path) -> Iterator[subprocess.Popen]:
    """``python ARGV`` in `cwd` (its own process group, so the SDK workers it starts stop with
    it), yielded once it listens on `port`; RuntimeError with its log's tail otherwise."""
    env = dict(os.environ)
    # The worker pool starts SDK workers as `python` from PATH: this interpreter's.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / "service.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not listening on {port} after {START_S} s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=20)


@contextlib.contextmanager
def portable_services(cwd: Path, workers: int = 1) -> Iterator[tuple[list[str], int, int]]:
    """A job service running each job on `workers` SDK workers, and an external worker pool:
    yields (the Beam options of a PortableRunner run against them, the job service's pid, the
    pool's pid)."""
    job, pool = free_port(), free_port()
    job_argv = (["-m", "apache_beam.runners.portability.local_job_service_main"] if workers == 1
                else ["-c", _JOB_SERVICE_WITH_WORKERS.format(workers=int(workers))])
    with service([*job_argv, "--port", str(job)], job, cwd / "job") as job_proc, \
            service(["-m", "apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool)], pool,
                    cwd / "pool") as pool_proc:
        options = ["--runner", "PortableRunner", "--job_endpoint", f"localhost:{job}",
                   "--environment_type", "EXTERNAL", "--environment_config", f"localhost:{pool}"]
        if workers > 1:  # what curate reads for the torch threads per worker process
            options += ["--sdk_worker_parallelism", str(workers)]
        yield options, job_proc.pid, pool_proc.pid
