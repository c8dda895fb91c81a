"""Raw shards in: find them, check them up front, and read them row by row into the graph.

Inputs are img2dataset output: parquet shards (``output_format=parquet``, images in ``jpg``)
or webdataset tars (``{key}.jpg`` + ``{key}.txt`` + ``{key}.json`` per sample, with the failed
downloads only in the ``.parquet`` file img2dataset writes beside each tar).

Every shard's schema is checked against ``transforms.schemas.RAW_SCHEMA`` before any work, so a
missing column or a wrong dtype fails the run naming the file and the column.

Rows are read with pyarrow (parquet) and tarfile (tars) inside a DoFn rather than with
``parquetio.ReadFromParquet``: the graph needs each row's shard and row index (duplicate keys
are resolved by them, output rows are sorted by them, and each input shard gets its own output
shard), which Beam's readers do not report. Files are opened through Beam's ``FileSystems``,
so ``gs://`` and other remote inputs work as local ones do. Tars are grouped by hand rather than
with ``webdataset``'s grouper, which raises on a repeated member name and would lose the shard.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from capfilt.transforms.schemas import RAW_REQUIRED_COLUMNS, RAW_SCHEMA, check_columns

NAMESPACE = "capfilt"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHARD_EXTS = {".parquet": "parquet", ".tar": "tar"}
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")
_READ_BATCH = 256  # parquet rows per pyarrow batch: bounds memory on image-heavy shards


@dataclass(frozen=True)
class ShardInfo:
    """One input shard. ``ordinal`` is its place in the sorted input list (duplicate keys:
    the lowest (ordinal, row) wins); ``shard_id`` names its output shard."""

    path: str
    ordinal: int
    shard_id: str
    fmt: str  # "parquet" | "tar"
    size: int
    num_rows: int = -1
    sidecar: str | None = None  # img2dataset's per-tar parquet with the failed downloads


@dataclass
class Sample:
    """One image on its way through the graph; each stage returns an updated copy.

    ``caption`` is the raw web caption (str or bytes, possibly invalid UTF-8) until decode
    cleans it into ``web_caption``. Score fields stay None for stages that did not run.
    """

    key: str
    url: str | None
    sha256: str | None
    jpg: bytes
    caption: Any
    shard: int
    row: int
    seed: int = 0
    web_caption: str = ""
    width: int | None = None
    height: int | None = None
    image: Any = None  # PIL.Image (RGB) after decode; dropped before the sink
    synthetic: list[str] = field(default_factory=list)
    web_itm: float | None = None
    web_itc: float | None = None
    web_clip: float | None = None
    synthetic_itm: list[float] | None = None
    synthetic_itc: list[float] | None = None
    synthetic_clip: list[float] | None = None


@dataclass(frozen=True)
class ErrorRow:
    """One row of the error output (``transforms.schemas.ERROR_SCHEMA`` plus its origin)."""

    key: str | None
    url: str | None
    stage: str
    error_type: str
    error_message: str
    shard: int
    row: int

    def record(self) -> dict:
        return {
            "key": self.key,
            "url": self.url,
            "stage": self.stage,
            "error_type": self.error_type,
            "error_message": self.error_message[:2000],
            "input_row": self.row,
        }


def discover_shards(patterns) -> list[ShardInfo]:
    """Expand the input globs into sorted shards; ValueError when nothing usable matches."""
    paths: dict[str, int] = {}
    for pattern in patterns:
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
        stem, ext = os.path.splitext(path)
        sidecar = stem + ".parquet" if ext == ".tar" and FileSystems.exists(stem + ".parquet") else None
        shards.append(ShardInfo(path, len(shards), ids[path], SHARD_EXTS[ext.lower()], paths[path], sidecar=sidecar))
    if not shards:
        raise ValueError(f"--input {list(patterns)} matches no .parquet or .tar shard")
    return shards


def shard_ids(paths) -> dict[str, str]:
    """{shard path: id of its output shard} for matched input files (other files and the
    sidecar parquet of a tar are left out). ValueError when two shards would share an id.

    The id is the file's stem, as it always was when stems are unique, so existing outputs
    keep their names. img2dataset numbers every download from 00000, so a glob over several
    downloads (``raw/**/*.parquet``) matches ``raw/a/00000.parquet`` and ``raw/b/00000.parquet``:
    then every id is the path below the shards' common directory (``a_00000``, ``b_00000``).
    The ids depend on the set of shards: when a later input makes a curated shard's id change,
    curate drops its old output and curates it again (``pipeline.state.OutStore.without_renamed``).
    """
    files = _shard_files(paths)
    ids = {p: _SAFE_ID.sub("_", posixpath.basename(os.path.splitext(p)[0])) for p in files}
    if len(set(ids.values())) < len(ids):
        ids = _relative_ids(files)
    seen: dict[str, str] = {}
    for path, shard_id in ids.items():
        if shard_id in seen:
            raise ValueError(
                f"input shards {seen[shard_id]} and {path} would both write output shard "
                f"{shard_id!r}; rename one or curate them into separate --out directories"
            )
        seen[shard_id] = path
    return ids


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
        schema, rows = _parquet_schema(info.path)
        check_columns(schema, RAW_REQUIRED_COLUMNS, RAW_SCHEMA, where=info.path)
    else:
        rows = sum(1 for _ in _tar_samples(info.path, with_data=False))
    if info.sidecar:
        schema, _ = _parquet_schema(info.sidecar)
        check_columns(schema, ("key", "status"), RAW_SCHEMA, where=info.sidecar)
        rows += sum(1 for _ in _sidecar_failures(info.sidecar))
    return _replace(info, num_rows=rows)


def _replace(info: ShardInfo, **kw) -> ShardInfo:
    return ShardInfo(**{**info.__dict__, **kw})


def _parquet_schema(path: str) -> tuple[pa.Schema, int]:
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            pf = pq.ParquetFile(f)
            return pf.schema_arrow, pf.metadata.num_rows
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


def _columns(batch: pa.RecordBatch, names) -> dict[str, list]:
    """Python lists of the wanted columns; absent columns are all None. Text columns are read
    as bytes so that invalid UTF-8 reaches the caption cleaner instead of failing the read."""
    out = {}
    for name in names:
        idx = batch.schema.get_field_index(name)
        if idx < 0:
            out[name] = [None] * batch.num_rows
            continue
        col = batch.column(idx)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.binary() if pa.types.is_string(col.type) else pa.large_binary())
        out[name] = col.to_pylist()
    return out


def _parquet_rows(path: str):
    """(row dict) per row; text values as bytes, images as bytes."""
    names = ("key", "url", "caption", "status", "error_message", "sha256", "jpg")
    with FileSystems.open(path, compression_type="uncompressed") as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=_READ_BATCH):
            cols = _columns(batch, names)
            for i in range(batch.num_rows):
                yield {n: cols[n][i] for n in names}


def _tar_samples(path: str, with_data: bool = True):
    """Group a webdataset tar into samples: consecutive members sharing a key (the basename
    up to its first dot). A member suffix seen twice starts a new sample, so a repeated key
    becomes a second sample (a duplicate-key error downstream), not a lost shard."""
    current: dict | None = None
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = posixpath.basename(member.name)
                if base.startswith(".") or "." not in base:
                    continue
                key, suffix = base.split(".", 1)
                key = posixpath.join(posixpath.dirname(member.name), key)
                data = tar.extractfile(member).read() if with_data else b""
                if current is None or current["__key__"] != key or suffix.lower() in current:
                    if current is not None:
                        yield _check_sample(path, current)
                    current = {"__key__": key}
                current[suffix.lower()] = data
    except tarfile.TarError as err:
        raise ValueError(f"{path}: not a readable tar file ({err})") from err
    if current is not None:
        yield _check_sample(path, current)


def _check_sample(path: str, sample: dict) -> dict:
    if not any(ext in sample for ext in IMAGE_EXTS):
        raise ValueError(
            f"{path}: sample {sample['__key__']!r} has no image member (column 'jpg'; "
            f"has {sorted(k for k in sample if k != '__key__')})"
        )
    return sample


def tar_rows(path: str):
    """The samples of an img2dataset webdataset tar as raw-shard rows (bytes values)."""
    for sample in _tar_samples(path):
        meta = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"].decode("utf-8", errors="replace"))
            except ValueError:
                meta = {}
        image = next(sample[ext] for ext in IMAGE_EXTS if ext in sample)
        key = meta.get("key") or sample["__key__"]
        yield {
            "key": key.encode("utf-8") if isinstance(key, str) else key,
            "url": (meta.get("url") or "").encode("utf-8") or None,
            "caption": sample.get("txt", (meta.get("caption") or "").encode("utf-8")),
            "status": b"success",
            "error_message": None,
            "sha256": (meta.get("sha256") or "").encode("utf-8") or None,
            "jpg": image,
        }


def _sidecar_failures(path: str):
    for row in _parquet_rows(path):
        if row["status"] is not None and row["status"] != b"success":
            yield row


def _named_read_errors(path: str, rows):
    """``rows``, with a failure part-way through the file (a corrupt data page, a truncated
    file: only the footer was checked up front) re-raised as a ValueError naming the file;
    pyarrow's own message names neither the file nor the row."""
    count = 0
    try:
        for raw in rows:
            yield raw
            count += 1
    except (pa.ArrowException, OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read the shard after {count} rows "
                         f"({type(err).__name__}: {err})") from err


