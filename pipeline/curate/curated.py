"""The Select stage: each scored Sample becomes its curated row (``CURATED_SCHEMA``), with the
selection rule of ``pipeline.curate.select`` applied and counted as kept or dropped."""
from __future__ import annotations


import apache_beam as beam
from apache_beam.metrics import Metrics

from capfilt.pipeline.curate.errors import NAMESPACE, catch
from capfilt.pipeline.curate.select import select_captions
from capfilt.transforms.files.hashing import bytes_sha256
from capfilt.transforms.rows import Sample


def _floats(values):
    return None if values is None else [float(v) for v in values]


def curated_record(sample: Sample, cfg) -> dict:
    """One curated row (CURATED_SCHEMA order) with the selection applied."""
    sel = select_captions(
        sample.web_caption, sample.synthetic, sample.web_itm, sample.synthetic_itm,
        sample.web_clip, sample.synthetic_clip,
        itm_threshold=cfg.itm_threshold, keep_top=cfg.keep_top, use_filter=cfg.use_filter,
    )
    return {
        "key": sample.key,
        "url": sample.url,
        "sha256": sample.sha256 or bytes_sha256(sample.jpg),
        "jpg": None if cfg.no_images else sample.jpg,
        "width": sample.width,
        "height": sample.height,
        "web_caption": sample.web_caption,
        "web_itm": sample.web_itm,
        "web_itc": sample.web_itc,
        "web_clip": sample.web_clip,
        "synthetic_captions": list(sample.synthetic),
        "synthetic_itm": _floats(sample.synthetic_itm),
        "synthetic_itc": _floats(sample.synthetic_itc),
        "synthetic_clip": _floats(sample.synthetic_clip),
        "captions": sel.captions,
        "caption_sources": sel.sources,
        "keep": sel.keep,
        "drop_reason": sel.drop_reason,
        "round": cfg.round,
        "seed": sample.seed,
    }


def _finish(sample: Sample, cfg):
    record = curated_record(sample, cfg)
    Metrics.counter(NAMESPACE, "kept" if record["keep"] else "dropped").inc()
    return sample.shard, sample.row, record, sample.ran_on


class SelectCaptions(beam.PTransform):
    """PCollection[Sample] -> ((shard, row, curated record, ran_on), ErrorRows)."""

    def __init__(self, cfg):
        super().__init__()
        self._cfg = cfg

    def expand(self, samples):
        return catch(samples, "Select", _finish, self._cfg, stage="select")
