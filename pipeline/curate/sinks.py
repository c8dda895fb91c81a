"""Rows out: curated and error shards through ``WriteToParquet``, and the run record.

* **Shards.** Each input shard gets exactly one curated shard and one error shard, in
  ``transforms.schemas.CURATED_SCHEMA`` / ``ERROR_SCHEMA``. Rows are grouped per input shard
  and sorted by input row before ``WriteToParquet`` (one file per shard), so the files do
  not depend on batch size, worker count or bundle order. Files are written to a staging
  prefix; :mod:`pipeline.curate` moves them into place once the pipeline has succeeded.
* **Run record.** ``stats.json`` (counts; the identity ``input_rows = kept + dropped +
  errors`` is checked before it is written) and ``manifest.json`` (models and their content
  hashes, settings, code version, input and output shards with hashes), built from Beam's
  Metrics of this run and from the files on disk.
"""
from __future__ import annotations

import os
import subprocess
from collections import Counter

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import WriteToParquet
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter

from capfilt.pipeline.curate.select import select_captions
from capfilt.pipeline.curate.sources import NAMESPACE, ErrorRow, Sample
from capfilt.transforms.files.hashing import bytes_sha256, dir_sha256, file_sha256
from capfilt.transforms.schemas import CURATED_SCHEMA, ERROR_SCHEMA


def _floats(values):
    return None if values is None else [float(v) for v in values]


def curated_record(sample: Sample, cfg) -> dict:
    """One curated row (CURATED_SCHEMA order) with the selection applied."""
    sel = select_captions(
        sample.web_caption, sample.synthetic, sample.web_itm, sample.synthetic_itm,
        sample.web_clip, sample.synthetic_clip,
        itm_threshold=cfg.itm_threshold, keep_top=cfg.keep_top, use_filter=cfg.use_filter,
    )
    return {
        "key": sample.key,
        "url": sample.url,
        "sha256": sample.sha256 or bytes_sha256(sample.jpg),
        "jpg": None if cfg.no_images else sample.jpg,
        "width": sample.width,
        "height": sample.height,
        "web_caption": sample.web_caption,
        "web_itm": sample.web_itm,
        "web_itc": sample.web_itc,
        "web_clip": sample.web_clip,
        "synthetic_captions": list(sample.synthetic),
        "synthetic_itm": _floats(sample.synthetic_itm),
        "synthetic_itc": _floats(sample.synthetic_itc),
        "synthetic_clip": _floats(sample.synthetic_clip),
        "captions": sel.captions,
        "caption_sources": sel.sources,
        "keep": sel.keep,
        "drop_reason": sel.drop_reason,
        "round": cfg.round,
        "seed": sample.seed,
    }


def _finish(sample: Sample, cfg):
    record = curated_record(sample, cfg)
    Metrics.counter(NAMESPACE, "kept" if record["keep"] else "dropped").inc()
    return sample.shard, sample.row, record


def _select_error(dead_letter) -> ErrorRow:
    sample, (exc_type, exc_repr, _tb) = dead_letter
    Metrics.counter(NAMESPACE, "select_errors").inc()
    return ErrorRow(sample.key, sample.url, "select", getattr(exc_type, "__name__", "Error"), exc_repr,
                    sample.shard, sample.row)


class SelectCaptions(beam.PTransform):
    """PCollection[Sample] -> ((shard, row, curated record), ErrorRows)."""

    def __init__(self, cfg):
        super().__init__()
        self._cfg = cfg

    def expand(self, samples):
        good, bad = samples | "Select" >> beam.Map(_finish, self._cfg).with_exception_handling()
        return good, bad | "SelectErrors" >> beam.Map(_select_error)


def _sorted_records(item):
    _shard, rows = item
    for _row, record in sorted(rows, key=lambda r: r[0]):
        yield record


class WriteShards(beam.PTransform):
    """Write one parquet file per input shard.

    ``targets``: {shard ordinal: file path without suffix}; ``.parquet`` is appended. Input:
    (shard ordinal, row index, record dict). A shard without rows gets an empty file.
    """

    def __init__(self, targets: dict[int, str], schema):
        super().__init__()
        self._order = sorted(targets)
        self._targets = targets
        self._schema = schema

    def expand(self, rows):
        index = {ordinal: i for i, ordinal in enumerate(self._order)}
        parts = (
            rows
            | "ByShard" >> beam.Map(lambda t: (t[0], (t[1], t[2])))
            | "GroupShard" >> beam.GroupByKey()
            | "Split" >> beam.Partition(lambda kv, n: index[kv[0]], len(self._order))
        )
        for i, ordinal in enumerate(self._order):
            _ = (
                parts[i]
                | f"Sort{ordinal}" >> beam.FlatMap(_sorted_records)
                | f"Write{ordinal}" >> WriteToParquet(
                    self._targets[ordinal], schema=self._schema, num_shards=1,
                    shard_name_template="", file_name_suffix=".parquet",
                )
            )
        return beam.pvalue.PDone(rows.pipeline)


