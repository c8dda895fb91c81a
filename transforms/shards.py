"""The one shard reader: raw img2dataset shards and curated shards, parquet or webdataset tar.

Curate, release, evaluation, training and the ingest checks all read shards through here:

* listing: :func:`expand_paths` (globs, directories, a curate ``--out``), :func:`tar_sidecar`,
  :func:`check_tar_count` (a tar's samples against what img2dataset recorded beside it);
* parquet: :func:`parquet_schema` (footer only), :func:`row_count`, :func:`parquet_batches`
  (record batches with column selection, an optional schema to read against and a pushed-down
  filter), :func:`read_columns` (a table of several shards), :func:`raw_rows` (curate's row
  dicts, text as bytes), :func:`all_null` (from the footers' statistics);
* tars: :func:`tar_samples` groups a webdataset tar into samples, :func:`tar_rows` turns them
  into raw-shard rows, :func:`sidecar_failures` reads the failed downloads from the parquet
  img2dataset writes beside each tar (every row of the shard, with its status).

Parquet is read with pyarrow, tars with ``tarfile``. Tars are grouped by hand rather than with
``webdataset``'s grouper, which raises on a repeated member name and would lose the shard; the
tar is read as a stream (mode ``r|``), so a member cut short raises instead of ending the shard
quietly. Functions that curate calls on remote inputs take ``opener`` (path -> binary file),
which the Beam layer sets to ``FileSystems.open``; everything here is plain pyarrow/tarfile.
"""
from __future__ import annotations

import glob as globlib
import json
import posixpath
import tarfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

Opener = Callable[[str], BinaryIO]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Columns of a raw shard that curate reads (the others are img2dataset's bookkeeping).
RAW_ROW_COLUMNS = ("key", "url", "caption", "status", "error_message", "sha256", "jpg")
RAW_READ_BATCH = 256  # raw parquet rows per pyarrow batch: bounds memory on image-heavy shards
READ_BATCH = 1024
_END_OF_ARCHIVE = 1024  # two zero 512-byte blocks


def local_open(path: str) -> BinaryIO:
    return open(path, "rb")


# --- listing ---------------------------------------------------------------------------------


def expand_paths(paths: str | list[str]) -> list[str]:
    """Sorted parquet files from globs, directories (searched recursively; a `capfilt curate`
    output directory: its shards/) or file names. ValueError when nothing matches."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: set[str] = set()
    for item in items:
        item = str(item)
        if Path(item).is_dir():
            if (Path(item) / "_state" / "settings.json").is_file():
                item = str(Path(item) / "shards")  # a curate output: its curated shards, not errors/
            files.update(str(p) for p in Path(item).rglob("*.parquet"))
        else:
            files.update(p for p in globlib.glob(item, recursive=True) if Path(p).is_file())
    if not files:
        raise ValueError(f"no parquet shards match {paths!r}")
    return sorted(files)


def tar_sidecar(path: str, exists: Callable[[str], bool] = lambda p: Path(p).is_file()) -> str | None:
    """The parquet img2dataset writes beside ``<stem>.tar`` (its failed downloads), if any."""
    stem, ext = posixpath.splitext(path)
    return stem + ".parquet" if ext == ".tar" and exists(stem + ".parquet") else None


def check_tar_count(path: str, samples: int, opener: Opener = local_open,
                    exists: Callable[[str], bool] = lambda p: Path(p).is_file()) -> None:
    """ValueError naming the tar when its number of ``samples`` differs from the successful
    downloads img2dataset recorded beside it: the ``success`` rows of its sidecar parquet (which
    img2dataset writes with every row of the shard) and the ``successes`` of its
    ``<stem>_stats.json``. A sidecar without any success row (a list of failed downloads only,
    not img2dataset's) and a stats file without a ``successes`` number record no count; a tar
    with neither is checked only for its end-of-archive blocks (:func:`tar_samples`)."""
    recorded = []
    sidecar = tar_sidecar(path, exists)
    if sidecar is not None:
        successes = sum(1 for row in raw_rows(sidecar, opener) if row["status"] == b"success")
        if successes:
            recorded.append((successes, f"its sidecar {sidecar} lists {successes} successful downloads"))
    stats = posixpath.splitext(path)[0] + "_stats.json"
    if path.endswith(".tar") and exists(stats):
        try:
            with opener(stats) as f:
                successes = json.loads(f.read())["successes"]
        except (OSError, ValueError, KeyError, TypeError):
            successes = None
        if isinstance(successes, int):
            recorded.append((successes, f"{stats} counts {successes} successes"))
    for count, source in recorded:
        if count != samples:
            raise ValueError(f"{path}: the tar holds {samples} samples but {source}; it is cut short or not "
                             f"the tar img2dataset wrote: download it again")


def is_tar_sidecar(path: str) -> bool:
    """Whether ``path`` is the parquet beside a local tar: read as part of the tar, not alone."""
    return path.endswith(".parquet") and Path(path[: -len(".parquet")] + ".tar").is_file()


# --- parquet ---------------------------------------------------------------------------------


def parquet_schema(path: str, opener: Opener = local_open) -> tuple[pa.Schema, int]:
    """(schema, row count) from the footer; ValueError naming the file when it is no parquet."""
    try:
        with opener(path) as f:
            pf = pq.ParquetFile(f)
            return pf.schema_arrow, pf.metadata.num_rows
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err


def row_count(paths) -> int:
    """Rows of the parquet files ``paths``, from their footers."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def parquet_batches(path, columns=None, *, schema: pa.Schema | None = None, filter=None,
                    batch_size: int = READ_BATCH) -> Iterator[pa.RecordBatch]:
    """Record batches of one parquet file in row order. ``schema``: read against it (absent
    columns are null, types are cast); ``filter``: a ``pyarrow.dataset`` expression."""
    dataset = ds.dataset(str(path), format="parquet", schema=schema)
    return dataset.to_batches(columns=columns, filter=filter, batch_size=batch_size)


def shards_schema(paths) -> pa.Schema:
    """The schema pyarrow reads the parquet files ``paths`` with (the first file's)."""
    return ds.dataset(list(map(str, paths)), format="parquet").schema


def read_columns(paths, columns: list[str], *, schema: pa.Schema | None = None, filter=None,
                 where=None) -> pa.Table:
    """The given columns of every file in ``paths``, in order (``filter``: a ``pyarrow.dataset``
    expression). Without ``schema`` a missing column is a ValueError naming ``where`` (default:
    the files); with it, a missing column reads as nulls."""
    paths = list(map(str, paths))
    if schema is not None:
        schema = pa.schema([schema.field(c) for c in columns if c in schema.names])
        if not paths:
            return schema.empty_table()
        return ds.dataset(paths, format="parquet", schema=schema).to_table(columns=schema.names, filter=filter)
    dataset = ds.dataset(paths, format="parquet")
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"shards {paths if where is None else where!r} lack column(s) {missing}; "
                         f"they have {dataset.schema.names}")
    return dataset.to_table(columns=columns, filter=filter)


