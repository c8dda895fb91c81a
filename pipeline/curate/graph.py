"""The curate graph and the incremental run around it.

Graph (one Beam pipeline per group of up to ``--shards-per-pipeline`` input shards)::

    shards ─Read─┬─ samples ─Dedup─Reshuffle─Decode─Caption─Filter─Rank─Select─▶ curated shards
                 └─ errors (status != success, bad keys, duplicates, decode, model, select) ─▶ error shards

Incremental runs. Output is per input shard, and a shard counts as done only once its done
marker exists, which is written last:

1. the pipeline writes the shard's curated and error files under ``<out>/_staging/``;
2. after the pipeline has succeeded, their schemas are checked, their rows counted, and
   ``input rows == kept + dropped + errors`` is checked against the files (which decide) and
   against Metrics where the runner reports them;
3. the two files are renamed into ``shards/`` and ``errors/`` (same names on every run);
4. ``_state/<shard>.json`` is written (to a temporary name, then renamed).

A run killed anywhere (kill -9) leaves at most staging files and output files without a marker;
the next run deletes both and redoes those shards, so rows are neither lost nor duplicated.
Shards with a marker are skipped while their two output files are intact (``state.OutStore``);
a deleted or changed output makes the shard pending again. ``--overwrite`` deletes the previous
output (once the models, the device and the new input have passed their checks) and starts
again. Settings that change rows (models and their hashes, thresholds, seeds, precision, ...)
are recorded at the first run; resuming with different ones is refused once a shard is done.
A non-empty ``--out`` that no curate run wrote is refused, with or without ``--overwrite``.

Other runners. Local paths are made absolute before anything else (workers have their own
working directories), and the runner is created before --out is touched, so a refused runner
leaves no trace; with a runner that is not local, the workers decide --device and "auto"
precision (options.py, model_checks.py).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from capfilt.pipeline.curate import progress, state
from capfilt.pipeline.curate.model_checks import check_models
from capfilt.pipeline.curate.decode import DecodeImages, ResolveDuplicateKeys
from capfilt.pipeline.curate.inference import CaptionHandler, FilterHandler, InferStage, RankHandler
from capfilt.pipeline.curate.options import (
    is_local_runner,
    make_pipeline_options,
    make_runner,
    num_workers,
    processes_per_machine,
    runner_name,
)
from capfilt.pipeline.curate.curated import SelectCaptions
from capfilt.pipeline.curate.record import UNTRAINED, build_stats, check_identity, metric_counters, untrained_models
from capfilt.pipeline.curate.sinks import WriteShards, error_records
from capfilt.pipeline.curate.sources import ReadRows, discover_shards, validate_shard

LOG = logging.getLogger(__name__)


class CurateRows(beam.PTransform):
    """PCollection[Sample] (read, deduplicated) -> ((shard, row, curated record), ErrorRows):
    decode, then the model stages, then the selection rule."""

    def __init__(self, cfg, model_hashes=None):
        super().__init__()
        self._cfg = cfg
        self._hashes = model_hashes or {}  # {spec: sha256} of models copied from object storage

    def expand(self, samples):
        cfg, hashes = self._cfg, self._hashes
        samples, decode_errors = samples | "Decode" >> DecodeImages(cfg)
        errors = [decode_errors]
        stages = []
        if cfg.use_captioner:
            stages.append(("Caption", CaptionHandler(cfg.captioner, cfg, hashes.get(cfg.captioner))))
        if cfg.use_filter:
            stages.append(("Filter", FilterHandler(cfg.filter, cfg, hashes.get(cfg.filter))))
        stages.append(("Rank", RankHandler(cfg.clip, cfg, hashes.get(cfg.clip))))
        for name, handler in stages:
            samples, stage_errors = samples | name >> InferStage(handler)
            errors.append(stage_errors)
        curated, select_errors = samples | "Select" >> SelectCaptions(cfg)
        errors.append(select_errors)
        return curated, errors | "StageErrors" >> beam.Flatten()


class CurateShards(beam.PTransform):
    """PBegin -> shard ids written: read `shards`, curate, write one curated + one error file
    and a receipt per shard to ``targets[ordinal]`` (``sinks.ShardTarget``)."""

    def __init__(self, shards, cfg, targets, prior_curated=(), prior_errors=(), progress_dir=None, model_hashes=None):
        super().__init__()
        self._shards, self._cfg, self._targets = list(shards), cfg, targets
        self._prior = (list(prior_curated), list(prior_errors))
        self._progress_dir = progress_dir
        self._model_hashes = model_hashes or {}

    def expand(self, pbegin):
        samples, read_errors = (
            pbegin
            | "Shards" >> beam.Create(self._shards)
            | "SpreadShards" >> beam.Reshuffle()
            | "Read" >> ReadRows()
        )
        samples, dup_errors = samples | "Dedup" >> ResolveDuplicateKeys(*self._prior)
        # Spread rows over workers before the heavy stages (a shard is read by one worker).
        samples = samples | "SpreadRows" >> beam.Reshuffle()
        curated, stage_errors = samples | "Curate" >> CurateRows(self._cfg, self._model_hashes)
        errors = (read_errors, dup_errors, stage_errors) | "AllErrors" >> beam.Flatten()
        records = error_records(errors)
        if self._progress_dir:
            curated = curated | "ProgressKept" >> beam.ParDo(progress.Tap(self._progress_dir, "curated"))
            records = records | "ProgressErrors" >> beam.ParDo(progress.Tap(self._progress_dir, "errors"))
        return (curated, records) | "Write" >> WriteShards(self._targets)


@dataclass
class CurateResult:
    out: str
    stats: dict
    processed: list[str]
    skipped: list[str]


def _groups(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_curate(cfg, beam_args: list[str] | None = None) -> CurateResult:
    """Curate every input shard not yet done in ``cfg.out``; returns the run's stats."""
    options = make_pipeline_options(beam_args)
    make_runner(options)  # a runner that cannot be created is refused before --out is touched
    FileSystems.set_options(options)  # the launcher's own reads and writes (s3 endpoint, credentials)
    local = is_local_runner(options)
    cfg = cfg.absolute().replace(worker_processes=processes_per_machine(options))
    started = time.monotonic()
    store = state.OutStore(cfg.out)
    # Before --out is created, locked or cleaned: a model or device that cannot work would
    # otherwise fail the run only after --overwrite had deleted the previous output.
    model_hashes = check_models(cfg, local)
    store.check_is_curate_output()  # before the lock file: a refused directory is left as it was
    with store.locked():
        shards = discover_shards(cfg.inputs)
        settings = state.settings_record(cfg, local, model_hashes)
        for model in untrained_models(settings):
            LOG.warning("--%s %s", model, UNTRAINED)
        # A marker counts only while its output files are intact; the others are redone.
        done = {} if cfg.overwrite else store.without_renamed(store.intact(store.markers()), shards)
        if not cfg.overwrite:
            store.check_settings(settings, done)
        pending, skipped = [], []
        for shard in shards:
            (skipped if store.is_done(shard, done) else pending).append(shard)
        # Up front, before any work (and before --overwrite deletes anything): every pending
        # shard's schema, and its row count.
        pending = [validate_shard(s) for s in pending]
        if cfg.overwrite:
            store.reset()
        store.clean_incomplete(done)
        store.save_settings(settings)
        run_counts = {"input_rows": 0, "kept": 0, "dropped": 0, "errors": 0}
        rescored = {"filter": 0, "rank": 0}  # images re-scored in fp32 (pipeline.precision)
        total = sum(s.num_rows for s in pending)
        LOG.info("curate: %d input shards, %d done earlier, %d to do (%d rows); runner %s, %d worker(s)",
                 len(shards), len(skipped), len(pending), total, runner_name(options), num_workers(options))
        reporter = progress.Reporter(total, cfg.progress_every) if local else None
        try:
            for group in _groups(pending, cfg.shards_per_pipeline):
                counts = _run_group(group, cfg, options, store, reporter, model_hashes, done)
                for k in run_counts:
                    run_counts[k] += counts[k]
                for k in rescored:  # unknown (None) once a group had no Metrics
                    got = counts["fp32_rescored"]
                    rescored[k] = None if rescored[k] is None or got is None else rescored[k] + got[k]
        finally:
            if reporter:
                reporter.stop()
        elapsed = time.monotonic() - started
        run = dict(run_counts, shards_processed=len(pending), shards_skipped=len(skipped),
                   elapsed_s=round(elapsed, 3),
                   rows_per_s=round(run_counts["input_rows"] / elapsed, 3) if elapsed > 0 else 0.0,
                   runner=runner_name(options), workers=num_workers(options), batch_size=cfg.batch_size,
                   precision=settings["settings"]["precision"], fp32_rescored=rescored,
                   model_sharing=cfg.model_sharing())
        store.remove(store.staging_root)
        markers = list(store.markers().values())
        stats = build_stats(markers, run if pending else store.last_run() or run)
        record = state.manifest(cfg, settings, markers)
        if not pending:  # no row was curated now: the rows are still the earlier code's
            record["code_version"] = store.last_code_version() or record["code_version"]
        store.write_record(stats, record)
    return CurateResult(cfg.out, stats, [s.shard_id for s in pending], [s.shard_id for s in skipped])


