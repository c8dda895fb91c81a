"""`capfilt curate` on other runners than the local FnApiRunner, as a new user would run it.

* PortableRunner against Beam's own job service with an external SDK worker pool (the
  protocol of Flink, Spark and Dataflow), both started here on 127.0.0.1 in working
  directories of their own, with relative paths on the command line: the same rows as an
  FnApiRunner run.
* Plug-in runners named by their full class path (curate_stub_runner.py): their own options
  pass, a runner without Metrics completes with counts from the written files, and a runner
  that cannot be created is refused before --out is touched.
* --device cuda with a runner that is not local is left to the workers; their refusal ends the
  command with one line on stderr naming the stage and the worker's error.
* An SDK worker process killed (kill -9) mid-run: the run fails in one line with no shard done,
  and the re-run gives the reference rows.
* Other failures (a job endpoint where nothing listens, a TypeError in a stage) end in one line
  naming where and why (pipeline/curate/failures.py).
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.pipeline.curate.options import CurateConfig
from capfilt.transforms.schemas import CURATED_SCHEMA
from beam_services import _JOB_SERVICE_WITH_WORKERS
from cli_run import error_line, run_cli

FLOAT_COLUMNS = ("web_itm", "web_itc", "web_clip", "synthetic_itm", "synthetic_itc", "synthetic_clip")
STUB = "curate_stub_runner"  # tests/pipeline/curate/curate_stub_runner.py, on sys.path under pytest
SERVICE_START_S = 60
WORKER_HOOK = Path(__file__).parent / "worker_hook"  # its sitecustomize.py holds a worker in Rank on demand


def model_args(captioner, itm, clip):
    return ["--captioner", str(captioner), "--filter", str(itm), "--clip", str(clip), "--num-captions", "2",
            "--max-length", "10", "--min-length", "4", "--seed", "5", "--torch-threads", "1",
            "--precision", "fp32", "--itm-threshold", "0.5"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, synth_world):
    """Two raw shards of 4 web rows each."""
    table = pq.read_table(sorted((synth_world / "web").glob("*.parquet"))[0])
    root = tmp_path_factory.mktemp("portable_in")
    for i in range(2):
        pq.write_table(table.slice(4 * i, 4), root / f"{i:05d}.parquet")
    return root


@pytest.fixture(scope="module")
def reference(inputs, tiny_models, tmp_path_factory):
    """The same curate on the local FnApiRunner."""
    out = tmp_path_factory.mktemp("portable_ref") / "out"
    code, _, stderr = run_cli(["curate", "--input", str(inputs / "*.parquet"), "--out", str(out),
                               *model_args(tiny_models["captioner"], tiny_models["itm"], tiny_models["clip"])])
    assert code == 0, stderr
    return out


@pytest.fixture
def workdir(tmp_path, inputs, tiny_models, monkeypatch):
    """A working directory holding the inputs and models under relative names."""
    (tmp_path / "raw").symlink_to(inputs, target_is_directory=True)
    (tmp_path / "models").mkdir()
    for kind in ("captioner", "itm", "clip"):
        (tmp_path / "models" / kind).symlink_to(tiny_models[kind], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


RELATIVE = ["--input", "raw/*.parquet", "--out", "out", *model_args("models/captioner", "models/itm", "models/clip")]


def load_rows(out):
    table = pa.concat_tables(pq.read_table(p) for p in sorted((Path(out) / "shards").glob("*.parquet")))
    rows = {r["key"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows, "duplicate keys in the curated output"
    return rows


def assert_same_as_reference(out, reference):
    rows, ref = load_rows(out), load_rows(reference)
    assert sorted(rows) == sorted(ref)
    for key, row in rows.items():
        for col in CURATED_SCHEMA.names:
            if col in FLOAT_COLUMNS and row[col] is not None:
                np.testing.assert_allclose(row[col], ref[key][col], atol=1e-6, err_msg=f"{key} {col}")
            else:
                assert row[col] == ref[key][col], (key, col)
    stats = json.loads((Path(out) / "stats.json").read_text())
    assert stats["input_rows"] == 8 == stats["kept"] + stats["dropped"] + stats["errors"]
    return stats


# --- launcher-side: paths, runner names ---------------------------------------------------------

def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = CurateConfig(inputs=("raw/*.parquet", "gs://b/raw/*.tar"), out="out", captioner="m",
                       filter="Salesforce/blip-itm-large-coco", clip="local-dir:clipdir").absolute()
    assert cfg.inputs == (str(tmp_path / "raw" / "*.parquet"), "gs://b/raw/*.tar")
    assert cfg.out == str(tmp_path / "out")
    assert cfg.captioner == str(tmp_path / "m")
    assert cfg.filter == "Salesforce/blip-itm-large-coco"  # a hub id
    assert cfg.clip == "local-dir:" + str(tmp_path / "clipdir")
    (tmp_path / "w.pt").write_bytes(b"")
    for clip, expected in (("ViT-B-32:openai", "ViT-B-32:openai"),  # a pretrained tag
                           ("ViT-B-32:w.pt", f"ViT-B-32:{tmp_path / 'w.pt'}")):  # a weights file
        cfg = CurateConfig(inputs=("x",), out="s3://b/o", captioner="c", filter="f", clip=clip).absolute()
        assert (cfg.clip, cfg.out) == (expected, "s3://b/o")


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in root.rglob("*") if p.is_file()} if root.exists() else None


@pytest.mark.parametrize("runner, message", [
    ("NoSuchRunner", "--runner NoSuchRunner: cannot create it (ValueError: Unexpected pipeline runner"),
    (f"{STUB}.BrokenRunner", f"--runner {STUB}.BrokenRunner: cannot create it (RuntimeError: no cluster"),
    ("no_such_module.Runner", "--runner no_such_module.Runner: cannot import no_such_module"),
])
def test_a_refused_runner_leaves_out_as_it_was(workdir, reference, runner, message):
    existing = workdir / "out"  # an earlier curate output, which a run would resume
    shutil.copytree(reference, existing)
    for out in (existing, workdir / "absent"):
        before = snapshot(out)
        argv = ["curate", *RELATIVE, "--runner", runner]
        argv[argv.index("out")] = out.name
        code, stdout, stderr = run_cli(argv)
        assert code == 2 and stdout == ""
        assert error_line(stderr).startswith(f"capfilt curate: error: {message}")
        assert snapshot(out) == before  # byte-identical, or still absent


def test_a_plugin_runners_options_pass_and_missing_metrics_are_read_from_files(workdir, reference):
    """A runner named by its full class path: its module is imported before Beam's options are
    checked (--stub_flag is its own), and its result has no Metrics."""
    code, stdout, stderr = run_cli(["curate", *RELATIVE, "--runner", f"{STUB}.NoMetricsRunner",
                                    "--stub_flag", "x"])
    assert code == 0, stderr
    assert sys.modules[STUB].NoMetricsRunner.flags == ["x"]
    stats = assert_same_as_reference(workdir / "out", reference)
    assert stats["this_run"]["runner"] == "NoMetricsRunner" and stats["this_run"]["input_rows"] == 8
    assert "input_rows = kept + dropped + errors" in stdout


# --- PortableRunner with external SDK workers ----------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc, log: Path) -> None:
    deadline = time.monotonic() + SERVICE_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"service exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"service not listening on {port} after {SERVICE_START_S} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def service(args: list[str], port: int, cwd: Path, **env_changes):
    """A Beam service started with this Python in `cwd` (its own process group, so the SDK
    workers it starts stop with it), with `env_changes` in its environment."""
    env = dict(os.environ, **env_changes)
    # The worker pool starts SDK workers as `python` from PATH: this interpreter's.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / "service.log"
    with open(log, "wb") as sink:
        argv = args if args[0] == "-c" else ["-m", *args]
        proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, proc, log)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A local job service and an SDK worker pool: the Beam options of a PortableRunner run
    against them (``args``), the pool's process (``pool``) and the file that holds its workers
    in the Rank stage while it exists (``hold``, worker_hook/sitecustomize.py)."""
    root = tmp_path_factory.mktemp("portable_services")
    job, pool = free_port(), free_port()
    hold = root / "hold"
    hook_env = {"PYTHONPATH": os.pathsep.join(filter(None, (str(WORKER_HOOK), os.environ.get("PYTHONPATH")))),
                "CAPFILT_TEST_HOLD": str(hold)}
    # Beam's Python job service runs every job on one SDK worker whatever the options say: its
    # runner's worker count is set to 2 (tests/beam_services.py), so the pool starts two per job.
    job_service = ["-c", _JOB_SERVICE_WITH_WORKERS.format(workers=2), "--port", str(job)]
    with service(job_service, job, root / "job"), \
            service(["apache_beam.runners.worker.worker_pool_main", "--service_port", str(pool)], pool, root / "pool",
                    **hook_env) as pool_proc:
        yield SimpleNamespace(args=["--runner", "PortableRunner", "--job_endpoint", f"localhost:{job}",
                                    "--environment_type", "EXTERNAL", "--environment_config", f"localhost:{pool}",
                                    "--sdk_worker_parallelism", "2"],
                              pool=pool_proc, hold=hold)


