"""Raw shards in: find them, check them up front, and read them row by row into the graph.

Inputs are img2dataset output: parquet shards (``output_format=parquet``, images in ``jpg``)
or webdataset tars (``{key}.jpg`` + ``{key}.txt`` + ``{key}.json`` per sample; the failed
downloads are only in the ``.parquet`` file img2dataset writes beside each tar, which lists every
row of the shard with its status).

Every shard's schema is checked before any work against the columns curate reads (their types
in ``transforms.schemas.RAW_SCHEMA``), so a missing column, a repeated one or a type that cannot
be cast fails the run naming the file and the column; a column curate does not read is not
checked.

Rows are read with ``transforms.shards`` inside a DoFn rather than with
``parquetio.ReadFromParquet``: the graph needs each row's shard and row index (duplicate keys
are resolved by them, output rows are sorted by them, and each input shard gets its own output
shard), which Beam's readers do not report. Files are opened through Beam's ``FileSystems``,
so ``gs://`` and other remote inputs work as local ones do. A row that cannot be curated
(a failed download, an unusable key) is an error row through ``pipeline.curate.errors``.
"""
from __future__ import annotations

import glob as globlib
import os
import posixpath
import stat
import re
from dataclasses import dataclass

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from capfilt.pipeline.curate.errors import NAMESPACE, StageError, catch
from capfilt.transforms import shards as reader
from capfilt.transforms.rows import Sample
from capfilt.transforms.schemas import RAW_REQUIRED_COLUMNS, RAW_SCHEMA, check_columns

SHARD_EXTS = {".parquet": "parquet", ".tar": "tar"}
# The columns curate reads, with their types. The others (img2dataset's width, exif, ...) are
# never read, so their types do not matter.
READ_SCHEMA = pa.schema([RAW_SCHEMA.field(name) for name in reader.RAW_ROW_COLUMNS])
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


def _open(path: str):
    return FileSystems.open(path, compression_type="uncompressed")


@dataclass(frozen=True)
class ShardInfo:
    """One input shard. ``ordinal`` is its place in the sorted input list (duplicate keys:
    the lowest (ordinal, row) wins); ``shard_id`` names its output shard."""

    path: str
    ordinal: int
    shard_id: str
    fmt: str  # "parquet" | "tar"
    size: int
    num_rows: int = -1  # file_rows + the sidecar's failed downloads
    sidecar: str | None = None  # img2dataset's per-tar parquet: every row, failed downloads included
    file_rows: int = -1  # rows of the shard file itself: parquet footer, tar samples


def discover_shards(patterns) -> list[ShardInfo]:
    """Expand the input globs into sorted shards; ValueError when nothing usable matches."""
    paths: dict[str, int] = {}
    for pattern in patterns:
        _refuse_unreadable_local_matches(pattern)
        result = FileSystems.match([pattern])[0]
        if not result.metadata_list:
            raise ValueError(f"--input {pattern!r} matches no file")
        for meta in result.metadata_list:
            paths[meta.path] = meta.size_in_bytes
    for path in sorted(paths):
        ext = os.path.splitext(path)[1].lower()
        # .json: img2dataset's *_stats.json beside its shards, skipped
        if ext not in SHARD_EXTS and ext != ".json":
            raise ValueError(f"{path}: not a raw shard (expected .parquet or .tar)")
    ids = shard_ids(paths)
    shards = []
    for path in sorted(ids):
        ext = os.path.splitext(path)[1]
        sidecar = reader.tar_sidecar(path, FileSystems.exists)
        shards.append(ShardInfo(path, len(shards), ids[path], SHARD_EXTS[ext.lower()], paths[path], sidecar=sidecar))
    if not shards:
        raise ValueError(f"--input {list(patterns)} matches no .parquet or .tar shard")
    return shards


