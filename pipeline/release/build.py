"""Build a dataset release from curated shards: keep → decontaminate → exact and near
dedup (with unique keys) → reshard, with a manifest, a dataset card and an HTML report.

The build streams the input twice with ``pyarrow.dataset``. Pass 1 reads every row without
holding images: it hashes and embeds the image of each kept row (embeddings are the only
per-row arrays of size D). The dedup and decontamination decisions are then made on those
arrays (``pipeline.dedup``, faiss). Pass 2 reads the rows again in the same order and writes
released rows to ``shards/part-XXXXX.parquet`` (and optionally webdataset tars) and every
other row, without its image, to ``removed.parquet`` with the reason. So every input row is
either released or listed in ``removed.parquet``, which ``release_manifest.check_counts``
verifies before the release is moved into place.

It is plain Python over ``pyarrow.dataset``, not a Beam pipeline: the dedup and
decontamination decisions need every kept row's embedding in one faiss index, in one process,
before any row can be written, so the build is two sequential passes around one global step,
which Beam's element-wise model would only wrap.

Inputs are the shards each curate output's ``manifest.json`` records, checked against their
recorded SHA-256 before any image is read (``list_input_shards``), so a lost or changed shard
stops the build instead of shipping part of the data.

The release is built in a staging directory beside ``out`` (created before the CLIP pass, so an
unwritable ``out`` fails at once) and renamed over it at the end, so a failed build never
leaves a half-written release behind. What may be replaced is checked first (``out_dir.check_release_out``):
with ``overwrite`` only an empty directory or an earlier release, never an input.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from capfilt.pipeline.release import dedup, manifest as release_manifest
from capfilt.pipeline.release.out_dir import check_release_out, discard_stage, stage_dir, swap_into_place
from capfilt.pipeline.files import file_sha256, is_remote
from capfilt.pipeline.release.remote import as_given, local_inputs
from capfilt.pipeline.release.shards import (
    CURATED_READ_SCHEMA, PROGRESS_EVERY_S, REMOVED_SCHEMA, DecontaminationSet, ParquetOut, ShardWriter,
    check_input_schema, load_decontamination_set, scan_rows,
)
from capfilt.transforms import shards as reader
from capfilt.transforms.files import atomic

log = logging.getLogger(__name__)

Embedder = Callable[[list], np.ndarray]  # list of RGB PIL images -> (B, D) normalised

# Why a row is not in the release; `reason` column of removed.parquet.
REASONS = ("not_kept", "unreadable", "exact_duplicate", "duplicate_key", "near_duplicate", "contaminated")


@dataclass
class ReleaseConfig:
    """Options of one release build; the fields with a ``help`` are the `capfilt release` options."""

    inputs: list[Path] = field(metadata={
        "help": "curate output directories; the shards each one's manifest.json records are read, checked "
                "against their recorded SHA-256", "flag": "--input", "nargs": "+", "metavar": "DIR", "type": Path})
    out: Path = field(metadata={"help": "release directory to write", "metavar": "DIR", "type": Path})
    dedup_threshold: float = field(default=0.95, metadata={
        "help": "cosine of CLIP image embeddings at or above which two images are near-duplicates", "metavar": "T"})
    decontaminate: str | None = field(default=None, metadata={
        "help": "raw or curated parquet shards of evaluation images (e.g. the synth test split); "
                "near-duplicates of any of them are removed", "metavar": "GLOB"})
    decontaminate_threshold: float | None = field(default=None, metadata={  # None: same as dedup_threshold
        "help": "cosine threshold for decontamination; None means the same as --dedup-threshold", "metavar": "T"})
    rows_per_shard: int = field(default=10_000, metadata={
        "help": "rows per output shard (shards are named part-00000.parquet, ...)", "metavar": "N"})
    webdataset: bool = field(default=False, metadata={
        "help": "also write webdataset tars (jpg + json with 'caption') for LAVIS's LAION loader"})
    clip: str | None = field(default=None, metadata={  # None: the CLIP in the first input's curate manifest
        "help": "CLIP model for image embeddings (open_clip name:pretrained, a directory from `models init "
                "--kind clip`, or hub id); None means the CLIP in the first input's curate manifest", "metavar": "M"})
    index: str = field(default="auto", metadata={
        "help": "faiss index: auto = exact flat up to 50k images, IVF above", "choices": dedup.INDEX_KINDS})
    batch_size: int = field(default=32, metadata={"help": "images per CLIP batch", "metavar": "B"})
    seed: int = field(default=0, metadata={"help": "seed of the IVF k-means training"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace --out when it is a capfilt release (manifest.json format) or an empty directory; "
                "anything else is refused, as is an --out that is, holds or is inside an --input"})
    report: bool = field(default=True, metadata={"help": "skip report.html", "flag": "--no-report"})

    def __post_init__(self):
        # s3:// and gs:// curate outputs stay URLs (copied at build time: pipeline/release/remote.py)
        self.inputs = [str(p) if is_remote(str(p)) else Path(p) for p in self.inputs]
        self.out = Path(self.out)
        if not self.inputs:
            raise ValueError("release needs at least one --input curate directory")
        for name in ("dedup_threshold", "decontaminate_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
        if self.rows_per_shard < 1:
            raise ValueError(f"--rows-per-shard must be >= 1, got {self.rows_per_shard}")
        if self.index not in dedup.INDEX_KINDS:
            raise ValueError(f"--index must be one of {dedup.INDEX_KINDS}, got {self.index!r}")
        self._check_paths()

    def _check_paths(self) -> None:
        """An input given twice would be released twice (every row a duplicate of itself), and
        an --out that is, holds or sits inside an input would be deleted or written into by the
        swap at the end. Compared as resolved paths, so `C1`, `./C1/` and a symlink are one."""
        seen: dict[Path, Path] = {}
        for given in self.inputs:
            real = given.rstrip("/") if isinstance(given, str) else given.resolve()  # a URL as written
            if real in seen:
                same = "" if str(seen[real]) == str(given) else f" (as {seen[real]} and {given})"
                raise ValueError(f"input {seen[real]} given twice{same}")
            seen[real] = given
        out = self.out.resolve()
        for real, given in seen.items():
            relation = (None if isinstance(real, str) else "is" if out == real else "is inside"
                        if real in out.parents else "contains" if out in real.parents else None)
            if relation:
                raise ValueError(f"--out {self.out} {relation} --input {given}: a release never writes over its inputs")

    @property
    def eval_threshold(self) -> float:
        return self.dedup_threshold if self.decontaminate_threshold is None else self.decontaminate_threshold

    def settings(self) -> dict:
        """The options that decide the release content (recorded in manifest.json)."""
        return {
            "dedup_threshold": self.dedup_threshold,
            "decontaminate": self.decontaminate,
            "decontaminate_threshold": self.eval_threshold,
            "rows_per_shard": self.rows_per_shard,
            "webdataset": self.webdataset,
            "clip": self.clip,
            "index": self.index,
            "seed": self.seed,
            # Not content-deciding in principle, but CLIP embeddings of a batch can differ in
            # the last float digits with its size, and so can removed.parquet's similarities
            # (and its hash): recorded so that two builds that differ are explained.
            "batch_size": self.batch_size,
        }


@dataclass
class RowDecisions:
    """Per-row outcome of the build over N input rows (input order).

    reason: (N,) int8 — 0 released, else 1 + index into REASONS.
    detail / duplicate_of: N strings or None; similarity: (N,) float32, NaN when not applicable.
    """

    reason: np.ndarray
    detail: list = field(default_factory=list)
    duplicate_of: list = field(default_factory=list)
    similarity: np.ndarray | None = None

    @classmethod
    def empty(cls, n: int) -> "RowDecisions":
        return cls(np.zeros(n, np.int8), [None] * n, [None] * n, np.full(n, np.nan, np.float32))

    def mark(self, rows, reason: str, detail=None, duplicate_of=None, similarity=None) -> None:
        code = REASONS.index(reason) + 1
        for pos, row in enumerate(np.asarray(rows, dtype=np.int64).tolist()):
            self.reason[row] = code
            self.detail[row] = detail[pos] if isinstance(detail, list) else detail
            self.duplicate_of[row] = None if duplicate_of is None else duplicate_of[pos]
            if similarity is not None:
                self.similarity[row] = similarity[pos]

    def count(self, reason: str) -> int:
        return int((self.reason == REASONS.index(reason) + 1).sum())


def list_input_shards(inputs: list[Path]) -> tuple[list[Path], list[str], list[str]]:
    """The curated shards each input's curate manifest.json records, in a stable order; each
    one's name as `DIR/shards/NAME` (the `source` column of removed.parquet) and its SHA-256.

    Every recorded shard must exist with the recorded hash (a lost or changed shard would make
    a partial or unaccounted release) and `shards/` must hold no other parquet file; the
    schemas are checked too. All of this before any image is read."""
    files, sources, hashes = [], [], []
    t0 = last = time.time()
    for d in inputs:
        if not d.is_dir():
            raise ValueError(f"release input {d} is not a directory")
        recorded = release_manifest.recorded_shards(d)
        if not recorded:
            raise ValueError(f"release input {d}: its manifest.json records no curated shards (shards/*.parquet)")
        names = {s["name"] for s in recorded}
        unrecorded = sorted(p.name for p in (d / "shards").glob("*.parquet") if p.name not in names)
        if unrecorded:
            raise ValueError(f"release input {d}: shards/{unrecorded[0]} is not in its manifest.json "
                             f"({len(unrecorded)} such file(s)); re-run curate to finish the output")
        for shard in recorded:
            path = d / "shards" / shard["name"]
            if not path.is_file():
                raise ValueError(f"release input {d}: shard shards/{shard['name']} is recorded in its "
                                 f"manifest.json but missing; re-run curate to restore it")
            digest = file_sha256(str(path))
            if digest != shard["sha256"]:
                raise ValueError(f"release input {d}: shard shards/{shard['name']} changed since curate wrote it "
                                 f"(sha256 {digest[:12]}..., manifest.json records {shard['sha256'][:12]}...)")
            check_input_schema(path)
            files.append(path)
            sources.append(f"{d}/shards/{shard['name']}")
            hashes.append(digest)
            if time.time() - last >= PROGRESS_EVERY_S:
                last = time.time()
                log.info("checking inputs: %d shard(s) hashed (%.0f s)", len(files), last - t0)
    return files, sources, hashes


def _dedup_step(rows, live: np.ndarray, out: RowDecisions, cfg: ReleaseConfig) -> dict:
    """Exact and near dedup and key uniqueness among the rows still in the release.

    Three rules, settled so that no row is removed for a key it does not have and every
    removed row's ``duplicate_of`` names a row that is released:

    1. Rows with identical image bytes are one image; images whose CLIP cosine reaches the
       threshold are joined into one image group (union-find over the distinct images).
    2. A key may appear once in a release: ``duplicate_of``, the tar JSON and users' joins
       name a row by its key.
    3. Rows are visited best first (``dedup.rank_order``: best selected-caption CLIP, then ITM,
       then the smallest key). A row is released when its image group has no released row yet
       and its key is still free.

    A removed row whose image group has a released row is an ``exact_duplicate`` (same bytes)
    or a ``near_duplicate`` of it, even when its key was also taken: its picture is in the
    release. Only a row whose whole image group lost out on keys is a ``duplicate_key``, and
    its ``duplicate_of`` is the released row holding its key (a better-ranked row).

    Union-find alone (key groups and image groups in one cluster) would chain unrelated images
    through shared keys and drop images whose keys are unique; hence this greedy pass."""
    n = len(live)
    keys = rows.keys[live].astype(str)
    _, first_hash, by_hash = np.unique(rows.sha256[live], return_index=True, return_inverse=True)
    # One embedding per distinct image: exact copies have the same bytes, hence the same picture.
    plan = dedup.plan_index(len(first_hash), cfg.index, seed=cfg.seed)
    vectors = rows.embeddings(live[first_hash])  # (U, D)
    pairs, _ = dedup.similar_pairs(vectors, cfg.dedup_threshold, plan)
    log.info("near-dup: %d pairs at cosine >= %.3f among %d distinct images (%s index)",
             len(pairs), cfg.dedup_threshold, len(first_hash), plan.kind)
    group = dedup.cluster_labels(len(first_hash), pairs)[by_hash.reshape(-1)]  # (n,) image group per row

    released_of_group: dict[int, int] = {}
    holder: dict[str, int] = {}  # key -> the released row (index into live) that has it
    for i in dedup.rank_order(rows.rank[live], keys).tolist():
        g = int(group[i])
        if g in released_of_group or keys[i] in holder:
            continue
        released_of_group[g] = i
        holder[keys[i]] = i

    gone = np.array([i for i in range(n) if released_of_group.get(int(group[i])) != i], dtype=np.int64)
    if not len(gone):
        return plan.to_dict()
    has_copy = np.array([int(group[i]) in released_of_group for i in gone], dtype=bool)
    dup = gone[has_copy]
    kept = np.array([released_of_group[int(group[i])] for i in dup], dtype=np.int64)
    exact = rows.sha256[live[dup]] == rows.sha256[live[kept]]
    out.mark(live[dup[exact]], "exact_duplicate", duplicate_of=list(keys[kept[exact]]),
             similarity=np.ones(int(exact.sum()), np.float32))
    near, near_kept = dup[~exact], kept[~exact]
    if len(near):
        sim = np.einsum("nd,nd->n", rows.embeddings(live[near]), rows.embeddings(live[near_kept]))  # (K,)
        out.mark(live[near], "near_duplicate", duplicate_of=list(keys[near_kept]), similarity=sim.astype(np.float32))
    lost = gone[~has_copy]
    out.mark(live[lost], "duplicate_key", duplicate_of=[keys[holder[keys[i]]] for i in lost],
             detail="same key as a released row with a different, better-ranked image")
    return plan.to_dict()


def _decontaminate_step(rows, live: np.ndarray, out: RowDecisions, cfg: ReleaseConfig,
                        eval_set: DecontaminationSet) -> dict:
    plan = dedup.plan_index(len(eval_set.keys), cfg.index, seed=cfg.seed)
    near = dedup.nearest_eval(rows.embeddings(live), eval_set.embeddings, plan)
    match, sim = near.match.copy(), near.similarity.copy()
    # Identical bytes are contamination whatever the embedding says.
    by_hash = np.array([eval_set.by_hash.get(h, -1) for h in rows.sha256[live]], dtype=np.int64)
    match[by_hash >= 0], sim[by_hash >= 0] = by_hash[by_hash >= 0], 1.0
    hit = np.flatnonzero((match >= 0) & (sim >= cfg.eval_threshold))
    out.mark(live[hit], "contaminated", similarity=sim[hit], duplicate_of=[eval_set.keys[m] for m in match[hit]],
             detail=[f"eval image in {eval_set.files[eval_set.file_of[m]]}" for m in match[hit]])
    return plan.to_dict()


def decide(rows, cfg: ReleaseConfig, eval_set: DecontaminationSet | None) -> tuple[RowDecisions, dict]:
    """Apply keep → decontamination → dedup (exact, near, key) to the scanned rows.

    Decontamination comes before dedup: a row that is removed as contaminated must not take
    its near copies with it (they may be clean, and their ``duplicate_of`` would name a row
    that is not released). Dedup is last, so every ``duplicate_of`` names a released row.

    Returns the per-row decisions and the faiss plans used (for the manifest)."""
    out = RowDecisions.empty(len(rows.keys))
    dropped = np.flatnonzero(~rows.keep)
    out.mark(dropped, "not_kept", detail=[rows.drop_reason[i] for i in dropped])
    bad = np.flatnonzero(rows.keep & np.array([u is not None for u in rows.unreadable], dtype=bool))
    out.mark(bad, "unreadable", detail=[rows.unreadable[i] for i in bad])
    plans = {}
    def live() -> np.ndarray:  # rows still in the release
        return np.flatnonzero(out.reason == 0)

    if eval_set is not None and len(eval_set.keys) and len(live()):
        plans["decontaminate"] = _decontaminate_step(rows, live(), out, cfg, eval_set)
    if len(live()):
        plans["near_dedup"] = _dedup_step(rows, live(), out, cfg)
    return out, plans


def _removed_table(batch: pa.RecordBatch, rows: np.ndarray, source: str, dec: RowDecisions) -> pa.Table:
    table = pa.Table.from_batches([batch]).drop_columns(["jpg"])
    n = len(rows)
    extra = {
        "source": pa.array([source] * n, pa.string()),
        "reason": pa.array([REASONS[dec.reason[r] - 1] for r in rows], pa.string()),
        "detail": pa.array([dec.detail[r] for r in rows], pa.string()),
        "duplicate_of": pa.array([dec.duplicate_of[r] for r in rows], pa.string()),
        "similarity": pa.array(dec.similarity[rows], pa.float32()),
    }
    for name, arr in extra.items():
        table = table.append_column(name, arr)
    return table.select(REMOVED_SCHEMA.names).cast(REMOVED_SCHEMA)


def write_outputs(files: list[Path], sources: list[str], dec: RowDecisions, stage: Path,
                  cfg: ReleaseConfig) -> dict:
    """Pass 2: released rows → resharded parquet (+ tars); the rest → removed.parquet."""
    writer = ShardWriter(stage, cfg.rows_per_shard, webdataset=cfg.webdataset)
    removed = ParquetOut(stage / "removed.parquet", REMOVED_SCHEMA)
    start = 0
    t0 = last = time.time()
    try:
        for path, source in zip(files, sources):
            for batch in reader.parquet_batches(path, schema=CURATED_READ_SCHEMA):
                rows = np.arange(start, start + batch.num_rows)
                start += batch.num_rows
                if time.time() - last >= PROGRESS_EVERY_S:
                    last = time.time()
                    log.info("pass 2: %d/%d rows written (%.0f s)", start, len(dec.reason), last - t0)
                released = dec.reason[rows] == 0
                if released.any():
                    writer.write(pa.Table.from_batches([batch]).filter(pa.array(released)))
                if (~released).any():
                    removed.write_table(_removed_table(batch.filter(pa.array(~released)), rows[~released], source, dec))
    finally:
        removed.close()
        outputs = writer.close()
    if start != len(dec.reason):
        raise release_manifest.AccountingError(
            f"inputs changed during the build: pass 1 read {len(dec.reason)} rows, pass 2 {start}")
    return outputs


def build_release(cfg: ReleaseConfig, embedder: Embedder | None = None) -> dict:
    """Build the release described by ``cfg``; returns the manifest (also in out/manifest.json).

    ``embedder`` maps RGB images to normalised embeddings; by default the CLIP named by
    ``cfg.clip`` (or the curate manifest) loaded through ``model.ranker.ClipRanker``."""
    t0 = time.time()
    check_release_out(cfg.out, cfg.overwrite, cfg.decontaminate)
    with tempfile.TemporaryDirectory(prefix="capfilt-release-inputs-") as workdir:
        return _build(cfg, embedder, t0, *local_inputs(cfg.inputs, Path(workdir)))


def _build(cfg: ReleaseConfig, embedder, t0: float, inputs: list[Path], names: dict[str, str]) -> dict:
    files, sources, hashes = list_input_shards(inputs)
    lineage = release_manifest.curate_lineage(inputs)
    sources, lineage = as_given(sources, lineage, names)  # remote inputs named by their URLs
    if embedder is None:
        cfg.clip = cfg.clip or release_manifest.default_clip(lineage)
    # Before the model is loaded and the images embedded: an unwritable --out fails now.
    stage = stage_dir(cfg.out)
    try:
        if embedder is None:
            embedder = release_manifest.clip_embedder(cfg.clip)
        eval_set = load_decontamination_set(cfg.decontaminate, embedder, cfg.batch_size) if cfg.decontaminate else None
        rows = scan_rows(files, embedder, cfg.batch_size)
        dec, plans = decide(rows, cfg, eval_set)
        outputs = write_outputs(files, sources, dec, stage, cfg)
        counts = release_manifest.count_steps(dec, REASONS, outputs)
        manifest = release_manifest.build_manifest(
            cfg, files, sources, hashes, lineage, eval_set, plans, counts, outputs, stage)
        release_manifest.check_counts(manifest)
        atomic.write_json(stage / "manifest.json", manifest, indent=2, sort_keys=True, end="\n")
        atomic.write_text(stage / "README.md", release_manifest.dataset_card(manifest, report=cfg.report))
        if cfg.report:
            from capfilt.pipeline.release.report import write_report
            write_report(stage, out_file=stage / "report.html", title=str(cfg.out), warn=False)
    except BaseException:
        discard_stage(cfg.out)  # claimed before it is deleted: a kill meanwhile leaves it ours
        raise
    swap_into_place(stage, cfg.out)
    log.info("release %s: %s in %.1f s", cfg.out, counts, time.time() - t0)
    return manifest