@pytest.fixture(scope="module")
def portable(services):
    """Beam options of a PortableRunner run against a local job service and worker pool."""
    return services.args


def test_portable_runner_with_external_workers_and_relative_paths(workdir, reference, portable):
    code, stdout, stderr = run_cli(["curate", *RELATIVE, *portable])
    assert code == 0, stderr
    stats = assert_same_as_reference(workdir / "out", reference)
    assert stats["this_run"]["runner"] == "PortableRunner"
    manifest = json.loads((workdir / "out" / "manifest.json").read_text())
    assert manifest["models"]["captioner"]["id"] == str(workdir / "models" / "captioner")


def test_device_cuda_is_left_to_the_workers_of_a_remote_runner(workdir, portable, monkeypatch, caplog):
    """The launcher's CPU-only check is not the workers': a CUDA device is refused only where
    the models run (here: workers without a GPU), and the command ends with one line on stderr
    naming the stage and the workers' error (pipeline/curate/failures.py)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine's workers have a GPU: they would curate")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["curate", *RELATIVE, "--device", "cuda", "--precision", "auto"]
    code, _, stderr = run_cli(argv)  # the local runner: refused at once, as before
    assert code == 2 and error_line(stderr).startswith("capfilt curate: error: --device cuda: device 'cuda' requested")
    caplog.clear()
    code, stdout, stderr = run_cli([*argv, *portable])
    assert code == 2 and stdout == ""  # a ValueError: a bad option for these workers
    line = error_line(stderr)
    assert re.fullmatch(r"capfilt curate: error: stage (Caption|Filter|Rank): ValueError: device 'cuda' requested "
                        r"but torch sees no CUDA device \(Beam step CapFilt/Curate/\1/.*\)", line), line
    assert not list((workdir / "out" / "_state").glob("0*.json"))  # no shard done
    # nor a traceback in the log: PortableRunner's copy of the job's error messages is not shown
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in caplog.records)


# --- failures: one line naming where and why ------------------------------------------------------

def sdk_workers(pool_pid: int) -> set[int]:
    """The worker pool's live child processes (its SDK workers), read from /proc."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]  # after "pid (comm)"
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(ppid) == pool_pid and state != "Z":
            pids.add(int(stat.parent.name))
    return pids


