"""`capfilt ingest`: a URL list becomes raw shards, downloaded by img2dataset.

``img2dataset.download`` does the work (HTTP, retries, resizing, hashing, sharding, its own
incremental mode); this module

* detects the list's format (parquet, csv, tsv, txt, json, ...; from the file name) and checks
  up front that it has the URL and caption columns, naming the file and the column when not;
* turns pass-through command-line options (``--image_size 384``, ``--resize-mode=keep_ratio``,
  ``--retries 2`` ...) into ``download`` keyword arguments, typed from its signature, so every
  img2dataset option is available and a misspelt one is an error;
* keeps one ingest per ``--out`` (:class:`OutLock`) and runs ``download`` in a process of its
  own that leads a new process group, which img2dataset's logger and pool workers join; that
  process kills the group when capfilt dies (:func:`run_download`), so a killed ingest leaves
  no process writing into ``--out``;
* before resuming, drops the shards a killed run left unfinished (:func:`drop_unfinished_shards`)
  and refuses an ``--out`` downloaded with other settings; after ``download`` returns, checks
  the output against the URL list (:func:`verify_output`): img2dataset reports success even when
  a shard failed or a foreign process wrote into its file;
* sums img2dataset's per-shard ``*_stats.json`` into one summary;
* with ``--distributor pyspark``, runs ``download`` with a SparkSession of its own on
  ``--spark-master`` (:mod:`capfilt.pipeline.ingest.spark`).

Why code of our own around img2dataset: it starts its processes with the ``spawn`` method (no
file descriptor, so no ``flock``, reaches them) and offers no hook in them, so neither a lock
they inherit nor a parent-death signal (``PR_SET_PDEATHSIG``, which is per process and not
inherited) can be set through its options; a process group that a process of ours leads can be
killed as a whole. Its incremental mode takes a shard as done when its ``_stats.json`` exists,
without looking at the shard file, and its ``download`` returns normally when a shard failed.

Failed downloads stay in the shards as rows with ``status != "success"``; curate carries them to
its error output, so nothing in the URL list is lost.
"""
from __future__ import annotations

import functools
import glob
import inspect
import json
import logging
import math
import os
import typing
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from capfilt.pipeline.ingest.check import ShardLayout, download_settings, prepare_out, read_input_urls, verify_output
from capfilt.pipeline.ingest.lock import OutLock, run_download
from capfilt.pipeline.ingest.spark import download_on_spark, require_pyspark
from capfilt.transforms.files import outputs

LOG = logging.getLogger(__name__)

# file suffix -> img2dataset input_format
INPUT_FORMATS = {
    ".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv.gz", ".tsv": "tsv", ".tsv.gz": "tsv.gz",
    ".txt": "txt", ".txt.gz": "txt.gz", ".json": "json", ".json.gz": "json.gz", ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl.gz",
}
OUTPUT_FORMATS = ("parquet", "webdataset")
DISTRIBUTORS = ("multiprocessing", "pyspark")  # img2dataset's names
# download() arguments that IngestConfig sets from our own options
OWN_ARGUMENTS = {"url_list": "--url-list", "output_folder": "--out", "output_format": "--output-format",
                 "input_format": "--input-format", "url_col": "--url-col", "caption_col": "--caption-col",
                 "distributor": "--distributor"}


