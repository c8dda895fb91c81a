"""`capfilt ingest --distributor pyspark` on a Spark standalone cluster: a master and two workers
on 127.0.0.1, started here with pyspark's own launcher (`bin/spark-class`), download the URL list
of `ingest_data` (images, a 404, an HTML page, a refused URL) from its local HTTP server; the
shards must equal those of the multiprocessing distributor on the same list."""
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from multiprocessing import resource_tracker
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cli_run import error_line, run_cli
from ingest_data import IMG2DATASET, N_IMAGES, processes_with, url_rows, wait_for

# CI installs java and pyspark (requirements-spark.txt) and sets CI: there a missing one fails
# the test instead of skipping it.
needs_spark = pytest.mark.skipif(
    (shutil.which("java") is None or importlib.util.find_spec("pyspark") is None) and not os.environ.get("CI"),
    reason="a Spark cluster needs java and pyspark (pip install 'capfilt[spark]')")

WORKERS = 2
START_DEADLINE_S = 180  # a JVM start on a loaded 2-core machine
# Small, short-lived JVMs (no C2 compiler, one GC thread: less CPU on a 2-core machine), no fixed
# ports (the master's REST server listens on 6066 unless disabled).
JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
SPARK_DEFAULTS = {"spark.driver.memory": "512m", "spark.executor.memory": "512m", "spark.ui.enabled": "false",
                  "spark.master.rest.enabled": "false", "spark.driver.extraJavaOptions": JVM_OPTIONS,
                  "spark.executor.extraJavaOptions": JVM_OPTIONS}
STATS_KEYS = ("count", "successes", "failed_to_download", "failed_to_resize", "status_dict")


class Cluster:
    """A standalone master and its workers, each the leader of its own process group. They boot
    in a thread (:meth:`start`), so that a test can do other work meanwhile; :meth:`master`
    waits for them."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.procs = root, env, []
        self.spark_class = str(Path(env["SPARK_HOME"]) / "bin" / "spark-class")
        self.stopping = threading.Event()
        self.booted: dict = {}  # "url" or "error"
        self.boot = threading.Thread(target=self._boot, name="spark-cluster-boot", daemon=True)

    def start(self) -> None:
        self.boot.start()

    def master(self) -> str:
        """The master URL, once every worker registered with it."""
        self.boot.join()
        if "error" in self.booted:
            raise self.booted["error"]
        return self.booted["url"]

    def _boot(self) -> None:
        try:
            master = self._start("master", "org.apache.spark.deploy.master.Master",
                                 "--host", "127.0.0.1", "--port", "0", "--webui-port", "0")
            url = self._wait_for_line(master, r"Starting Spark master at (spark://127\.0\.0\.1:\d+)").group(1)
            self._wait_for_line(master, r"elected leader")
            workers = [self._start(f"worker{i}", "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                   "--port", "0", "--webui-port", "0", "--cores", "1", "--memory", "512m",
                                   "--work-dir", str(self.work_dir(i)), url) for i in range(WORKERS)]
            for worker in workers:
                self._wait_for_line(worker, r"Successfully registered with master")
            self.booted["url"] = url
        except Exception as err:  # noqa: BLE001 - raised by master()
            self.booted["error"] = err

    def _start(self, name: str, cls: str, *args: str) -> tuple[subprocess.Popen, Path]:
        if self.stopping.is_set():
            raise RuntimeError("the cluster is being stopped")
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([self.spark_class, cls, *args], stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def _wait_for_line(self, started: tuple[subprocess.Popen, Path], pattern: str) -> re.Match:
        """The first match of `pattern` in the log of a started daemon; an error with the log's
        end when it exits or takes too long."""
        proc, log = started
        match = None

        def seen():
            nonlocal match
            match = re.search(pattern, log.read_text(errors="replace"))
            return match is not None or proc.poll() is not None or self.stopping.is_set()

        with contextlib.suppress(AssertionError):
            wait_for(seen, f"{pattern!r} in {log}", deadline_s=START_DEADLINE_S)
        if match is None:
            raise AssertionError(f"{log.name} (exit code {proc.poll()}): no {pattern!r} in "
                                 f"{log.read_text(errors='replace')[-3000:]}")
        return match

    def work_dir(self, i: int) -> Path:
        return self.root / f"worker{i}-work"

    def executor_logs(self) -> list[str]:
        return [p.read_text(errors="replace") for i in range(WORKERS) for p in self.work_dir(i).glob("app-*/*/stderr")]

    def stop(self) -> None:
        """Stop booting; SIGTERM each group (a worker kills its executors), then SIGKILL what is left."""
        self.stopping.set()
        if self.boot.is_alive():
            self.boot.join()
        for proc in reversed(self.procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
            proc.wait()


@pytest.fixture
def spark_cluster(tmp_path, monkeypatch):
    """A Spark standalone cluster on 127.0.0.1, booting (its master() waits); capfilt's driver is
    set up to reach it (SPARK_LOCAL_IP, SPARK_CONF_DIR). Every process it and the driver started
    is gone after the test, which fails otherwise."""
    import pyspark

    conf = tmp_path / "spark-conf"
    conf.mkdir()
    (conf / "spark-defaults.conf").write_text("".join(f"{k} {v}\n" for k, v in SPARK_DEFAULTS.items()))
    marker = ("CAPFILT_TEST_SPARK", uuid.uuid4().hex)
    resource_tracker.ensure_running()  # spawn's helper lives as long as pytest: not with the marker
    env = {"SPARK_HOME": str(Path(pyspark.__file__).parent), "SPARK_CONF_DIR": str(conf),
           "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_DAEMON_MEMORY": "256m",
           "SPARK_DAEMON_JAVA_OPTS": JVM_OPTIONS, "SPARK_LOCAL_DIRS": str(tmp_path / "spark-scratch")}
    for key, value in [*env.items(), marker]:
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)  # capfilt's default: its own interpreter
    monkeypatch.delenv("MASTER", raising=False)
    cluster = Cluster(tmp_path / "spark", dict(os.environ))
    cluster.root.mkdir()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        left = "=".join(marker)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not processes_with(left), "the Spark processes to end", deadline_s=30)
        lingering = {pid: _command(pid) for pid in processes_with(left)}
        for pid in lingering:
            os.kill(pid, signal.SIGKILL)
        assert lingering == {}


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:300]
    except OSError:
        return "?"


def _shards(out: Path) -> tuple[list[dict], dict]:
    """(every row of the parquet shards, in key order; each shard's stats without its times)."""
    rows = pq.read_table(sorted(out.glob("*.parquet"))).sort_by("key").to_pylist()
    stats = {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k in STATS_KEYS}
             for p in sorted(out.glob("*_stats.json"))}
    return rows, stats


