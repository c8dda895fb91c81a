"""Reading and writing for the release build (``pipeline.release.build``).

* ``scan_rows``: pass 1 over the curated shards — keys, keep flags, the ranking scores of the
  selected captions, the SHA-256 of the image bytes and the image embedding of every kept row.
* ``load_decontamination_set``: the same for the evaluation images named by ``--decontaminate``.
* ``ParquetOut``: a parquet file written batch by batch whose write errors name it;
* ``ShardWriter``: released rows resharded to ``shards/part-XXXXX.parquet`` and, optionally,
  webdataset tars in the layout LAVIS's LAION loader reads (see docs/release.md): one sample
  per image, ``NNNNNNNNN.jpg`` with the bytes and ``NNNNNNNNN.json`` whose ``caption`` is the
  top-ranked selected caption. Sample keys are sequence numbers, never the row key, so no file
  name inside a tar is built from untrusted text.
"""
from __future__ import annotations

import glob as globlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.transforms import shards as reader
from capfilt.transforms.files.atomic import naming
from capfilt.transforms.files.hashing import bytes_sha256
from capfilt.transforms.image import DRAFT_SIDE, ImageDecodeError, decode_image
from capfilt.transforms.schemas import CURATED_SCHEMA, check_columns

log = logging.getLogger(__name__)

CURATED_READ_SCHEMA = CURATED_SCHEMA
REQUIRED_COLUMNS = ("key", "jpg", "keep")
# removed.parquet: the curated row without its image, plus why it is not in the release.
REMOVED_SCHEMA = pa.schema(
    [f for f in CURATED_SCHEMA if f.name != "jpg"]
    + [
        ("source", pa.string()),        # input shard the row came from
        ("reason", pa.string()),        # one of pipeline.release.build.REASONS
        ("detail", pa.string()),        # curate drop reason, decode error, eval file ...
        ("duplicate_of", pa.string()),  # key of the kept row, or of the eval image
        ("similarity", pa.float32()),   # cosine to that row / eval image
    ]
)
PROGRESS_EVERY_S = 5.0


def check_input_schema(path: Path) -> None:
    """Fail before any work when a curated shard lacks a required column or has a bad type."""
    schema, _rows = reader.parquet_schema(str(path))
    check_columns(schema, REQUIRED_COLUMNS, CURATED_SCHEMA, where=str(path))


def selected_scores(row: dict) -> tuple[float, float]:
    """(best CLIP, best ITM) over the row's selected captions; NaN when none is scored."""
    clips, itms = [], []
    synthetic = row.get("synthetic_captions") or []
    for caption, source in zip(row.get("captions") or [], row.get("caption_sources") or []):
        if source == "web":
            clips.append(row.get("web_clip")), itms.append(row.get("web_itm"))
        elif caption in synthetic:
            j = synthetic.index(caption)
            clips.append(_at(row.get("synthetic_clip"), j)), itms.append(_at(row.get("synthetic_itm"), j))
    return _best(clips), _best(itms)


def _at(values, j):
    return values[j] if values is not None and j < len(values) else None


def _best(values) -> float:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(max(vals)) if vals else float("nan")


