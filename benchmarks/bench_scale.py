"""Curate at growing sizes on several runners: time per row, and what the launcher reads and
holds as the data grows. Not a test: it prints figures (docs/benchmarks/scale.md).

Every curate run is its own launcher process (``benchmarks/scale_probe.py``, which calls
``capfilt.jobs.cli.main_entry``), so its ``/proc/<pid>/io`` and peak resident set (VmHWM) are
the launcher's alone; the bytes it reads through Beam's FileSystems are counted per file.
The SDK worker processes' peak RSS is polled from ``/proc``. Configurations:

* ``fnapi1``: FnApiRunner, one worker (in the launcher process);
* ``fnapi2``: FnApiRunner, ``--direct_num_workers 2 --direct_running_mode multi_processing``
  (two SDK worker processes, children of the launcher);
* ``portable2``: PortableRunner against Beam's local job service and an external worker pool,
  both started here on 127.0.0.1 for each run. That job service runs every job on one SDK
  worker whatever the options say (``--sdk_worker_parallelism`` is Flink's and Spark's; its
  runner never reads ``--direct_num_workers``), so it is started with its runner's worker count
  set to 2 (``tests/beam_services.py``): two SDK worker processes in the pool per pipeline;
* ``s3``: inputs and ``--out`` on a local S3 (moto, ``tests/s3_server.py``) at ``--s3-rows``
  rows, with ``--s3-runner`` (FnApiRunner; the pool's SDK workers above start without the
  pipeline's options, so their FileSystems cannot reach a local S3); the models stay local.

Figures per run: wall time of the launcher process (interpreter start to exit); the launcher's
peak RSS, its ``rchar``/``read_bytes`` less those of the children it reaped, and its reads
through FileSystems by file (input shards, ``--out``); each SDK worker's peak RSS; for
Portable, the job service's (it runs the runner and holds the data between stages). Per
configuration: the steady-state ms per row between the smallest and the largest size, and
the goals (``goals``): marginal time per row flat within 15 %, launcher reads per extra shard
within :data:`PER_SHARD_READ_BOUND`, launcher peak RSS within 15 %.

Inputs: the synthetic web split (``capfilt.transforms.synth``, distinct rows), ``--rows-per-shard``
rows per shard; tiny models (``capfilt.model.builders.tiny``, as in benchmarks/bench_curate.py).

    .venv/bin/python benchmarks/bench_scale.py --quick            # smoke run, a few minutes
    .venv/bin/python benchmarks/bench_scale.py --out /tmp/capfilt-bench-scale
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(REPO / "tests")]

from beam_services import portable_services  # noqa: E402  (tests/beam_services.py)
from scale_probe import Sampler, proc_status  # noqa: E402

CONFIGS = ("fnapi1", "fnapi2", "portable2", "s3")
FLAT = 0.15  # the goals' tolerance
# What the launcher may read per input shard, whatever the shard's size: its parquet footer
# (pyarrow reads the last 64 KiB), its receipt and its done marker (about 1 KiB each).
PER_SHARD_READ_BOUND = 128 * 1024


def runner_args(config: str) -> list[str]:
    """Beam options of the FnApiRunner configurations (portable2: ``beam_services``)."""
    if config == "fnapi1":
        return ["--runner", "FnApiRunner"]
    if config == "fnapi2":
        return ["--runner", "FnApiRunner", "--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]
    raise ValueError(f"unknown configuration {config!r}")


# --- inputs ----------------------------------------------------------------------------------

def world_shards(work: Path, rows: int, per_shard: int) -> list[Path]:
    """The synthetic web split with `rows` rows in shards of `per_shard` (built once)."""
    from capfilt.transforms.synth.world import SynthConfig, write_world

    out = work / f"world_{rows}_{per_shard}"
    if not (out / "web").is_dir():
        write_world(out, SynthConfig(n=rows, human=0, test=0, noise=0.45, seed=0, rows_per_shard=per_shard),
                    overwrite=True)
    return sorted((out / "web").glob("*.parquet"))


def inputs_of(work: Path, shards: list[Path], rows: int, per_shard: int) -> Path:
    """A folder holding (hard links to) the first rows // per_shard shards."""
    folder = work / "inputs" / str(rows)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for shard in shards[: rows // per_shard]:
        try:
            os.link(shard, folder / shard.name)
        except OSError:
            shutil.copy(shard, folder / shard.name)
    return folder


# --- one run ---------------------------------------------------------------------------------

def curate_args(args, models: dict, inputs: str, out: str) -> list[str]:
    argv = ["curate", "--input", inputs, "--out", out, "--captioner", models["captioner"],
            "--filter", models["itm"], "--clip", models["clip"], "--num-captions", str(args.num_captions),
            "--max-length", str(args.max_length), "--min-length", str(args.min_length),
            "--batch-size", str(args.batch_size), "--precision", args.precision,
            "--torch-threads", str(args.torch_threads), "--seed", "0", "--progress-every", "60"]
    if args.no_images:
        argv.append("--no-images")
    if args.shards_per_pipeline:
        argv += ["--shards-per-pipeline", str(args.shards_per_pipeline)]
    return argv


def run_launcher(argv: list[str], run_dir: Path, worker_roots, marker: str, env: dict | None = None) -> dict:
    """One launcher process; its probe record, its wall time and the workers' peaks."""
    result = run_dir / "launcher.json"
    code = f"import sys; from scale_probe import launch; launch({str(result)!r}, sys.argv[1:])"
    env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]))
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(run_dir / "launcher.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(worker_roots(proc.pid), marker)
    sampler.start()
    proc.wait()
    wall = time.perf_counter() - started
    sampler.stop()
    (run_dir / "workers.json").write_text(json.dumps(
        {pid: {"peak_kb": kb, "rchar": sampler.rchar.get(pid), "command": sampler.commands.get(pid)}
         for pid, kb in sampler.peaks_kb.items()}, indent=1))
    if proc.returncode != 0:
        raise RuntimeError(f"curate exited with {proc.returncode}: {(run_dir / 'launcher.log').read_text()[-3000:]}")
    probe = json.loads(result.read_text())
    return {"wall_s": wall, "probe": probe, "worker_peaks_kb": sampler.peaks_kb,
            "worker_commands": sampler.commands, "load_before": load, "load_after": os.getloadavg()[0]}


def read_stats(out: str) -> dict:
    from capfilt.pipeline.files import BEAM
    from capfilt.transforms.files.atomic import read_json

    return read_json(f"{out.rstrip('/')}/stats.json", BEAM)


def summarise(config: str, rows: int, shards: int, run: dict, stats: dict, inputs: str, out: str,
              runner_peak_kb: int | None) -> dict:
    probe = run["probe"]
    by_kind = {"input": 0, "out": 0, "other": 0}
    for path, n in probe["read"].items():
        kind = "input" if path.startswith(inputs) else "out" if path.startswith(out) else "other"
        by_kind[kind] += n
    # FnApiRunner starts each SDK worker through `/bin/sh -c`: the shell is not a worker
    workers = {pid: kb for pid, kb in run["worker_peaks_kb"].items()
               if not run["worker_commands"].get(pid, "").startswith("/bin/sh")}
    rchar = probe["io"]["rchar"]
    own_rchar = rchar - probe["reaped_children_io"].get("rchar", 0)
    return {
        "config": config, "rows": rows, "shards": shards,
        "pipelines": len(probe["pipeline_starts_s"]),
        "wall_s": round(run["wall_s"], 2),
        # from each pipeline's start to the next one's (the last: to the end of the process)
        "pipeline_s": [round(b - a, 1) for a, b in zip(probe["pipeline_starts_s"],
                                                       probe["pipeline_starts_s"][1:] + [probe["seconds_in_process"]])],
        "curate_s": stats["this_run"]["elapsed_s"], "rows_per_s": round(rows / run["wall_s"], 3),
        "ms_per_row": round(1000 * run["wall_s"] / rows, 2),
        "launcher_hwm_mb": round(probe["status"]["VmHWM"] / 1024, 1),
        "launcher_rchar": own_rchar, "launcher_rchar_with_reaped_children": rchar,
        "launcher_read_bytes": probe["io"]["read_bytes"] - probe["reaped_children_io"].get("read_bytes", 0),
        "launcher_children_reaped": probe["reaped_children_io"].get("children", 0),
        "launcher_fs_read": by_kind, "launcher_files_opened": sum(probe["opened"].values()),
        "launcher_listings": sum(probe["listed"].values()), "launcher_s3_fetched": sum(probe["s3_fetched"].values()),
        "worker_processes": len(workers),
        "worker_peak_mb": round(max(workers.values()) / 1024, 1) if workers else None,
        "runner_service_peak_mb": round(runner_peak_kb / 1024, 1) if runner_peak_kb else None,
        "counts": {k: stats[k] for k in ("input_rows", "kept", "dropped", "errors")},
        "load_before": round(run["load_before"], 2), "load_after": round(run["load_after"], 2),
    }


def run_config(args, config: str, rows: int, models: dict, shards: list[Path], s3=None) -> dict:
    run_dir = args.out / "runs" / f"{config}_{rows}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    local_inputs = inputs_of(args.out, shards, rows, args.rows_per_shard)
    inputs, out = str(local_inputs), str(run_dir / "out")
    runner = args.s3_runner if config == "s3" else config
    extra, env = [], {}
    if s3 is not None:
        from s3_server import upload_dir

        s3.use()
        inputs, out = s3.url(f"scale/{rows}/in"), s3.url(f"scale/{rows}/out-{time.time_ns()}")
        upload_dir(local_inputs, inputs)
        extra = s3.args
        # FnApiRunner starts its SDK worker processes without the pipeline's options (their
        # PIPELINE_OPTIONS come from an empty provision info), so their FileSystems do not know
        # --s3_endpoint_url; boto3 falls back to this variable (the credentials are in the
        # environment already, tests/s3_server.py).
        env["AWS_ENDPOINT_URL_S3"] = s3.endpoint_url
    argv = curate_args(args, models, f"{inputs}/*.parquet", out)
    runner_peak = None
    if runner == "portable2":  # SDK workers: children of the pool; the job service runs the runner
        with portable_services(run_dir / "services", workers=2) as (beam_args, job_pid, pool_pid):
            run = run_launcher(argv + beam_args + extra, run_dir, lambda _: [pool_pid], "SdkHarness")
            runner_peak = proc_status(job_pid).get("VmHWM")
    else:  # fnapi2: SDK workers are the launcher's children (fnapi1: none, it is its own worker)
        run = run_launcher(argv + runner_args(runner) + extra, run_dir, lambda pid: [pid], "sdk_worker_main", env)
    stats = read_stats(out)
    if s3 is None:
        for folder in ("shards", "errors"):  # the rows are not needed after the counts: free the disk
            shutil.rmtree(Path(out) / folder, ignore_errors=True)
    entry = summarise(config, rows, rows // args.rows_per_shard, run, stats, inputs, out, runner_peak)
    print(json.dumps(entry), flush=True)
    return entry


# --- the figures and the goals ----------------------------------------------------------------

def slope_ms(a: dict, b: dict) -> float:
    """Marginal milliseconds per row between two sizes of one configuration (fixed costs cancel)."""
    return 1000 * (b["wall_s"] - a["wall_s"]) / (b["rows"] - a["rows"])


def goals(entries: list[dict], input_bytes: dict[int, int]) -> dict:
    """The steady-state time per row, the fixed cost, and pass/fail of the three goals for one
    configuration's sizes (smallest against largest)."""
    runs = sorted(entries, key=lambda e: e["rows"])
    small, large = runs[0], runs[-1]
    out = {"sizes": [e["rows"] for e in runs]}
    if len(runs) < 2:
        return out
    steady = slope_ms(small, large)
    out["steady_ms_per_row"] = round(steady, 2)
    out["fixed_s"] = round(small["wall_s"] - small["rows"] * steady / 1000, 1)
    if len(runs) >= 3:
        first, last = slope_ms(runs[0], runs[1]), slope_ms(runs[-2], runs[-1])
        out["time_per_row"] = {"marginal_ms_first": round(first, 2), "marginal_ms_last": round(last, 2),
                               "change": round(last / first - 1, 4), "pass": abs(last / first - 1) <= FLAT}
    grew = large["launcher_rchar"] - small["launcher_rchar"]
    per_shard = grew / (large["shards"] - small["shards"])
    out["launcher_bytes"] = {
        "rchar": [small["launcher_rchar"], large["launcher_rchar"]],
        "rchar_growth_per_extra_shard": round(per_shard),
        "input_file_reads_per_shard": [small["launcher_fs_read"]["input"] // small["shards"],
                                       large["launcher_fs_read"]["input"] // large["shards"]],
        "input_bytes": [input_bytes[small["rows"]], input_bytes[large["rows"]]],
        "growth_over_data_growth": round(grew / (input_bytes[large["rows"]] - input_bytes[small["rows"]]), 4),
        "pass": per_shard <= PER_SHARD_READ_BOUND}
    hwm = [small["launcher_hwm_mb"], large["launcher_hwm_mb"]]
    out["launcher_memory"] = {"peak_mb": hwm, "change": round(hwm[1] / hwm[0] - 1, 4),
                              "pass": hwm[1] <= (1 + FLAT) * hwm[0]}
    return out


def portable_overhead(entries: list[dict]) -> dict:
    """PortableRunner (2 SDK workers) against FnApiRunner (2 worker processes), per size and marginal."""
    by = {(e["config"], e["rows"]): e for e in entries}
    sizes = sorted({e["rows"] for e in entries if ("portable2", e["rows"]) in by and ("fnapi2", e["rows"]) in by})
    out = {str(n): round(by["portable2", n]["wall_s"] / by["fnapi2", n]["wall_s"], 3) for n in sizes}
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        out["marginal"] = round(slope_ms(by["portable2", lo], by["portable2", hi])
                                / slope_ms(by["fnapi2", lo], by["fnapi2", hi]), 3)
    return out


def table(entries: list[dict]) -> str:
    head = ("| config | rows | shards (pipelines) | wall s | rows/s | ms/row | launcher peak MiB | "
            "launcher rchar MiB | launcher read_bytes MiB | launcher input-file reads MiB | SDK workers | "
            "worker peak MiB | job service peak MiB | kept / dropped / errors | load before→after |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    mb = 1024 * 1024
    for e in entries:
        c = e["counts"]
        lines.append(
            f"| {e['config']} | {e['rows']} | {e['shards']} ({e['pipelines']}) | {e['wall_s']:.1f} | "
            f"{e['rows_per_s']:.2f} | {e['ms_per_row']:.1f} | {e['launcher_hwm_mb']:.0f} | "
            f"{e['launcher_rchar'] / mb:.1f} | {e['launcher_read_bytes'] / mb:.1f} | "
            f"{e['launcher_fs_read']['input'] / mb:.2f} | {e['worker_processes']} | "
            f"{e['worker_peak_mb'] or '–'} | {e['runner_service_peak_mb'] or '–'} | "
            f"{c['kept']} / {c['dropped']} / {c['errors']} | {e['load_before']}→{e['load_after']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="input rows per run, multiples of --rows-per-shard (default: 1000 3000 10000)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="runner configurations (see the module docstring)")
    parser.add_argument("--rows-per-shard", type=int, default=None, help="rows per input shard (default: 500)")
    parser.add_argument("--s3-rows", type=int, default=None,
                        help="input rows of the s3 configuration (default: 3000)")
    parser.add_argument("--s3-runner", choices=("fnapi1", "fnapi2"), default="fnapi2",
                        help="runner configuration of the s3 run (the worker pool's SDK workers start "
                             "without pipeline options: their FileSystems cannot reach a local S3)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "capfilt-bench-scale",
                        help="work folder: models, inputs, one folder per run (logs, probe), results.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke variant: --sizes 40 80 200 --rows-per-shard 20 --s3-rows 40 unless given")
    parser.add_argument("--num-captions", type=int, default=2, help="curate --num-captions")
    parser.add_argument("--max-length", type=int, default=10, help="curate --max-length")
    parser.add_argument("--min-length", type=int, default=4, help="curate --min-length")
    parser.add_argument("--batch-size", type=int, default=8, help="curate --batch-size")
    parser.add_argument("--precision", default="fp32", help="curate --precision")
    parser.add_argument("--torch-threads", type=int, default=1, help="curate --torch-threads (per worker)")
    parser.add_argument("--shards-per-pipeline", type=int, default=None,
                        help="curate --shards-per-pipeline; None: curate's own default")
    parser.add_argument("--no-images", action="store_true",
                        help="curate --no-images; without it curated shards carry the jpg bytes, as in production")
    args = parser.parse_args(argv)
    defaults = ([40, 80, 200], 20, 40) if args.quick else ([1000, 3000, 10000], 500, 3000)
    args.sizes = args.sizes or defaults[0]
    args.rows_per_shard = args.rows_per_shard or defaults[1]
    args.s3_rows = args.s3_rows or defaults[2]
    for rows in [*args.sizes, args.s3_rows]:
        if rows % args.rows_per_shard:
            parser.error(f"{rows} rows is not a multiple of --rows-per-shard {args.rows_per_shard}")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    from bench_curate import tiny_models

    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
              "cpus": os.cpu_count(), "runs": []}
    models = tiny_models(args.out)
    shards = world_shards(args.out, max([*args.sizes, args.s3_rows]), args.rows_per_shard)
    input_bytes = {n: sum(p.stat().st_size for p in shards[: n // args.rows_per_shard])
                   for n in {*args.sizes, args.s3_rows}}
    for rows in args.sizes:
        for config in (c for c in args.configs if c != "s3"):
            report["runs"].append(run_config(args, config, rows, models, shards))
    if "s3" in args.configs:
        from s3_server import s3_server

        with s3_server() as s3:
            report["runs"].append(run_config(args, "s3", args.s3_rows, models, shards, s3))
    report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report["input_bytes"] = input_bytes
    report["goals"] = {c: goals([e for e in report["runs"] if e["config"] == c], input_bytes)
                       for c in args.configs if c != "s3"}
    report["portable_over_fnapi2"] = portable_overhead(report["runs"])
    by = {(e["config"], e["rows"]): e for e in report["runs"]}
    if ("s3", args.s3_rows) in by and (args.s3_runner, args.s3_rows) in by:
        s3_run, local_run = by["s3", args.s3_rows], by[args.s3_runner, args.s3_rows]
        report["s3_over_local"] = round(s3_run["wall_s"] / local_run["wall_s"], 3)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(table(report["runs"]))
    for config, verdict in report["goals"].items():
        print(config, "; ".join(f"{goal}: {'pass' if verdict[goal]['pass'] else 'FAIL'}"
                                for goal in ("time_per_row", "launcher_bytes", "launcher_memory") if goal in verdict))
    print(json.dumps({k: report.get(k) for k in ("goals", "portable_over_fnapi2", "s3_over_local", "uptime_before",
                                                 "uptime_after")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