def test_a_killed_sdk_worker_fails_the_run_and_a_rerun_gives_the_reference_rows(workdir, reference, services):
    """kill -9 of the SDK worker process that is in the Rank stage: Beam's job service does not
    retry the bundle, the run fails in one line with no shard done, and a re-run (the pool starts
    a new worker) gives the FnApiRunner rows, each once."""
    pid_file = Path(f"{services.hold}.pid")
    services.hold.write_text("")
    first = {}
    run = threading.Thread(target=lambda: first.update(result=run_cli(["curate", *RELATIVE, *services.args])))
    try:
        run.start()
        deadline = time.monotonic() + 300
        while not pid_file.exists():
            assert run.is_alive() and time.monotonic() < deadline, first
            time.sleep(0.1)
        pid = int(pid_file.read_text())
        assert pid in sdk_workers(services.pool.pid)  # a worker of the pool, held in Rank
        os.kill(pid, signal.SIGKILL)
        services.hold.unlink()  # the job's other SDK worker may be held in Rank too: let it go
        run.join(timeout=300)
        assert not run.is_alive()
    finally:
        services.hold.unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)
    code, stdout, stderr = first["result"]
    assert code == 1 and stdout == ""
    line = error_line(stderr)
    # Beam 2.77's job service reports the lost data channel ("Channel closed prematurely.")
    assert re.fullmatch(r"capfilt curate: failed: Beam job \S+: RuntimeError: \S.*", line), line
    assert "Traceback" not in line and "File " not in line
    out = workdir / "out"
    assert not list((out / "_state").glob("0*.json")) and not list(out.glob("shards/*.parquet"))
    code, _, stderr = run_cli(["curate", *RELATIVE, *services.args])
    assert code == 0, stderr
    assert pid not in sdk_workers(services.pool.pid)
    stats = assert_same_as_reference(out, reference)
    assert stats["this_run"]["input_rows"] == 8 and stats["shards"] == 2


def test_a_job_endpoint_that_does_not_answer_ends_in_one_line(workdir, caplog):
    port = free_port()  # nothing listens there
    code, stdout, stderr = run_cli(["curate", *RELATIVE, "--runner", "PortableRunner", "--job_endpoint",
                                    f"localhost:{port}", "--job_server_timeout", "2"])
    assert code == 1 and stdout == ""
    assert error_line(stderr) == (f"capfilt curate: failed: job service at localhost:{port}: FutureTimeoutError: "
                                  f"no answer within --job_server_timeout 2 s")
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in caplog.records)


def test_a_type_error_in_a_stage_ends_in_one_line_naming_the_stage(workdir, monkeypatch, caplog):
    from capfilt.pipeline.curate import inference

    def broken(self):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(inference.RankHandler, "load", broken)
    code, stdout, stderr = run_cli(["curate", *RELATIVE])  # the local runner, in this process
    assert code == 1 and stdout == ""
    line = error_line(stderr)
    assert re.fullmatch(r"capfilt curate: failed: stage Rank: TypeError: unsupported operand type\(s\) for \+: "
                        r"'int' and 'str' \(Beam step CapFilt/Curate/Rank/.*\)", line), line
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in caplog.records)