def _refuse_unreadable_local_matches(pattern: str) -> None:
    """ValueError naming a local glob match that is not a readable regular file or a directory:
    Beam's match drops a dangling symlink without a word (its shard would be skipped) and lists
    a FIFO, which would block the run on its first read."""
    if "://" in pattern:
        return
    for path in globlib.iglob(pattern, recursive=True):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise ValueError(f"--input {pattern!r} matches {path}, a symlink to nothing") from None
        except OSError as err:
            raise ValueError(f"--input {pattern!r} matches {path}, which cannot be read ({err})") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ValueError(f"--input {pattern!r} matches {path}, which is not a regular file "
                             f"(a FIFO, socket or device would block or never end)")


def shard_ids(paths) -> dict[str, str]:
    """{shard path: id of its output shard} for matched input files (other files and the
    sidecar parquet of a tar are left out). ValueError when two shards would share an id.

    The id is the file's stem, as it always was when stems are unique, so existing outputs
    keep their names. img2dataset numbers every download from 00000, so a glob over several
    downloads (``raw/**/*.parquet``) matches ``raw/a/00000.parquet`` and ``raw/b/00000.parquet``:
    then every id is the path below the shards' common directory (``a_00000``, ``b_00000``).
    The ids depend on the set of shards: when a later input makes a curated shard's id change,
    curate drops its old output and curates it again (``pipeline.curate.state.OutStore.without_renamed``).
    """
    files = _shard_files(paths)
    ids = {p: _SAFE_ID.sub("_", posixpath.basename(os.path.splitext(p)[0])) for p in files}
    if len({output_name(i) for i in ids.values()}) < len(ids):
        ids = _relative_ids(files)
    seen: dict[str, str] = {}
    for path, shard_id in ids.items():
        name = output_name(shard_id)  # ids that differ may still name one file (00000, part-00000)
        if name in seen:
            raise ValueError(
                f"input shards {seen[name]} and {path} would both write output shard "
                f"{shard_id!r} ({name}); rename one or curate them into separate --out directories"
            )
        seen[name] = path
    return ids


def output_name(shard_id: str) -> str:
    """``part-<id>.parquet`` (an id that already starts with ``part-`` is used as is)."""
    return f"part-{shard_id.removeprefix('part-')}.parquet"


def _shard_files(paths) -> list[str]:
    """Sorted .parquet/.tar paths, without the sidecar parquet of a tar (read with the tar)."""
    shard_paths = [p for p in sorted(paths) if os.path.splitext(p)[1].lower() in SHARD_EXTS]
    tars = {os.path.splitext(p)[0] for p in shard_paths if p.endswith(".tar")}
    return [p for p in shard_paths if not (p.endswith(".parquet") and os.path.splitext(p)[0] in tars)]


def _relative_ids(files: list[str]) -> dict[str, str]:
    """Ids from each path below the common directory, e.g. raw/a/00000.parquet -> a_00000.
    Paths are split on '/' (local and gs:// alike); the result is sanitised to [A-Za-z0-9._-]
    so no file name from the input can make an output path leave ``--out``, and leading dots
    are dropped so an id never names a hidden file (which a '*' glob would not list)."""
    parts = [os.path.splitext(p)[0].split("/") for p in files]
    common = 0
    while all(len(q) > common + 1 and q[common] == parts[0][common] for q in parts):
        common += 1
    return {p: _SAFE_ID.sub("_", "_".join(q[common:])).lstrip(".") or "_" for p, q in zip(files, parts)}


def validate_shard(info: ShardInfo) -> ShardInfo:
    """Check a shard's schema and count its rows, without reading images. ValueError names
    the file and the column (or tar member) at fault."""
    if info.fmt == "parquet":
        schema, file_rows = reader.parquet_schema(info.path, _open)
        check_columns(schema, RAW_REQUIRED_COLUMNS, READ_SCHEMA, where=info.path)
    else:
        file_rows = sum(1 for _ in reader.tar_samples(info.path, with_data=False, opener=_open))
        reader.check_tar_count(info.path, file_rows, _open, FileSystems.exists)
    rows = file_rows
    if info.sidecar:
        schema, _ = reader.parquet_schema(info.sidecar, _open)
        check_columns(schema, ("key", "status"), READ_SCHEMA, where=info.sidecar)
        rows += sum(1 for _ in reader.sidecar_failures(info.sidecar, _open))
    return _replace(info, num_rows=rows, file_rows=file_rows)


