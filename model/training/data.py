"""Training data: a resumable, seeded stream of (image, caption) samples over parquet shards.

Reading is `transforms.shards` (pyarrow; `keep`/`status` pushed down as a scan filter);
decoding is `transforms.image.decode_image`. What no library offers, and what
this module adds, is the ordering contract the pretraining loop needs:

* **Two shard kinds.** Curated shards (`captions` + `keep`, docs/architecture.md) yield only kept rows, and
  each time a row comes round one of its selected `captions` is drawn, as LAVIS draws one caption
  of a sample per step. Raw img2dataset shards (`caption`, `status`) yield `status == "success"`
  rows with the web caption cleaned by `transforms.text.clean_caption` (round 0).
* **Deterministic order.** Per source and epoch, the shard order is permuted and rows pass a
  shuffle buffer, both driven by `numpy.random.default_rng([seed, source, epoch])`. The caption
  drawn for a row depends only on (seed, key, epoch) (`transforms.seeding.sample_seed`).
* **Mixtures.** Several sources with weights: the source of emission `i` is drawn from
  `sample_seed(seed, "mix", i)`, so no random state has to be saved.
* **Exact resume.** The state is a few integers (mixture index, per-source epoch and position);
  `load_state_dict` replays each source's epoch up to its position without decoding images.
* **Ranks.** Under DDP every rank walks the same emission sequence and keeps emissions
  `i` with `(i // batch_size) % world_size == rank`, so with no undecodable images the ranks'
  batches, concatenated in rank order, are exactly the single-process global batch.

Images that fail to decode are skipped and counted by reason (`stats`). A source none of
whose images decode over a whole epoch is an error naming it: skipping alone would loop
over its epochs for ever, never filling a batch.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow.dataset as ds
from PIL import Image

from capfilt.transforms import shards as reader
from capfilt.transforms.image import ImageDecodeError, decode_image
from capfilt.transforms.shards import expand_paths
from capfilt.transforms.seeding import sample_seed
from capfilt.transforms.text import clean_caption

log = logging.getLogger(__name__)
_U63 = float(1 << 63)


@dataclass
class TrainPair:
    """One training pair: a decoded RGB image and the caption drawn for it this time."""

    key: str
    image: Image.Image
    text: str
    source: str


@dataclass
class SourceSpec:
    """A set of shards (glob, directory or file list) and its mixture weight."""

    paths: str | list[str]
    weight: float = 1.0
    name: str = ""

    @classmethod
    def parse(cls, spec: str) -> "SourceSpec":
        """``GLOB`` or ``GLOB:WEIGHT`` (the weight is the text after the last colon, when it
        parses as a number)."""
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                return cls(spec, 1.0, spec)
            if not weight > 0:
                raise ValueError(f"mixture weight must be > 0, got {tail!r} in {spec!r}")
            return cls(head, weight, head)
        return cls(spec, 1.0, spec)


class ShardSource:
    """One source: its shards read in a seeded order through a shuffle buffer, epoch after
    epoch. Emissions are ``(key, texts, jpg)``; `texts` holds the row's candidate captions."""

    def __init__(self, spec: SourceSpec, index: int, seed: int, shuffle_buffer: int):
        self.spec, self.index, self.seed = spec, index, int(seed)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.files = expand_paths(spec.paths)
        self.name = spec.name or str(spec.paths)
        names = set(reader.shards_schema(self.files[:1]).names)
        if {"captions", "keep"} <= names:
            self.kind, text_col = "curated", "captions"
            self.filter = ds.field("keep") == True  # noqa: E712  (a pyarrow expression)
        elif "caption" in names:
            self.kind, text_col = "raw", "caption"
            self.filter = (ds.field("status") == "success") if "status" in names else None
        else:
            raise ValueError(
                f"{self.files[0]}: neither a curated shard (captions, keep) nor a raw "
                f"img2dataset shard (caption); columns are {sorted(names)}"
            )
        if "jpg" not in names or "key" not in names:
            raise ValueError(
                f"{self.files[0]}: training needs the 'key' and 'jpg' columns (a curated run "
                f"with --no-images has no image bytes); columns are {sorted(names)}"
            )
        if reader.all_null(self.files, "jpg"):
            raise ValueError(f"{self.name}: every 'jpg' is null in {len(self.files)} shard(s) (a curate run "
                             f"with --no-images keeps references only): training needs the image bytes")
        self.columns = ["key", text_col, "jpg"]
        self.epoch, self.pos = 0, 0
        self.skipped_captions = 0  # raw rows whose caption cleans to nothing
        self._it = self._epoch_stream(self.epoch)

    def row_count(self) -> int:
        """Rows the source yields in an epoch, counted with the kept / success filter from the
        shards (rows whose image or caption turns out empty still count)."""
        return ds.dataset(self.files, format="parquet").count_rows(filter=self.filter)

    def _rows(self, rng: np.random.Generator):
        for fi in rng.permutation(len(self.files)):
            # each shard read with its own schema, as a dataset fragment scans by default
            for batch in reader.parquet_batches(self.files[int(fi)], self.columns, filter=self.filter):
                cols = batch.to_pydict()
                for key, text, jpg in zip(*(cols[c] for c in self.columns)):
                    if jpg is None or key is None:
                        continue
                    texts = self._texts(text)
                    if texts:
                        yield (str(key), texts, jpg)

    def _texts(self, value) -> list[str]:
        if self.kind == "curated":
            return [t for t in (value or []) if t]
        cleaned = clean_caption(value)
        if not cleaned:
            self.skipped_captions += 1
            return []
        return [cleaned]

    def _epoch_stream(self, epoch: int):
        """All emissions of one epoch, in the seeded order (shard permutation + buffer)."""
        rng = np.random.default_rng([self.seed, self.index, epoch])
        buf: list = []
        for item in self._rows(rng):
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            out, buf[j] = buf[j], item
            yield out
        for j in rng.permutation(len(buf)):
            yield buf[int(j)]

    def next(self):
        """The next emission as (epoch, key, texts, jpg); rolls over to the next epoch."""
        for _ in range(2):
            for item in self._it:
                self.pos += 1
                return (self.epoch, *item)
            if self.pos == 0:
                raise ValueError(f"source {self.name!r}: no usable rows in {len(self.files)} shard(s)")
            self.epoch, self.pos = self.epoch + 1, 0
            self._it = self._epoch_stream(self.epoch)
        raise ValueError(f"source {self.name!r}: no usable rows")  # pragma: no cover

    def seek(self, epoch: int, pos: int) -> None:
        """Restore (epoch, pos) by replaying the epoch's order; nothing is decoded."""
        self.epoch, self.pos = int(epoch), 0
        self._it = self._epoch_stream(self.epoch)
        for _ in range(int(pos)):
            if next(self._it, None) is None:
                raise ValueError(f"source {self.name!r}: cannot seek to {pos} in epoch {epoch}; "
                                 "the shards changed since the checkpoint")
            self.pos += 1


