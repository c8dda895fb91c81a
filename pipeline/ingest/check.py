"""The shards of a `capfilt ingest` checked against its URL list, and resuming a download.

img2dataset's ``download`` returns normally when a shard failed, and its incremental mode takes
a shard as done when its ``_stats.json`` exists, without reading the shard. So after a download
every shard is checked against the list (:func:`verify_output`: readable, its rows the list's
rows, counts agreeing with its stats), and before resuming one the shards a killed run left
unfinished are dropped (:func:`drop_unfinished_shards`) and an ``--out`` downloaded with other
settings is refused (:func:`prepare_out`).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from capfilt.pipeline.ingest.lock import LOCK_DIR
from capfilt.pipeline.files import file_sha256
from capfilt.transforms import shards as reader
from capfilt.transforms.files import atomic

LOG = logging.getLogger(__name__)


# --- the shards against the URL list -------------------------------------------------------------

_SHARD_FILE = re.compile(r"^(\d+)(_stats\.json|\.parquet|\.tar)$")


@dataclass(frozen=True)
class ShardLayout:
    """Where img2dataset puts each row of a URL list: row r goes to shard ``first + r //
    per_shard`` with key ``shard * 10**ceil(log10(per_shard)) + r % per_shard`` (its
    ``compute_key``), zero-padded; shard files are named with ``shard_digits`` digits."""
    output_format: str
    per_shard: int  # number_sample_per_shard
    shard_digits: int  # oom_shard_count
    encode_format: str = "jpg"

    def __post_init__(self):
        if self.per_shard < 1:
            raise ValueError(f"--number_sample_per_shard {self.per_shard}: must be at least 1")
        if self.shard_digits < 1:
            raise ValueError(f"--oom_shard_count {self.shard_digits}: must be at least 1")

    def name(self, shard_id: int) -> str:
        return f"{shard_id:0{self.shard_digits}d}"

    def key(self, shard_id: int, index: int) -> str:
        digits = math.ceil(math.log10(self.per_shard))
        return f"{10 ** digits * shard_id + index:0{digits + self.shard_digits}d}"


def shards_present(out: str) -> dict[int, list[str]]:
    """{shard id: its file names} for img2dataset's shard and stats files in ``out``."""
    found: dict[int, list[str]] = {}
    for name in sorted(os.listdir(out)):
        if match := _SHARD_FILE.match(name):
            found.setdefault(int(match.group(1)), []).append(name)
    return found