class ReadShardFn(beam.DoFn):
    """ShardInfo -> one Sample per good row (main output) or one ErrorRow per row that
    cannot be curated (tag ``errors``): img2dataset failures (stage ``download``, type =
    its status) and rows without a usable key (stage ``read``)."""

    ERRORS = "errors"

    def __init__(self):
        self.rows = Metrics.counter(NAMESPACE, "input_rows")
        self.read_errors = Metrics.counter(NAMESPACE, "read_errors")

    def process(self, info: ShardInfo):
        rows = _parquet_rows(info.path) if info.fmt == "parquet" else tar_rows(info.path)
        count = 0
        for index, raw in enumerate(_named_read_errors(info.path, rows)):
            count = index + 1
            yield self._row(info, index, raw)
        if info.sidecar:  # failed downloads of a tar shard continue its row numbering
            for offset, raw in enumerate(_named_read_errors(info.sidecar, _sidecar_failures(info.sidecar))):
                yield self._row(info, count + offset, raw)

    def _row(self, info: ShardInfo, index: int, raw: dict):
        self.rows.inc()
        url = _text(raw["url"])
        status = _text(raw["status"])
        key_bytes = raw["key"]
        key = None
        try:
            key = None if key_bytes is None else key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(_text(key_bytes), url, "read", "invalid_key", "key is not valid UTF-8", info, index)
        if status is not None and status != "success":
            message = _text(raw["error_message"]) or f"img2dataset status {status!r}"
            return self._error(key, url, "download", status, message, info, index)
        if not key:
            return self._error(None, url, "read", "missing_key", "key is null or empty", info, index)
        return Sample(
            key=key, url=url, sha256=_text(raw["sha256"]), jpg=raw["jpg"], caption=raw["caption"],
            shard=info.ordinal, row=index,
        )

    def _error(self, key, url, stage, error_type, message, info, index):
        self.read_errors.inc()
        return beam.pvalue.TaggedOutput(
            self.ERRORS, ErrorRow(key, url, stage, error_type, message, info.ordinal, index)
        )