def all_null(files: list[str], column: str) -> bool:
    """True when the parquet statistics say every value of `column` is null in every file
    (read from the footers: no image bytes are loaded). Files without statistics count as not."""
    rows = nulls = 0
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            chunk = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == column)
            stats = chunk.statistics
            if stats is None or not stats.has_null_count:
                return False
            rows, nulls = rows + group.num_rows, nulls + stats.null_count
    return rows > 0 and nulls == rows


def _as_bytes_columns(batch: pa.RecordBatch, names) -> dict[str, list]:
    """Python lists of the wanted columns, as bytes; absent columns are all None. Text is read
    as bytes so that invalid UTF-8 reaches the caption cleaner instead of failing the read; any
    string or binary layout (large, view, dictionary-encoded) is cast to plain binary."""
    out = {}
    for name in names:
        found = batch.schema.get_all_field_indices(name)
        if len(found) > 1:  # schemas.check_columns refuses such a shard up front
            raise ValueError(f"column {name!r} appears {len(found)} times")
        if not found:
            out[name] = [None] * batch.num_rows
            continue
        col = batch.column(found[0])
        if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
            large = pa.types.is_large_string(col.type)
            col = col.cast(pa.large_binary() if large else pa.binary())
        out[name] = col.to_pylist()
    return out


def raw_rows(path: str, opener: Opener = local_open) -> Iterator[dict]:
    """One dict of RAW_ROW_COLUMNS per row of a raw parquet shard; text and images as bytes."""
    with opener(path) as f:
        pf = pq.ParquetFile(f)
        for batch in pf.iter_batches(batch_size=RAW_READ_BATCH):
            cols = _as_bytes_columns(batch, RAW_ROW_COLUMNS)
            for i in range(batch.num_rows):
                yield {n: cols[n][i] for n in RAW_ROW_COLUMNS}


def sidecar_failures(path: str, opener: Opener = local_open) -> Iterator[dict]:
    """The rows of a tar's sidecar parquet that are failed downloads (status != success)."""
    for row in raw_rows(path, opener):
        if row["status"] is not None and row["status"] != b"success":
            yield row


def named_read_errors(path: str, rows):
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


# --- webdataset tars -------------------------------------------------------------------------