@dataclass(frozen=True)
class IngestConfig:
    """One ingest; the fields with a ``help`` are the `capfilt ingest` options."""

    url_list: str = field(metadata={"help": "the URL list", "metavar": "FILE"})
    out: str = field(metadata={"help": "output directory for the raw shards", "metavar": "DIR"})
    output_format: str = field(default="parquet", metadata={"help": "shard format", "choices": OUTPUT_FORMATS})
    input_format: str | None = field(default=None, metadata={
        "help": "img2dataset input format (parquet, csv, tsv, txt, json, ...); None: from the file name"})
    url_col: str = field(default="url", metadata={"help": "column holding the URLs"})
    caption_col: str | None = field(default="caption", metadata={"help": "column holding the captions ('' for none)"})
    distributor: str = field(default="multiprocessing", metadata={
        "help": "img2dataset's distributor: multiprocessing (--processes_count processes on this machine) or "
                "pyspark (one Spark task per shard, on --spark-master; needs pip install 'capfilt[spark]')",
        "choices": DISTRIBUTORS})
    spark_master: str | None = field(default=None, metadata={
        "help": "with --distributor pyspark: the Spark master URL (spark://HOST:7077, local[4], yarn, ...); "
                "default: Spark's own (spark.master in $SPARK_CONF_DIR/spark-defaults.conf, else $MASTER, "
                "else local[*]). Workers write the shards: --out must be at its path on every worker (a shared mount)",
        "metavar": "URL"})
    options: dict = field(default_factory=dict)  # further img2dataset.download arguments

    def __post_init__(self):
        if self.caption_col == "":
            object.__setattr__(self, "caption_col", None)
        if not os.path.isfile(self.url_list):
            raise ValueError(f"--url-list {self.url_list}: no such file")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"--output-format {self.output_format!r}: curate reads {OUTPUT_FORMATS}")
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"--distributor {self.distributor!r}: one of {DISTRIBUTORS}")
        if self.distributor == "pyspark":
            require_pyspark()
        elif self.spark_master is not None:
            raise ValueError(f"--spark-master {self.spark_master}: only with --distributor pyspark")
        check_download_options(self.options)


def check_download_options(options: dict) -> None:
    """img2dataset arguments that ``capfilt ingest`` sets from its own options may not be
    passed through (run-job checks a job file's ``ingest.options`` with this too)."""
    clash = sorted(set(options) & set(OWN_ARGUMENTS))
    if clash:
        raise ValueError(f"set {', '.join(OWN_ARGUMENTS[c] for c in clash)} instead of {clash}")