def read_input_urls(path: str, input_format: str, url_col: str) -> pa.Array:
    """The URL column as img2dataset's ``Reader`` reads it (the same pyarrow / pandas reader per
    format, hence the same values and type), to compare with the shards' ``url`` column."""
    base = input_format.removesuffix(".gz")
    compression = "gzip" if input_format.endswith(".gz") else None
    try:
        if base == "parquet":
            column = pq.read_table(path, columns=[url_col]).column(url_col)
        elif base == "json":
            import pandas as pd

            column = pa.Table.from_pandas(pd.read_json(path, compression=compression)).column(url_col)
        else:
            with pa.input_stream(path, compression=compression) as stream:
                if base == "txt":
                    column = pa_csv.read_csv(stream, read_options=pa_csv.ReadOptions(column_names=["url"])).column(0)
                elif base in ("csv", "tsv"):
                    parse = pa_csv.ParseOptions(delimiter="," if base == "csv" else "\t")
                    column = pa_csv.read_csv(stream, parse_options=parse).column(url_col)
                else:
                    column = pa_json.read_json(stream).column(url_col)
    except (pa.ArrowException, OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: cannot read its {url_col!r} column as a {input_format} URL list ({err})") from err
    return column.combine_chunks()


def _stats_of(out: str, layout: ShardLayout, shard_id: int) -> tuple[dict, int]:
    """(the shard's stats, its count); ValueError naming the file when they are unusable."""
    name = layout.name(shard_id)
    path = os.path.join(out, f"{name}_stats.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing, img2dataset did not finish shard {name}")
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
        count = int(stats["count"])
        parts = [int(stats[k]) for k in ("successes", "failed_to_download", "failed_to_resize")]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable ({err!r})") from None
    if sum(parts) != count:  # a sample that raised inside img2dataset is counted but not written
        raise ValueError(f"{path}: count {count}, but successes + failures {sum(parts)}: img2dataset lost "
                         f"{count - sum(parts)} row(s) of shard {name} (its log says why)")
    return stats, count


def _tar_images(path: str, encode_format: str) -> int:
    """Samples with an image in a webdataset tar; ValueError naming it when it is cut short."""
    try:
        return sum(1 for sample in reader.tar_samples(path, with_data=False) if encode_format in sample)
    except OSError as err:
        raise ValueError(f"{path}: not a readable tar file ({err})") from None


def check_shard(out: str, layout: ShardLayout, shard_id: int, urls: pa.Array | None = None) -> dict:
    """Check one finished shard; returns its stats. ValueError naming the file and the numbers when
    its stats are missing or unreadable, its parquet (img2dataset writes every row there, failed
    ones with ``status`` and ``error_message``; a tar's sidecar too) is unreadable or holds other
    than successes + failures rows, a tar's images differ from the successes, or (``urls``: the
    URL list's rows for this shard) its keys and urls are not exactly those rows."""
    stats, count = _stats_of(out, layout, shard_id)
    name = layout.name(shard_id)
    if urls is not None and count != len(urls):
        raise ValueError(f"{os.path.join(out, name + '_stats.json')}: count {count}, but the URL list puts "
                         f"{len(urls)} row(s) in shard {name}")
    table_path = os.path.join(out, f"{name}.parquet")
    _schema, rows = reader.parquet_schema(table_path)
    if rows != count:
        raise ValueError(f"{table_path}: {rows} rows, but {name}_stats.json records {count} (successes "
                         f"{stats['successes']} + failed_to_download {stats['failed_to_download']} + "
                         f"failed_to_resize {stats['failed_to_resize']})")
    if layout.output_format == "webdataset":
        tar_path = os.path.join(out, f"{name}.tar")
        images = _tar_images(tar_path, layout.encode_format)
        if images != int(stats["successes"]):
            raise ValueError(f"{tar_path}: {images} images, but {name}_stats.json records "
                             f"{stats['successes']} successes")
    if urls is not None:
        _check_rows(table_path, layout, shard_id, urls)
    return stats


def _check_rows(table_path: str, layout: ShardLayout, shard_id: int, urls: pa.Array) -> None:
    try:
        table = reader.read_columns([table_path], ["key", "url"])
    except (OSError, pa.ArrowException, ValueError) as err:
        raise ValueError(f"{table_path}: cannot read its key and url columns ({err})") from None
    table = table.take(pc.sort_indices(table, sort_keys=[("key", "ascending")]))
    keys, want = table.column("key").to_pylist(), [layout.key(shard_id, i) for i in range(len(urls))]
    if keys != want:
        missing, foreign = sorted(set(want) - set(keys)), sorted(set(keys) - set(want), key=str)
        raise ValueError(f"{table_path}: its keys are not the URL list's rows: {len(keys) - len(set(keys))} "
                         f"duplicate(s), {len(missing)} missing {missing[:3]}, {len(foreign)} foreign {foreign[:3]}")
    got = table.column("url").combine_chunks()
    try:
        same = got.cast(pa.large_string()).equals(urls.cast(pa.large_string()))
    except pa.ArrowException:
        same = got.to_pylist() == urls.to_pylist()
    if not same:
        got_l, want_l = got.to_pylist(), urls.to_pylist()
        i = next(i for i in range(len(want_l)) if str(got_l[i]) != str(want_l[i]))
        raise ValueError(f"{table_path}: key {want[i]} has url {got_l[i]!r}, but the URL list has {want_l[i]!r}")


def drop_unfinished_shards(out: str, layout: ShardLayout, urls: pa.Array | None = None) -> list[str]:
    """Remove the files of every shard in ``out`` that :func:`check_shard` rejects (with ``urls``:
    also one whose rows are not the URL list's), so img2dataset's incremental mode downloads it
    again: it takes a shard as done when its ``_stats.json`` exists. A killed run leaves a shard
    file without stats (or cut short), stats cut short, or a finished shard rewritten by a
    process of the killed run. Returns the removed shards' names."""
    n_shards = math.ceil(len(urls) / layout.per_shard) if urls is not None else None
    dropped = []
    for shard_id, names in shards_present(out).items():
        rows = None
        if urls is not None and shard_id < n_shards:
            start = shard_id * layout.per_shard
            rows = urls.slice(start, min(len(urls), start + layout.per_shard) - start)
        try:
            check_shard(out, layout, shard_id, rows)
        except ValueError as err:
            LOG.warning("shard %s is downloaded again: %s", layout.name(shard_id), err)
            for name in names:
                os.remove(os.path.join(out, name))
            dropped.append(layout.name(shard_id))
    return dropped


def verify_output(out: str, layout: ShardLayout, urls: pa.Array, first_shard: int = 0) -> None:
    """ValueError unless shards ``first_shard``, ... hold exactly the URL list's rows, each
    once with its key and url (:func:`check_shard`), and no shard beyond them exists."""
    n = len(urls)
    n_shards = math.ceil(n / layout.per_shard)
    problems = []
    for j in range(n_shards):
        start = j * layout.per_shard
        try:
            check_shard(out, layout, first_shard + j, urls.slice(start, min(n, start + layout.per_shard) - start))
        except ValueError as err:
            problems.append(str(err))
    extra = [layout.name(s) for s in shards_present(out) if s >= first_shard + n_shards]
    if extra:
        problems.append(f"shard(s) {', '.join(extra)} are beyond the URL list's {n_shards} shard(s)")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(f"{out}: the shards do not hold the URL list's {n} row(s) ({n_shards} shard(s) of "
                         f"{layout.per_shard}): " + "; ".join(problems[:5]) + more)


# --- resuming a download -----------------------------------------------------------------------

# download() arguments that change how a download runs, not what a finished shard holds: a resumed
# download may change them
RUN_ONLY_OPTIONS = frozenset({"processes_count", "thread_count", "timeout", "retries", "enable_wandb",
                              "wandb_project", "distributor", "subjob_size", "max_shard_retry",
                              "incremental_mode", "url_list", "output_folder"})


def download_settings(download, kwargs: dict, url_list: str) -> dict:
    """What a finished shard depends on: download()'s arguments with defaults filled in, less
    RUN_ONLY_OPTIONS, and the URL list's SHA-256; JSON-normal."""
    settings = {k: p.default for k, p in inspect.signature(download).parameters.items()
                if p.default is not inspect.Parameter.empty}
    settings.update(kwargs)
    settings = {k: v for k, v in sorted(settings.items()) if k not in RUN_ONLY_OPTIONS}
    settings["url_list_sha256"] = file_sha256(url_list)
    return json.loads(json.dumps(settings))


def prepare_out(out: str, mode: str, layout: ShardLayout, settings: dict, urls: pa.Array) -> tuple[int, list[str]]:
    """Make ``out`` ready for img2dataset's incremental mode (what capfilt passes it): returns
    (the first shard id this download writes, the shards dropped to be downloaded again).

    ``overwrite``: everything in ``out`` but the lock is removed here (img2dataset would remove
    the lock too). ``incremental``: refused when ``out`` holds shards made with other settings
    (recorded in ``OUT/.capfilt-ingest/settings.json``); shards a killed run left unfinished
    are dropped. ``extend``: unfinished shards are dropped and this list's shards follow the
    last finished one, as img2dataset numbers them."""
    record = os.path.join(out, LOCK_DIR, "settings.json")
    if mode == "overwrite":
        for name in os.listdir(out):
            path = os.path.join(out, name)
            if name == LOCK_DIR:
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    if mode == "extend":
        dropped = drop_unfinished_shards(out, layout)
        if os.path.exists(record):
            os.remove(record)  # an extended --out holds several lists: no one list's settings
        stats_ids = [s for s, names in shards_present(out).items() if any(n.endswith("_stats.json") for n in names)]
        return max(stats_ids, default=-1) + 1, dropped
    if shards_present(out) and os.path.isfile(record):
        with open(record, encoding="utf-8") as f:
            recorded = json.load(f)
        changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
        if changed:
            what = ", ".join(f"{k} {recorded.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ValueError(f"{out} holds a download made with other settings ({what}): use another --out, "
                             f"or --incremental_mode overwrite to replace it")
    dropped = drop_unfinished_shards(out, layout, urls)
    atomic.write_json(record, settings, indent=1, sort_keys=True)
    return 0, dropped