def error_rows(errors):
    """PCollection[ErrorRow] -> (shard, row, record) for WriteShards (counted in Metrics)."""

    def _record(e: ErrorRow):
        Metrics.counter(NAMESPACE, "errors").inc()
        Metrics.counter(NAMESPACE, f"errors_{e.stage}").inc()
        return e.shard, e.row, e.record()

    return errors | "ErrorRecords" >> beam.Map(_record)


# --- the run record ---------------------------------------------------------------------------


def output_counts(curated_path: str, errors_path: str) -> dict:
    """Counts read back from one shard's written files (not from the pipeline)."""
    with FileSystems.open(curated_path) as f:
        cur = pq.read_table(f, columns=["keep", "drop_reason"])
    with FileSystems.open(errors_path) as f:
        err = pq.read_table(f, columns=["stage", "error_type"])
    keep = cur.column("keep").to_pylist()
    reasons = Counter(r for r in cur.column("drop_reason").to_pylist() if r)
    kinds = Counter(f"{s}/{t}" for s, t in zip(err.column("stage").to_pylist(), err.column("error_type").to_pylist()))
    return {
        "curated_rows": cur.num_rows,
        "kept": sum(1 for k in keep if k),
        "dropped": sum(1 for k in keep if not k),
        "errors": err.num_rows,
        "drop_reasons": dict(sorted(reasons.items())),
        "error_types": dict(sorted(kinds.items())),
    }


def check_schema(path: str, schema) -> None:
    with FileSystems.open(path) as f:
        have = pq.read_schema(f)
    if not have.equals(schema, check_metadata=False):
        raise RuntimeError(f"{path}: written schema differs from the contract:\n{have}\nexpected:\n{schema}")


def metric_counters(result) -> dict[str, int]:
    """Committed ``capfilt`` counters of a finished pipeline, summed over steps."""
    totals: Counter = Counter()
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        totals[counter.key.metric.name] += int(counter.committed or 0)
    return dict(totals)


def check_identity(counts: dict, where: str) -> None:
    """Fail loudly unless input_rows == kept + dropped + errors."""
    lhs = counts["input_rows"]
    rhs = counts["kept"] + counts["dropped"] + counts["errors"]
    if lhs != rhs:
        raise RuntimeError(
            f"accounting mismatch in {where}: input_rows {lhs} != kept {counts['kept']} + dropped "
            f"{counts['dropped']} + errors {counts['errors']} = {rhs}"
        )


def model_record(spec: str | None) -> dict | None:
    """A model's id and a content hash: sha256 over a local directory's files (relative path
    + bytes) or a local weights file; None for a hub id or an open_clip pretrained tag."""
    if spec is None:
        return None
    path = spec.split(":", 1)[1] if ":" in spec and not os.path.exists(spec) else spec
    if os.path.isdir(path):
        return {"id": spec, "sha256": dir_sha256(path), "kind": "directory"}
    if os.path.isfile(path):
        return {"id": spec, "sha256": file_sha256(path), "kind": "file"}
    return {"id": spec, "sha256": None, "kind": "hub"}


def code_version() -> str:
    """``git describe`` of the source tree when it is a checkout, else the package version."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty", "--tags"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"capfilt=={version('capfilt')}"
        except PackageNotFoundError:
            return "unknown"


def build_stats(markers: list[dict], run: dict) -> dict:
    """stats.json: totals over every completed shard (from the files) plus this run's part
    (from Beam Metrics). Raises when either side breaks the identity."""
    totals = {"input_rows": 0, "kept": 0, "dropped": 0, "errors": 0}
    reasons: Counter = Counter()
    kinds: Counter = Counter()
    for m in markers:
        for k in totals:
            totals[k] += m["counts"][k]
        reasons.update(m["counts"]["drop_reasons"])
        kinds.update(m["counts"]["error_types"])
    check_identity(totals, "the curated output (files)")
    stats = dict(totals)
    stats.update(
        drop_reasons=dict(sorted(reasons.items())),
        error_types=dict(sorted(kinds.items())),
        shards=len(markers),
        this_run=run,
    )
    return stats
