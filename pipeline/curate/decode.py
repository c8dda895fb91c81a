"""Per-row checks before any batching: duplicate keys, then image decode and caption cleaning.

Both run element by element, ahead of the RunInference stages, because a bad element inside
a RunInference batch fails the whole batch.

* **Duplicate keys.** The first occurrence by (input shard order, row index) wins; later
  ones become error rows (stage ``read``, type ``duplicate_key`` or ``key_collision``). Keys
  already curated into the same ``--out`` by an earlier run count as first, so an incremental
  run and a clean run decide alike. Only the (key, shard, row) triples are shuffled, never
  the images.
* **Decode.** ``transforms.image.decode_image``: bytes that are not a usable image become
  error rows (stage ``decode``, type = the ``ImageDecodeError`` reason). A JPEG at least twice
  ``transforms.image.DRAFT_SIDE`` (1024) on its shorter side is decoded at a reduced scale that
  keeps both sides >= 1024; ``width``/``height`` stay those of the stored image. The web caption is
  cleaned with ``transforms.text.clean_caption`` in the same step, and the per-sample
  sampling seed ``sample_seed(run seed, key, 0)`` is set.

Both raise ``StageError`` for a row they reject; ``pipeline.curate.errors.catch`` makes it an
error row.
"""
from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.io.parquetio import ReadAllFromParquet

from capfilt.pipeline.curate.errors import StageError, catch
from capfilt.transforms.image import DRAFT_SIDE, ImageDecodeError, decode_image
from capfilt.transforms.rows import Sample
from capfilt.transforms.seeding import sample_seed
from capfilt.transforms.text import clean_caption

# Error stages whose rows never reached duplicate resolution in the run that wrote them.
_PRE_DEDUP_STAGES = ("read", "download")


def decode_sample(sample: Sample, *, run_seed: int, max_pixels: int, min_side: int,
                  max_aspect: float, max_words: int) -> Sample:
    """Decode and validate the image, clean the caption, set the seed (raises StageError)."""
    try:
        image = decode_image(sample.jpg, max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect,
                             draft_side=DRAFT_SIDE)
    except ImageDecodeError as err:
        raise StageError("decode", err.reason, err.message) from err
    width, height = image.info["source_size"]
    # The decoded image is not carried on: between stages the runner may hold every row more
    # than once (unfused Flattens, shuffles), and a decoded image is ~10x its JPEG. Each model
    # stage decodes the bytes again for its batch (:func:`sample_image`): the same pixels.
    return dataclasses.replace(
        sample,
        image=None,
        width=width,
        height=height,
        web_caption=clean_caption(sample.caption, max_words=max_words),
        seed=sample_seed(run_seed, sample.key, 0),
    )


def sample_image(sample: Sample, cfg):
    """The RGB image a model stage runs on: the sample's own, or its bytes decoded as
    :func:`decode_sample` decoded them (same limits and draft size, so the same pixels)."""
    if sample.image is not None:
        return sample.image
    return decode_image(sample.jpg, max_pixels=cfg.max_pixels, min_side=cfg.min_side,
                        max_aspect=cfg.max_aspect, draft_side=DRAFT_SIDE)


class DecodeImages(beam.PTransform):
    """PCollection[Sample] -> (decoded Samples, ErrorRows)."""

    def __init__(self, cfg):
        super().__init__()
        self._kwargs = dict(
            run_seed=cfg.seed, max_pixels=cfg.max_pixels, min_side=cfg.min_side,
            max_aspect=cfg.max_aspect, max_words=cfg.max_words,
        )

    def expand(self, samples):
        return catch(samples, "Decode", decode_sample, stage="decode", **self._kwargs)


def _losers(item):
    """(key, [(shard, row, sha256, url), ...]) -> ((shard, row), (error_type, message)) for
    every occurrence but the first (by shard, row; earlier curate runs first).

    A later row with the same key is a ``duplicate_key``, or a ``key_collision`` when its
    image or url shows that the key names another image: img2dataset numbers keys per download
    (``{shard}{index}``), so two downloads curated into one --out collide; the message says so."""
    key, positions = item
    ordered = sorted(set(positions), key=lambda p: (p[0], p[1], p[2] or "", p[3] or ""))
    winner = ordered[0]
    # The kept row is named by its url: the same text whether it was curated by an earlier
    # pipeline of this run, an earlier run, or this pipeline (--shards-per-pipeline).
    for pos in ordered[1:]:
        if _other_image(winner, pos):
            yield pos[:2], ("key_collision",
                            f"key {key!r} already names another image (url {winner[3]!r}, kept): img2dataset "
                            f"numbers keys per download, so curate each download into its own --out (or give "
                            f"the downloads distinct keys)")
        else:
            yield pos[:2], ("duplicate_key", f"key {key!r} already seen (the first row, url {winner[3]!r}, is kept)")


def _other_image(a, b) -> bool:
    """Whether two occurrences of a key are different images: their sha256 differ, or (without
    both hashes) their urls do. Unknown either way counts as the same image."""
    if a[2] and b[2]:
        return a[2] != b[2]
    return bool(a[3] and b[3] and a[3] != b[3])


def _first_occurrence(sample: Sample, losers) -> Sample:
    """The sample when it is its key's first occurrence; StageError for the others."""
    loser = losers.get((sample.shard, sample.row))
    if loser is not None:
        error_type, reason = loser
        raise StageError("read", error_type, reason)
    return sample


class ResolveDuplicateKeys(beam.PTransform):
    """PCollection[Sample] -> (first occurrences, ErrorRows for the others).

    ``prior_curated`` / ``prior_errors``: output files of shards completed by earlier runs;
    their keys win over every row of this run.
    """

    def __init__(self, prior_curated=(), prior_errors=()):
        super().__init__()
        self._prior_curated = list(prior_curated)
        self._prior_errors = list(prior_errors)

    def expand(self, samples):
        positions = [samples | "Positions" >> beam.Map(lambda s: (s.key, (s.shard, s.row, s.sha256, s.url)))]
        if self._prior_curated:
            positions.append(
                samples.pipeline
                | "PriorCurated" >> beam.Create(self._prior_curated)
                | "ReadPriorCurated" >> ReadAllFromParquet(columns=["key", "sha256", "url"])
                | "PriorCuratedKeys" >> beam.Map(lambda r: (r["key"], (-1, -1, r["sha256"], r["url"])))
            )
        if self._prior_errors:
            positions.append(
                samples.pipeline
                | "PriorErrors" >> beam.Create(self._prior_errors)
                | "ReadPriorErrors" >> ReadAllFromParquet(columns=["key", "stage", "url"])
                | "AfterDedup" >> beam.Filter(lambda r: r["key"] and r["stage"] not in _PRE_DEDUP_STAGES)
                | "PriorErrorKeys" >> beam.Map(lambda r: (r["key"], (-1, -1, None, r["url"])))
            )
        losers = (
            positions
            | "AllPositions" >> beam.Flatten()
            | "ByKey" >> beam.GroupByKey()
            | "Losers" >> beam.FlatMap(_losers)
        )
        return catch(samples, "SplitDuplicates", _first_occurrence, stage="read",
                     losers=beam.pvalue.AsDict(losers))