class _Embedder:
    """Decode and embed images in batches of ``batch_size``, remembering which row each is."""

    def __init__(self, embedder, batch_size: int, what: str, total: int):
        self.embedder, self.batch_size, self.what, self.total = embedder, max(1, batch_size), what, total
        self.pending, self.pending_rows, self.rows, self.chunks = [], [], [], []
        self.t0 = self.last = time.time()
        self.done = 0

    def add(self, row: int, data) -> str | None:
        """Queue one image; returns an unreadable reason instead when it cannot be decoded."""
        if data is None:
            return "no_image"
        try:
            self.pending.append(decode_image(data, draft_side=DRAFT_SIDE))
        except ImageDecodeError as err:
            return f"decode:{err.reason}"
        self.pending_rows.append(row)
        if len(self.pending) >= self.batch_size:
            self.flush()
        return None

    def flush(self) -> None:
        if not self.pending:
            return
        emb = np.array(self.embedder(self.pending), dtype=np.float32)  # (B, D)
        if emb.ndim != 2 or emb.shape[0] != len(self.pending):
            raise ValueError(f"embedder returned shape {emb.shape} for {len(self.pending)} images")
        faiss.normalize_L2(emb)  # cosine = inner product, whatever the embedder returned
        self.chunks.append(emb)
        self.rows.extend(self.pending_rows)
        self.done += len(self.pending)
        self.pending, self.pending_rows = [], []
        if time.time() - self.last >= PROGRESS_EVERY_S:
            self.last = time.time()
            log.info("%s: embedded %d/%s images (%.1f/s)", self.what, self.done, self.total or "?",
                     self.done / max(self.last - self.t0, 1e-9))

    def result(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions (n,) int64 with -1 for rows not embedded, embeddings (M, D))."""
        self.flush()
        pos = np.full(n, -1, np.int64)
        pos[np.asarray(self.rows, dtype=np.int64)] = np.arange(len(self.rows))
        emb = np.concatenate(self.chunks) if self.chunks else np.zeros((0, 1), np.float32)
        return pos, emb


@dataclass
class ScannedRows:
    """Pass-1 view of N input rows (input order).

    keys, sha256, unreadable: (N,) object arrays (str / str / None-or-reason);
    keep: (N,) bool; drop_reason: N items; rank: (N, 2) float64 (best CLIP, best ITM);
    emb_pos: (N,) int64 index into emb (-1: not embedded); emb: (M, D) float32 normalised.
    """

    keys: np.ndarray
    keep: np.ndarray
    drop_reason: list
    sha256: np.ndarray
    unreadable: np.ndarray
    rank: np.ndarray
    emb_pos: np.ndarray
    emb: np.ndarray

    def embeddings(self, rows: np.ndarray) -> np.ndarray:
        pos = self.emb_pos[rows]
        if (pos < 0).any():
            raise ValueError(f"row {int(rows[pos < 0][0])} has no embedding")
        return self.emb[pos]


def scan_rows(files: list[Path], embedder, batch_size: int) -> ScannedRows:
    """Pass 1 over curated shards: metadata of every row, hash + embedding of kept rows."""
    emb = _Embedder(embedder, batch_size, "release", reader.row_count(files))
    keys, keep, drop, sha, bad, rank = [], [], [], [], [], []
    for path in files:
        first = len(keys)
        for batch in reader.parquet_batches(path, schema=CURATED_READ_SCHEMA):
            jpgs = batch.column("jpg")
            meta = batch.drop_columns(["jpg"]).to_pylist()
            for i, row in enumerate(meta):
                n = len(keys)
                if row["key"] is None:
                    raise ValueError(f"{path}: row {n - first} has a null key")
                keys.append(row["key"])
                kept = bool(row["keep"])
                keep.append(kept)
                drop.append(row.get("drop_reason"))
                data = jpgs[i].as_py() if kept else None
                sha.append(bytes_sha256(data) if data else "")
                bad.append(emb.add(n, data) if kept else None)
                rank.append(selected_scores(row) if kept else (np.nan, np.nan))
    emb_pos, vectors = emb.result(len(keys))
    return ScannedRows(
        np.array(keys, dtype=object), np.array(keep, dtype=bool), drop, np.array(sha, dtype=object),
        np.array(bad, dtype=object), np.array(rank, dtype=np.float64).reshape(-1, 2), emb_pos, vectors)


@dataclass
class DecontaminationSet:
    """Evaluation images to decontaminate against.

    keys: M eval keys; embeddings: (M, D); file_of: (M,) index into files;
    by_hash: image SHA-256 -> eval index; unreadable: eval rows that could not be decoded.
    """

    files: list[str]
    keys: list[str]
    embeddings: np.ndarray
    file_of: np.ndarray
    by_hash: dict
    unreadable: int


def load_decontamination_set(pattern: str, embedder, batch_size: int) -> DecontaminationSet:
    """Embed the images of the evaluation shards matching ``pattern``: raw or curated parquet,
    or img2dataset webdataset tars (a COCO / Flickr test split downloaded like the web data)."""
    files = sorted(f for f in globlib.glob(pattern, recursive=True) if not reader.is_tar_sidecar(f))
    if not files:
        raise ValueError(f"--decontaminate {pattern!r} matches no file")
    for f in files:
        if f.endswith(".parquet"):
            check_columns(pq.read_schema(f), ("key", "jpg"), pa.schema([("key", pa.string()), ("jpg", pa.binary())]), f)
        elif not f.endswith(".tar"):
            raise ValueError(f"--decontaminate: {f} is neither a parquet shard nor a webdataset tar")
    total = reader.row_count(f for f in files if f.endswith(".parquet"))
    emb = _Embedder(embedder, batch_size, "eval set", total or None)
    keys, file_of, by_hash, unreadable, row = [], [], {}, 0, 0
    for fi, f in enumerate(files):
        for key, jpg, ok in _eval_rows(f):
            if not ok or emb.add(row, jpg) is not None:
                unreadable += 1
                continue
            keys.append(key)
            file_of.append(fi)
            by_hash.setdefault(bytes_sha256(jpg), row)
            row += 1
    pos, vectors = emb.result(row)
    if unreadable:
        log.warning("eval set: %d rows skipped (failed downloads or undecodable images)", unreadable)
    return DecontaminationSet(files, keys, vectors[pos] if row else vectors, np.array(file_of, np.int64), by_hash,
                              unreadable)


def _eval_rows(path: str):
    """(key, image bytes, downloaded) per row of one evaluation shard."""
    if path.endswith(".tar"):
        count = 0
        for rec in reader.tar_rows(path):  # a sample without a regular image member has no jpg
            key = rec["key"].decode("utf-8", errors="replace") if isinstance(rec["key"], bytes) else str(rec["key"])
            count += 1
            yield key, rec["jpg"], rec["jpg"] is not None
        reader.check_tar_count(path, count)
        return
    schema, _rows = reader.parquet_schema(path)
    cols = ["key", "jpg"] + (["status"] if "status" in schema.names else [])
    for batch in reader.parquet_batches(path, cols):
        for rec in batch.to_pylist():
            yield str(rec["key"]), rec["jpg"], rec.get("status", "success") == "success"


def wds_sample(index: int, row: dict) -> dict:
    """One webdataset sample (LAVIS LAION layout) for a released row."""
    captions = row.get("captions") or [row.get("web_caption") or ""]
    meta = {
        "caption": captions[0],
        "captions": captions,
        "caption_sources": row.get("caption_sources") or [],
        "key": row["key"], "url": row.get("url"), "sha256": row.get("sha256"),
        "web_caption": row.get("web_caption"), "width": row.get("width"), "height": row.get("height"),
    }
    return {
        "__key__": f"{index:09d}",
        "jpg": bytes(row["jpg"]),
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        "txt": captions[0].encode("utf-8"),
    }


class ParquetOut:
    """``pyarrow.parquet.ParquetWriter`` on ``path``, whose errors name ``path`` (pyarrow's on
    a full disk name no file)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        with naming(path):
            self._writer = pq.ParquetWriter(path, schema)

    def write_table(self, table: pa.Table) -> None:
        with naming(self.path):
            self._writer.write_table(table)

    def close(self) -> None:
        with naming(self.path):
            self._writer.close()