# Runners whose committed Metrics miss increments: BundleBasedDirectRunner keeps the counter
# updates of one bundle per step (a Flatten of 3 + 2 elements counts 3), so its Metrics are
# not compared with the written files (which are checked against every input shard's row count).
METRICS_INCOMPLETE = ("BundleBasedDirectRunner",)


def _run_group(group, cfg, options, store, reporter, model_hashes, done: dict) -> dict:
    """Curate one group of shards in one pipeline and commit their markers (added to ``done``,
    the run's done markers, whose files the duplicate-key check reads as earlier rows)."""
    staging = store.staging_dir(uuid.uuid4().hex[:12])
    targets = {s.ordinal: store.target(staging, s) for s in group}
    prior_curated, prior_errors = store.completed_files(done)
    progress_dir = None
    if reporter:  # inside the staging dir when local, so a killed run's counters are cleaned too
        progress_dir = os.path.join(staging, "progress") if store.local else tempfile.mkdtemp(prefix="capfilt-progress-")
        os.makedirs(progress_dir, exist_ok=True)
    if reporter:
        reporter.watch(progress_dir)
    try:
        pipeline = beam.Pipeline(runner=make_runner(options), options=options)
        _ = pipeline | "CapFilt" >> CurateShards(group, cfg, targets, prior_curated, prior_errors, progress_dir,
                                                 model_hashes)
        result = pipeline.run()
        result.wait_until_finish()
        if reporter:
            reporter.unwatch(progress_dir)
        metrics = metric_counters(result)  # None: the runner reports none
        # Each shard's receipt against the plan and its files' listed sizes: the check that decides.
        markers = {s.shard_id: store.commit(targets[s.ordinal]) for s in group}
        done.update(markers)
        counts = {key: sum(m["counts"][key] for m in markers.values()) for key in ("input_rows", "kept", "dropped", "errors")}
        if metrics is not None and runner_name(options) not in METRICS_INCOMPLETE:
            from_metrics = {key: metrics.get(key, 0) for key in counts}
            check_identity(from_metrics, f"Beam Metrics of shards {[s.path for s in group]}")
            for key in counts:
                if from_metrics[key] != counts[key]:
                    raise RuntimeError(f"{key}: Beam Metrics count {from_metrics[key]} but the written files "
                                       f"hold {counts[key]} (shards {[s.path for s in group]})")
        counts["fp32_rescored"] = (None if metrics is None else
                                   {k: metrics.get(f"{k}_fp32_rescored", 0) for k in ("filter", "rank")})
        return counts
    finally:
        store.remove(staging)
        if progress_dir:
            store.remove(progress_dir)