@needs_spark
def test_pyspark_on_a_standalone_cluster_gives_the_multiprocessing_shards(server, spark_cluster, tmp_path):
    base, images, _, closed = server
    rows = url_rows(server)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), urls)
    outs = {d: tmp_path / d for d in ("multiprocessing", "pyspark")}
    code, stdout, stderr = run_cli(["ingest", "--url-list", str(urls), "--out", str(outs["multiprocessing"]),
                                    *IMG2DATASET])
    assert code == 0, stderr  # while the cluster boots
    code, stdout, stderr = run_cli(["ingest", "--url-list", str(urls), "--out", str(outs["pyspark"]),
                                    "--distributor", "pyspark", "--spark-master", spark_cluster.master(),
                                    *IMG2DATASET])
    assert code == 0, stderr
    assert f"{'successes':<22}{N_IMAGES:>10}" in stdout and f"{'url list rows':<22}{len(rows):>10}" in stdout

    by_process, stats = _shards(outs["multiprocessing"])
    on_spark, spark_stats = _shards(outs["pyspark"])
    assert on_spark == by_process  # every column: key, url, caption, status, error_message, jpg, sha256, ...
    assert spark_stats == stats and sorted(stats) == ["00000_stats.json", "00001_stats.json"]
    status = {r["url"]: r["status"] for r in on_spark}
    assert status == {**{base + p: "success" for p in images}, base + "/missing.jpg": "failed_to_download",
                      base + "/page.html": "failed_to_resize", closed: "failed_to_download"}
    for r in on_spark:
        if r["status"] == "success":
            served = images[r["url"][len(base):]]
            assert r["jpg"] == served and r["sha256"] == hashlib.sha256(served).hexdigest()
    # the shards were downloaded by the cluster's executors: one task per shard
    finished = [line for log in spark_cluster.executor_logs() for line in log.splitlines() if "Finished task" in line]
    assert len(finished) == len(stats), spark_cluster.executor_logs()


def test_spark_options_are_checked_before_anything_runs(tmp_path, monkeypatch):
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://127.0.0.1:9/1.jpg,a\n")
    code, _, stderr = run_cli(["ingest", "--url-list", str(urls), "--out", str(tmp_path / "o"),
                               "--spark-master", "local[2]"])
    assert code == 2
    assert error_line(stderr, "ingest") == ("capfilt ingest: error: --spark-master local[2]: only with "
                                            "--distributor pyspark")
    monkeypatch.setitem(sys.modules, "pyspark", None)  # as if it were not installed
    code, _, stderr = run_cli(["ingest", "--url-list", str(urls), "--out", str(tmp_path / "o"),
                               "--distributor", "pyspark"])
    assert code == 2
    assert error_line(stderr, "ingest") == ("capfilt ingest: error: --distributor pyspark needs pyspark, which is "
                                            "not installed: pip install 'capfilt[spark]'")
    assert not (tmp_path / "o").exists()
