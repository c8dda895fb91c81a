"""Rows out: curated and error shards through ``WriteToParquet``, and their counts read back.

Each input shard gets exactly one curated shard and one error shard, in
``transforms.schemas.CURATED_SCHEMA`` / ``ERROR_SCHEMA``. Rows are grouped per input shard and
sorted by input row before ``WriteToParquet`` (one file per shard), so the files do not depend
on batch size, worker count or bundle order. Files are written to a staging prefix;
:mod:`pipeline.curate` moves them into place once the pipeline has succeeded, after
:func:`check_schema` and :func:`output_counts` have read them back.
"""
from __future__ import annotations

from collections import Counter

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import WriteToParquet

from capfilt.transforms.rows import ErrorRow


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


def _error_record(e: ErrorRow):
    return e.shard, e.row, e.record()


def error_records(errors):
    """PCollection[ErrorRow] -> (shard, row, record) for WriteShards."""
    return errors | "ErrorRecords" >> beam.Map(_error_record)


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
