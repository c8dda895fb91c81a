"""Rows out: one curated and one error parquet file per input shard, each written by the worker
that holds the shard's rows, with a receipt of what it wrote.

Each input shard gets exactly one curated file and one error file, in
``transforms.schemas.CURATED_SCHEMA`` / ``ERROR_SCHEMA``, under their final names
(``shards/part-<id>.parquet``, ``errors/part-<id>.parquet``). Rows are grouped per input shard
and sorted by input row, so the files do not depend on batch size, worker count or bundle
order. The worker then writes the shard's *receipt* (``_staging/<run>/receipts/<id>.json``):
the input's size, sha256 and row count, each file's size, sha256 and row count, the counts
(``input rows == kept + dropped + errors`` checked here, on the rows written), and the device
and precision each model stage ran with. The launcher turns receipts into done markers once
the pipeline has succeeded (``pipeline.curate.state``): it never reads a data byte itself.

Why not ``parquetio.WriteToParquet``: its finalize step renames temporary files into place,
which on object stores is a copy and a delete (not atomic, and every byte again); it knows
nothing of input shards, so one file per shard took a sink per shard; and it reports no
checksum of what it wrote. Here pyarrow's ``ParquetWriter`` streams each shard's rows through
``pipeline.files.written``, which hashes the bytes on their way to Beam's ``FileSystems``.
"""
from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.pipeline.curate.record import check_identity
from capfilt.pipeline.curate.sources import ShardInfo
from capfilt.pipeline.files import BEAM, file_sha256, written
from capfilt.transforms.files import atomic
from capfilt.transforms.rows import ErrorRow
from capfilt.transforms.schemas import CURATED_SCHEMA, ERROR_SCHEMA

ROW_GROUP = 512  # rows per parquet row group (images included: about 15 MB at 30 kB each)
COUNT_KEYS = ("input_rows", "kept", "dropped", "errors", "drop_reasons", "error_types")


@dataclass(frozen=True)
class ShardTarget:
    """Where one input shard's outputs go: its two files (final names) and its receipt."""

    shard: ShardInfo
    curated: str
    errors: str
    receipt: str


def write_parquet(path: str, records: list[dict], schema: pa.Schema) -> dict:
    """Write ``records`` (in order) to ``path`` as one parquet file; its size, sha256 and rows,
    counted on the way out. A list without records gives a file with the schema and no rows."""
    with written(path) as stream:
        with pq.ParquetWriter(stream, schema, compression="none") as writer:
            for start in range(0, len(records), ROW_GROUP):
                writer.write_table(pa.Table.from_pylist(records[start:start + ROW_GROUP], schema=schema))
            if not records:
                writer.write_table(schema.empty_table())
    return {"size": stream.size, "sha256": stream.sha256, "rows": len(records)}


def record_counts(curated: list[dict], errors: list[dict], input_rows: int) -> dict:
    """The counts of a shard's rows as written."""
    reasons = Counter(r["drop_reason"] for r in curated if r["drop_reason"])
    kinds = Counter(f"{e['stage']}/{e['error_type']}" for e in errors)
    kept = sum(1 for r in curated if r["keep"])
    return {
        "input_rows": input_rows,
        "kept": kept,
        "dropped": len(curated) - kept,
        "errors": len(errors),
        "drop_reasons": dict(sorted(reasons.items())),
        "error_types": dict(sorted(kinds.items())),
    }


class WriteShardFn(beam.DoFn):
    """(shard ordinal, tagged rows) -> the shard's two files and its receipt; yields the shard id.

    A retried bundle writes the same bytes again (rows are sorted, models are seeded), so a
    retry or a duplicate attempt leaves the same files."""

    def __init__(self, targets: dict[int, ShardTarget]):
        self._targets = targets

    def process(self, item):
        ordinal, tagged = item
        target = self._targets[ordinal]
        shard = target.shard
        curated, errors, ran_on = [], [], {}
        for tag, row, record, stages in tagged:
            if tag == "curated":
                curated.append((row, record))
                for stage, used in stages:
                    ran_on.setdefault(stage, set()).add(used)
            elif tag == "error":
                errors.append((row, record))
        curated = [r for _, r in sorted(curated, key=lambda t: t[0])]
        errors = [r for _, r in sorted(errors, key=lambda t: t[0])]
        counts = record_counts(curated, errors, shard.num_rows)
        check_identity(counts, f"shard {shard.path}")
        receipt = {
            "shard_id": shard.shard_id,
            "input": {"path": shard.path, "name": os.path.basename(shard.path.rstrip("/")), "size": shard.size,
                      "sha256": file_sha256(shard.path), "rows": shard.num_rows, "format": shard.fmt},
            "curated": dict(write_parquet(target.curated, curated, CURATED_SCHEMA),
                            name=os.path.basename(target.curated), path=f"shards/{os.path.basename(target.curated)}"),
            "errors": dict(write_parquet(target.errors, errors, ERROR_SCHEMA),
                           name=os.path.basename(target.errors), path=f"errors/{os.path.basename(target.errors)}"),
            "counts": counts,
            "ran_on": {stage: sorted(used) for stage, used in sorted(ran_on.items())},
            "written_by": f"{socket.gethostname()}:{os.getpid()}",
        }
        atomic.write_json(target.receipt, receipt, BEAM, indent=2, sort_keys=True, end="\n")
        yield shard.shard_id


def _curated_item(t):
    shard, row, record, ran_on = t
    return shard, ("curated", row, record, ran_on)


def _error_item(t):
    shard, row, record = t
    return shard, ("error", row, record, ())


class WriteShards(beam.PTransform):
    """(curated (shard, row, record, ran_on), error records (shard, row, record)) -> shard ids
    written. Every target shard is written, also one without rows (empty files)."""

    def __init__(self, targets: dict[int, ShardTarget]):
        super().__init__()
        self._targets = targets

    def expand(self, pcolls):
        curated, errors = pcolls
        every = (curated.pipeline
                 | "EveryShard" >> beam.Create([(o, ("shard", -1, None, ())) for o in sorted(self._targets)]))
        return (
            (curated | "TagCurated" >> beam.Map(_curated_item),
             errors | "TagErrors" >> beam.Map(_error_item),
             every)
            | "AllRows" >> beam.Flatten()
            | "ByShard" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(WriteShardFn(self._targets))
        )


def _error_record(e: ErrorRow):
    return e.shard, e.row, e.record()


def error_records(errors):
    """PCollection[ErrorRow] -> (shard, row, record) for WriteShards."""
    return errors | "ErrorRecords" >> beam.Map(_error_record)