def epoch_rows(specs: list[SourceSpec]) -> int:
    """Rows in one pass over every source (`ShardSource.row_count` summed): the size of an epoch."""
    return sum(ShardSource(spec, i, 0, 1).row_count() for i, spec in enumerate(specs))


@dataclass
class _EpochTally:
    """What this rank decoded of one source in one epoch. `whole`: counted from the epoch's
    first emission (not from a resumed position)."""

    epoch: int
    whole: bool
    decoded: int = 0
    skipped: Counter = field(default_factory=Counter)


@dataclass
class StreamStats:
    """Counters for the run record: rows emitted and images skipped, by reason."""

    emitted: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"emitted": self.emitted, "used": self.used, "skipped": dict(self.skipped)}


class ImageTextStream:
    """The mixture of sources, sharded over ranks, yielding decoded `TrainPair`s in batches."""

    def __init__(self, sources: list[SourceSpec], *, seed: int = 0, shuffle_buffer: int = 1000,
                 rank: int = 0, world_size: int = 1, batch_size: int = 1, decode_kwargs: dict | None = None):
        if not sources:
            raise ValueError("no data sources given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batch_size = int(batch_size)
        self.sources = [ShardSource(s, i, seed, shuffle_buffer) for i, s in enumerate(sources)]
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())
        self.index = 0  # next mixture emission index (the same sequence on every rank)
        self.decode_kwargs = dict(decode_kwargs or {})
        self.stats = StreamStats()
        self._tallies: dict[int, _EpochTally] = {}  # source index -> its current epoch's tally

    def _pick_source(self, i: int) -> ShardSource:
        if len(self.sources) == 1:
            return self.sources[0]
        u = sample_seed(self.seed, "mix", i) / _U63
        return self.sources[min(int(np.searchsorted(self.cum_weights, u, side="right")), len(self.sources) - 1)]

    def _mine(self, i: int) -> bool:
        return (i // self.batch_size) % self.world_size == self.rank

    def __iter__(self):
        return self

    def __next__(self) -> TrainPair:
        while True:
            i = self.index
            source = self._pick_source(i)
            epoch, key, texts, jpg = source.next()
            self.index += 1
            tally = self._tally(source, epoch)
            if not self._mine(i):
                continue
            self.stats.emitted += 1
            try:
                image = decode_image(jpg, **self.decode_kwargs)
            except ImageDecodeError as err:
                self.stats.skipped[err.reason] += 1
                tally.skipped[err.reason] += 1
                if sum(self.stats.skipped.values()) <= 5:
                    log.warning("skipping undecodable image %r from %s: %s", key, source.name, err)
                continue
            tally.decoded += 1
            text = texts[sample_seed(self.seed, key, epoch) % len(texts)] if len(texts) > 1 else texts[0]
            self.stats.used += 1
            return TrainPair(key=key, image=image, text=text, source=source.name)

    def _tally(self, source: ShardSource, epoch: int) -> _EpochTally:
        """The tally of `source`'s current epoch; when a new epoch starts, the finished one is
        checked first (`_check_decodable`)."""
        tally = self._tallies.get(source.index)
        if tally is None or tally.epoch != epoch:
            if tally is not None and tally.decoded == 0 and tally.skipped:
                self._check_decodable(source, tally)
            tally = _EpochTally(epoch, whole=source.pos == 1)
            self._tallies[source.index] = tally
        return tally

    def _check_decodable(self, source: ShardSource, tally: _EpochTally) -> None:
        """Raise when no image of `source` decodes in `tally.epoch`. One process that tried
        every emission of the epoch knows; a rank saw only its share (and a resumed stream only
        the epoch's tail), so then the epoch is replayed and decoded until one image does."""
        skipped = tally.skipped
        if not (self.world_size == 1 and tally.whole):
            skipped = Counter()
            captions = source.skipped_captions  # the replay must not count these twice
            for _key, _texts, jpg in source._epoch_stream(tally.epoch):
                try:
                    decode_image(jpg, **self.decode_kwargs)
                    source.skipped_captions = captions
                    return
                except ImageDecodeError as err:
                    skipped[err.reason] += 1
            source.skipped_captions = captions
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
        raise ValueError(f"source {source.name!r}: no image of a whole epoch decodes ({sum(skipped.values())} "
                         f"skipped: {reasons}); check the shards' jpg column")

    def next_batch(self, batch_size: int | None = None) -> list[TrainPair]:
        """The next `batch_size` decodable samples of this rank."""
        return [next(self) for _ in range(int(batch_size or self.batch_size))]

    def state_dict(self) -> dict:
        """Plain ints: enough to resume at the exact next sample."""
        return {
            "index": self.index,
            "sources": [{"epoch": s.epoch, "pos": s.pos} for s in self.sources],
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"data state has {len(state['sources'])} sources, the stream has "
                             f"{len(self.sources)}; resume with the same --data/--mix")
        self.index = int(state["index"])
        for source, st in zip(self.sources, state["sources"]):
            source.seek(st["epoch"], st["pos"])
        stats = state.get("stats", {})
        self.stats = StreamStats(int(stats.get("emitted", 0)), int(stats.get("used", 0)),
                                 Counter(stats.get("skipped", {})))
        self._tallies = {}  # the resumed epochs are partly seen: _tally replays them if needed

    def describe(self) -> dict:
        return {
            "sources": [{"name": s.name, "kind": s.kind, "shards": len(s.files), "epoch": s.epoch,
                         "skipped_captions": s.skipped_captions} for s in self.sources],
            **self.stats.as_dict(),
        }