def detect_input_format(path: str) -> str:
    name = os.path.basename(path).lower()
    for suffix in sorted(INPUT_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return INPUT_FORMATS[suffix]
    raise ValueError(f"{path}: cannot tell the URL list's format from its name "
                     f"(known: {', '.join(sorted(INPUT_FORMATS))}); pass --input-format")


def list_columns(path: str, input_format: str, wanted=()) -> list[str] | None:
    """Column names of a URL list as img2dataset will see them (None for txt, which has none).

    A read error names the file (e.g. ``--input-format parquet`` on a csv file). ``wanted``:
    the columns the caller needs; a JSON lines list is read past its first block only when
    one of them is missing there (a field may first appear further down).
    """
    try:
        return _read_columns(path, input_format, wanted)
    except (pa.ArrowException, OSError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read it as a {input_format} URL list ({err})") from err


def _read_columns(path: str, input_format: str, wanted) -> list[str] | None:
    """The columns each format's img2dataset reader would produce, read the same way."""
    base = input_format.removesuffix(".gz")
    compression = "gzip" if input_format.endswith(".gz") else None
    if base == "parquet":
        return pq.read_schema(path).names
    if base == "txt":
        return None
    if base == "json":  # one JSON document, which img2dataset reads with pandas.read_json
        import pandas as pd

        return [str(c) for c in pd.read_json(path, compression=compression).columns]
    if base in ("csv", "tsv"):  # the header, parsed by pyarrow.csv as img2dataset does
        parse = pa_csv.ParseOptions(delimiter="," if base == "csv" else "\t")
        with pa.input_stream(path, compression=compression) as stream:
            return pa_csv.open_csv(stream, parse_options=parse).schema.names
    if base == "jsonl":  # pyarrow.json, as img2dataset; the first block is usually enough
        with pa.input_stream(path, compression=compression) as stream:
            names = pa_json.open_json(stream).schema.names
        if all(c in names for c in wanted if c):
            return names
        with pa.input_stream(path, compression=compression) as stream:
            return pa_json.read_json(stream).column_names
    raise ValueError(f"unknown input format {input_format!r} "
                     f"(known: {', '.join(sorted(set(INPUT_FORMATS.values())))})")


def check_url_list(cfg: IngestConfig, input_format: str) -> None:
    if input_format.startswith("txt") and cfg.caption_col:
        raise ValueError(f"{cfg.url_list}: a txt URL list has no caption column; pass --caption-col ''")
    columns = list_columns(cfg.url_list, input_format, wanted=(cfg.url_col, cfg.caption_col))
    if columns is None:
        return
    for flag, name in (("--url-col", cfg.url_col), ("--caption-col", cfg.caption_col)):
        if name and name not in columns:
            raise ValueError(f"{cfg.url_list}: no column {name!r} (has {columns}); set {flag}")


def _value_type(annotation):
    """The scalar type of a download() parameter: bool, int, float, str or list."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (list, typing.List):
        return list
    if args:  # Optional[X]
        return _value_type(args[0])
    return annotation if annotation in (bool, int, float, str) else str


def _convert(name: str, text: str, kind):
    if text.lower() == "none":
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind is list:
            return [t for t in text.split(",") if t]
        if kind is float:
            return math.inf if text.lower() == "inf" else float(text)
        return kind(text)
    except ValueError:
        raise ValueError(f"img2dataset option --{name}: {text!r} is not a valid {kind.__name__}") from None


def parse_img2dataset_options(extra: list[str]) -> dict:
    """``["--image_size", "64", "--resize-mode=no", "--skip_reencode"]`` -> download kwargs."""
    from img2dataset import download

    params = inspect.signature(download).parameters
    options, i = {}, 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r} (img2dataset options look like --name value)")
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in params:
            raise ValueError(f"--{name} is neither a capfilt ingest option nor an img2dataset option "
                             f"(img2dataset has: {', '.join(sorted(params))})")
        kind = _value_type(params[name].annotation)
        i += 1
        if not has_value:
            if kind is bool and (i == len(extra) or extra[i].startswith("--")):
                value = "true"
            elif i == len(extra):
                raise ValueError(f"--{name} needs a value")
            else:
                value, i = extra[i], i + 1
        options[name] = _convert(name, value, kind)
    return options


def summarize(out: str) -> dict:
    """img2dataset's per-shard stats, summed."""
    totals, statuses, shards = Counter(), Counter(), 0
    for path in sorted(glob.glob(os.path.join(out, "*_stats.json"))):
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
        shards += 1
        for key in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[key] += int(stats.get(key, 0))
        statuses.update(stats.get("status_dict", {}))
    return {"shards": shards, **{k: totals[k] for k in ("count", "successes", "failed_to_download",
                                                       "failed_to_resize")},
            "status": dict(statuses.most_common())}


def run_ingest(cfg: IngestConfig) -> dict:
    """Download the URL list into ``cfg.out``; returns :func:`summarize` of the result, with the
    URL list's row count (``url_list_rows``; every row checked to be in the shards) and the
    shards of an earlier, killed run downloaded again (``redone``)."""
    from img2dataset import download  # the package's attribute, so that tests can stand in for it

    input_format = cfg.input_format or detect_input_format(cfg.url_list)
    check_url_list(cfg, input_format)
    kwargs = dict(cfg.options)
    mode = kwargs.pop("incremental_mode", None) or "incremental"
    if mode not in ("incremental", "overwrite", "extend"):
        raise ValueError(f"--incremental_mode {mode!r}: img2dataset knows incremental, overwrite, extend")
    params = inspect.signature(download).parameters
    option = {k: kwargs.get(k, params[k].default if k in params else default)
              for k, default in (("number_sample_per_shard", 10000), ("oom_shard_count", 5), ("encode_format", "jpg"))}
    layout = ShardLayout(cfg.output_format, option["number_sample_per_shard"], option["oom_shard_count"],
                         option["encode_format"])
    urls = read_input_urls(cfg.url_list, input_format, cfg.url_col)
    kwargs.update(url_list=cfg.url_list, output_folder=cfg.out, output_format=cfg.output_format,
                  input_format=input_format, url_col=cfg.url_col, caption_col=cfg.caption_col or None,
                  distributor=cfg.distributor,
                  # prepare_out did what overwrite needs (img2dataset's would remove the lock too)
                  incremental_mode="extend" if mode == "extend" else "incremental")
    outputs.check_own(cfg.out, outputs.INGEST, "ingest")  # before the lock: a refused --out is left as it was
    os.makedirs(cfg.out, exist_ok=True)
    with OutLock(cfg.out) as lock:
        first, redone = prepare_out(cfg.out, mode, layout, download_settings(download, kwargs, cfg.url_list), urls)
        if cfg.distributor == "pyspark":
            download = functools.partial(download_on_spark, download, cfg.spark_master)
        run_download(download, kwargs, lock)
        verify_output(cfg.out, layout, urls, first)
    return {**summarize(cfg.out), "url_list_rows": len(urls), "redone": redone}