def _replace(info: ShardInfo, **kw) -> ShardInfo:
    return ShardInfo(**{**info.__dict__, **kw})


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class RawRow:
    """One row of a raw shard as read (``transforms.shards.RAW_ROW_COLUMNS``, bytes values) and
    its place: input shard ordinal and row index."""

    values: dict
    shard: int
    row: int

    @property
    def key(self) -> str | None:
        return _text(self.values["key"])

    @property
    def url(self) -> str | None:
        return _text(self.values["url"])


def to_sample(raw: RawRow) -> Sample:
    """The row as a Sample; StageError for an img2dataset failure (stage ``download``, type =
    its status) or a row without a usable key or metadata (stage ``read``)."""
    values = raw.values
    if "read_error" in values:  # a tar sample whose json cannot be used (transforms.shards.tar_rows)
        raise StageError("read", *values["read_error"])
    try:
        key = None if values["key"] is None else values["key"].decode("utf-8")
    except UnicodeDecodeError:
        raise StageError("read", "invalid_key", "key is not valid UTF-8") from None
    status = _text(values["status"])
    if status is not None and not status.strip():  # an error row needs a type: img2dataset never writes ""
        raise StageError("download", "invalid_status", "status is empty (img2dataset writes success or a failure)")
    if status is not None and status != "success":
        raise StageError("download", status, _text(values["error_message"]) or f"img2dataset status {status!r}")
    if not key:
        raise StageError("read", "missing_key", "key is null or empty", key=None)
    return Sample(key=key, url=raw.url, sha256=_text(values["sha256"]), jpg=values["jpg"], caption=values["caption"],
                  shard=raw.shard, row=raw.row)


class ReadShardFn(beam.DoFn):
    """ShardInfo -> one RawRow per row: the shard's own rows, then (a tar) its sidecar's failed
    downloads, which continue its row numbering.

    Only a shard's footer (a tar: its member headers) is read up front, so a data page can still
    fail here. The shard is then read once more from the start; when the failure recurs, the
    rows not read (their number is known from the up-front check) become error rows of type
    ``unreadable_data``, so that the shard is committed with the rows that could be read and
    no other shard of the run is held up. A failure that does not recur (a transient read error)
    costs nothing."""

    def __init__(self):
        self.rows = Metrics.counter(NAMESPACE, "input_rows")

    def process(self, info: ShardInfo):
        count = 0
        for values in _file_rows(info):
            self.rows.inc()
            yield RawRow(values, info.ordinal, count)
            count += 1
        if info.sidecar:
            failures = reader.sidecar_failures(info.sidecar, _open)
            for offset, values in enumerate(reader.named_read_errors(info.sidecar, failures)):
                self.rows.inc()
                yield RawRow(values, info.ordinal, count + offset)


def _file_rows(info: ShardInfo):
    """The rows of the shard file (see ReadShardFn), read twice where the first reading fails."""
    count = 0
    failure = None
    for _attempt in range(2):
        rows = reader.raw_rows(info.path, _open) if info.fmt == "parquet" else reader.tar_rows(info.path, _open)
        try:
            for index, values in enumerate(reader.named_read_errors(info.path, rows)):
                if index >= count:
                    count += 1
                    yield values
            return
        except ValueError as err:
            failure = err
    if info.file_rows < count:  # not validated up front: the number of rows left is unknown
        raise failure
    message = f"{' '.join(str(failure).split())}; the rest of the shard cannot be read"
    for _ in range(count, info.file_rows):
        values = dict.fromkeys(reader.RAW_ROW_COLUMNS)
        values["read_error"] = ("unreadable_data", message)
        yield values


class ReadRows(beam.PTransform):
    """PCollection[ShardInfo] -> (Samples, ErrorRows of the rows that cannot be curated)."""

    def expand(self, shards):
        raw = shards | "ReadShard" >> beam.ParDo(ReadShardFn())
        return catch(raw, "ToSample", to_sample, stage="read")