class _TailTracker:
    """A binary file read through, keeping its last bytes. A tar ends with two zero blocks; one
    cut at a member boundary lacks them, and ``tarfile`` takes the cut for the end."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.tail = raw, b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            self.tail = (self.tail + data)[-_END_OF_ARCHIVE:]
        return data

    def ends_as_a_tar(self) -> bool:
        while self.read(1 << 16):
            pass
        return self.tail == bytes(_END_OF_ARCHIVE)


def _unread_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    return "device or FIFO"


def tar_samples(path: str, with_data: bool = True, opener: Opener = local_open) -> Iterator[dict]:
    """Group a webdataset tar into samples ``{"__key__": key, suffix: bytes, ...}``: consecutive
    members sharing a key. Names are split as webdataset's reader splits them: the key is the
    member path up to the first dot of its basename, the suffix the rest, lower-cased
    (``photo.v2.jpg`` is key ``photo``, suffix ``v2.jpg``); a basename without a dot, or starting
    with one, is no sample member. A member suffix seen twice starts a new sample, so a repeated
    key becomes a second sample (a duplicate-key error downstream), not a lost shard. A member
    that is a link, a device or a FIFO is not read: ``"__unread__"`` lists it as (name, kind),
    and :func:`tar_rows` makes the sample an error row. ``with_data=False`` leaves the values
    empty (counting). ValueError naming the file when it is no tar or is cut short (inside a
    member, or at a member boundary: no end-of-archive blocks)."""
    current: dict | None = None
    try:
        with opener(path) as f:
            tracked = _TailTracker(f)
            with tarfile.open(fileobj=tracked, mode="r|") as tar:
                for member in tar:
                    if member.isdir():
                        continue
                    base = posixpath.basename(member.name)
                    if base.startswith(".") or "." not in base:
                        continue
                    key, suffix = base.split(".", 1)
                    key, suffix = posixpath.join(posixpath.dirname(member.name), key), suffix.lower()
                    if current is None or current["__key__"] != key or suffix in current:
                        if current is not None:
                            yield current
                        current = {"__key__": key}
                    if member.isfile():
                        current[suffix] = tar.extractfile(member).read() if with_data else b""
                    else:
                        current.setdefault("__unread__", []).append((member.name, _unread_kind(member)))
            if not tracked.ends_as_a_tar():
                raise ValueError(f"{path}: the tar ends without its end-of-archive blocks (cut short at a "
                                 f"member boundary); download or copy it again")
    except tarfile.TarError as err:
        raise ValueError(f"{path}: not a readable tar file ({err})") from err
    if current is not None:
        yield current


def sample_field(sample: dict, exts: tuple[str, ...]) -> bytes | None:
    """The value of a sample's field named one of ``exts`` (in that order), else of its first
    field whose last extension is one (``v2.jpg`` is a jpg, as webdataset's decoders read it)."""
    for ext in exts:
        if ext in sample:
            return sample[ext]
    for suffix, value in sample.items():
        if not suffix.startswith("__") and suffix.rsplit(".", 1)[-1] in exts:
            return value
    return None


def _sample_metadata(sample: dict) -> tuple[dict, str | None]:
    """(the sample's json as a mapping, why it cannot be used or None). Unparseable JSON counts as
    absent, as before; JSON that is not an object, or whose key/url/sha256/caption is not a
    string, is a problem of this sample only."""
    raw = sample_field(sample, ("json",))
    if raw is None:
        return {}, None
    try:
        meta = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return {}, None
    if not isinstance(meta, dict):
        return {}, f"its json is {type(meta).__name__}, not an object"
    for name in ("key", "url", "sha256", "caption"):
        if meta.get(name) is not None and not isinstance(meta[name], str):
            return {}, f"its json {name} is {type(meta[name]).__name__} {meta[name]!r:.80}, not a string"
    return meta, None


def tar_rows(path: str, opener: Opener = local_open) -> Iterator[dict]:
    """The samples of an img2dataset webdataset tar as raw-shard rows (RAW_ROW_COLUMNS, bytes
    values; the key, url and sha256 from the sample's json, the caption from its txt). A sample
    that cannot be curated keeps its tar key and carries ``read_error`` (error type, message),
    which curate turns into an error row for that sample alone: a member that is a link or a
    device (``link_member``), no image member (``no_image``, ``jpg`` None), or json that cannot be
    used (``invalid_metadata``)."""
    for sample in tar_samples(path, opener=opener):
        meta, problem = _sample_metadata(sample)
        image = sample_field(sample, IMAGE_EXTS)
        key = meta.get("key") or sample["__key__"]
        caption = sample_field(sample, ("txt",))
        row = {
            "key": key.encode("utf-8"),
            "url": (meta.get("url") or "").encode("utf-8") or None,
            "caption": caption if caption is not None else (meta.get("caption") or "").encode("utf-8"),
            "status": b"success",
            "error_message": None,
            "sha256": (meta.get("sha256") or "").encode("utf-8") or None,
            "jpg": image,
        }
        where = f"sample {sample['__key__']!r} of {path}"
        if sample.get("__unread__"):
            name, kind = sample["__unread__"][0]
            row["read_error"] = ("link_member", f"{where}: member {name} is a {kind}; only regular files are read")
        elif image is None:
            fields = sorted(k for k in sample if not k.startswith("__"))
            row["read_error"] = ("no_image", f"{where} has no image member ({'/'.join(IMAGE_EXTS)}); has {fields}")
        elif problem:
            row["read_error"] = ("invalid_metadata", f"{where}: {problem}")
        yield row