class ShardWriter:
    """Write rows to fixed-size shards with stable names (part-00000.parquet, 00000.tar, ...)."""

    def __init__(self, out: Path, rows_per_shard: int, webdataset: bool = False):
        self.out, self.rows_per_shard, self.webdataset = Path(out), rows_per_shard, webdataset
        self.shards: list[dict] = []
        self.tars: list[dict] = []
        self._pq = self._tar = None
        self._in_shard = 0
        self._written = 0

    def _open(self) -> None:
        idx = len(self.shards)
        name = f"shards/part-{idx:05d}.parquet"
        self._pq = ParquetOut(self.out / name, CURATED_SCHEMA)
        self.shards.append({"name": name, "rows": 0})
        if self.webdataset:
            import webdataset as wds

            (self.out / "webdataset").mkdir(exist_ok=True)
            tar_name = f"webdataset/{idx:05d}.tar"
            # mtime fixed: the same rows give byte-identical tars.
            self._tar = wds.TarWriter(str(self.out / tar_name), encoder=False, mtime=0)
            self.tars.append({"name": tar_name, "rows": 0})
        self._in_shard = 0

    def _close_current(self) -> None:
        if self._pq is not None:
            self._pq.close()
            self._pq = None
        if self._tar is not None:
            with naming(self.out / self.tars[-1]["name"]):
                self._tar.close()
            self._tar = None

    def write(self, table: pa.Table) -> None:
        table = table.select(CURATED_SCHEMA.names).cast(CURATED_SCHEMA)
        offset = 0
        while offset < table.num_rows:
            if self._pq is None or self._in_shard >= self.rows_per_shard:
                self._close_current()
                self._open()
            part = table.slice(offset, self.rows_per_shard - self._in_shard)
            self._pq.write_table(part)
            if self._tar is not None:
                with naming(self.out / self.tars[-1]["name"]):
                    for i, row in enumerate(part.to_pylist()):
                        self._tar.write(wds_sample(self._written + i, row))
                self.tars[-1]["rows"] += part.num_rows
            self.shards[-1]["rows"] += part.num_rows
            self._in_shard += part.num_rows
            self._written += part.num_rows
            offset += part.num_rows

    def close(self) -> dict:
        """{"shards": [{"name", "rows"}], "webdataset": [...]} of everything written."""
        self._close_current()
        return {"shards": self.shards, "webdataset": self.tars}
