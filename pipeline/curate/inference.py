"""RunInference stages: the captioner, the filter and the CLIP ranker as Beam ``ModelHandler``s.

Each handler takes ``Sample`` s (already decoded) and returns updated copies, and is wrapped in
``KeyedModelHandler`` so elements travel as ``(sample key, Sample)``. Beam supplies the rest:

* **One model per worker process.** ``RunInference`` loads the model through its shared
  handle once per process and hands it to every thread. With ``--share-model-across-processes``
  (or ``--large-model``, or ``--model-copies N``) the handler tells Beam so
  (``share_model_across_processes()``, ``model_copies()``, set through ``ModelHandler``'s own
  ``large_model`` and ``model_copies``): Beam's ``MultiProcessShared`` then keeps one (or N)
  copies per machine, in the worker process that loaded them, and the other processes call
  them through a proxy, in turn. The proxy exposes methods only, so the handlers call the
  models' methods and never read their attributes.
* **Batching** comes from ``batch_elements_kwargs`` (``--batch-size``, fixed, so every batch
  but a bundle's last is full).
* **A failed batch is retried element by element.** ``run_inference`` raises for a batch that
  fails, so ``RunInference.with_exception_handling`` puts the batch in its dead letter; its
  rows run again through a second RunInference with batches of one, which shares the model
  (same ``model_identifier``). Only a row that fails alone becomes an error row, through
  ``pipeline.curate.errors`` like every other error (stage = the model stage, type = the
  exception's class name, message = its text).
* **Metrics**: RunInference's own (``num_inferences``, latencies, model load time) under the
  namespace ``capfilt_<stage>``, plus our counters of retried batches and failed elements.

Whether a stage's results depend on the batch: the captioner draws from per-sample seeds and
the scorers run each caption against its own image, so they do not (up to float rounding).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import threading
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference

from capfilt.pipeline.curate.errors import NAMESPACE, StageError, error_rows, unbatch
from capfilt.pipeline.curate.precision import checked_filter_scores, checked_rank_scores, model_bf16, resolve_precision
from capfilt.transforms.rows import Sample

LOG = logging.getLogger(__name__)
# The last model loaded per stage in this process. RunInference's shared handle lives as long
# as one pipeline; a run of several pipelines (one per shard group) in the same process, as
# with the in-process FnApiRunner, would otherwise reload every model for every group.
_LOADED: dict[str, tuple[tuple, object]] = {}
_LOADED_LOCK = threading.Lock()
# Part of every model tag made in this (launcher) process: the pipelines of one run share their
# models (see InferStage), another launcher's run on the same machine does not.
_LAUNCH = uuid.uuid4().hex[:12]


def thread_share(processes: int | None) -> int | None:
    """Torch threads for one of ``processes`` SDK processes on this worker machine: its share
    of the cores this process may use (at least 1); None (torch's default) when unknown.
    ``processes`` -1: one process per core."""
    if not processes:
        return None
    if processes < 0:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // processes)


def candidates(sample: Sample) -> list[str]:
    """The captions a sample is scored on: the web caption (when not empty), then every
    synthetic caption, in that order. Scores come back in the same order."""
    return ([sample.web_caption] if sample.web_caption else []) + list(sample.synthetic)


class _SampleHandler(ModelHandler):
    """Shared plumbing; subclasses set ``stage`` and implement ``load`` and ``infer``."""

    stage = ""

    def __init__(self, spec: str, cfg, sha256: str | None = None):
        super().__init__(large_model=cfg.large_model, model_copies=cfg.model_copies)
        self._spec = spec
        self._sha256 = sha256  # a model on object storage: the hash its local copy must have
        self._cfg = cfg
        self._batch_size: int | None = None  # None: --batch-size
        self._precision: str | None = None  # resolved on first use, in the worker process

    # -- what RunInference asks --------------------------------------------------------
    def load_model(self):
        threads = self._cfg.torch_threads or thread_share(self._cfg.worker_processes)
        if threads:
            import torch

            torch.set_num_threads(threads)
        if self.share_model_across_processes():
            # One load per copy, kept by Beam's MultiProcessShared under the run's model tag;
            # the process-wide cache would hand every copy the same object.
            LOG.info("loading %s model %s (one of %d copies per machine)", self.stage, self._spec,
                     self.model_copies())
            return self.load()
        ident = (self._spec, self._sha256, self._cfg.device, self._cfg.precision)
        with _LOADED_LOCK:
            cached = _LOADED.get(self.stage)
            if cached is not None and cached[0] == ident:
                return cached[1]
            LOG.info("loading %s model %s", self.stage, self._spec)
            model = self.load()
            _LOADED[self.stage] = (ident, model)  # replaces (frees) the previous one
            return model

    def run_inference(self, batch, model, inference_args=None):
        batch = list(batch)
        try:
            done = self.infer(batch, model)
        except Exception as err:  # noqa: BLE001 - any failure goes to the dead letter as a StageError
            Metrics.counter(NAMESPACE, f"{self.stage}_failed_batches").inc()
            if len(batch) > 1:
                LOG.warning("%s batch of %d failed (%s: %s); retrying element by element",
                            self.stage, len(batch), type(err).__name__, err)
            raise StageError(self.stage, type(err).__name__, str(err) or repr(err)) from err
        used = (self.stage, self.ran_on())
        return [dataclasses.replace(s, ran_on=s.ran_on + (used,)) for s in done]

    def batch_elements_kwargs(self):
        size = self._batch_size or self._cfg.batch_size
        return {"min_batch_size": size, "max_batch_size": size}

    def alone(self) -> "_SampleHandler":
        """This handler with batches of one (the retry of a failed batch's rows)."""
        other = copy.copy(self)
        other._batch_size = 1
        return other

    def share_model_across_processes(self) -> bool:
        # Beam's own answer covers --large-model and --model-copies; ours adds the plain flag.
        return super().share_model_across_processes() or bool(self._cfg.share_model_across_processes)

    def get_num_bytes(self, batch) -> int:
        # The default pickles the batch (PIL images included) just to measure it.
        return sum(len(s.jpg or b"") for s in batch)

    def get_metrics_namespace(self) -> str:
        return f"{NAMESPACE}_{self.stage}"

    # -- ours ------------------------------------------------------------------------------
    def load(self):
        raise NotImplementedError

    def model_path(self) -> str:
        """The spec to load: as given, or the local copy of a model on object storage."""
        from capfilt.pipeline.models import local_spec

        return local_spec(self._spec, self._sha256)

    def precision(self) -> str:
        """``--precision`` resolved once, on the worker (its hardware decides ``auto``)."""
        if self._precision is None:
            self._precision = resolve_precision(self._cfg.precision, self._cfg.device)
        return self._precision

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_precision"] = None  # a worker on other hardware resolves ``auto`` again
        return state

    def images(self, batch: list[Sample]) -> list:
        """The batch's decoded images (decoded here: the graph carries no image between stages)."""
        from capfilt.pipeline.curate.decode import sample_image

        return [sample_image(s, self._cfg) for s in batch]

    def ran_on(self) -> str:
        """``device/precision`` as this worker resolved them (recorded per shard in its marker)."""
        from capfilt.model.inference.device import resolve_device

        return f"{resolve_device(self._cfg.device)}/{self.precision()}"

    def bf16(self) -> bool:
        """Whether this stage's model runs in bf16 (``pipeline.precision``)."""
        return model_bf16(self.precision(), self.stage)

    def checked(self) -> bool:
        """Whether bf16 decisions are checked in fp32 (``--precision bf16-checked`` or ``auto``)."""
        return self.precision() == "bf16-checked"

    def infer(self, batch: list[Sample], model) -> list[Sample]:
        raise NotImplementedError


class CaptionHandler(_SampleHandler):
    """Sample -> Sample with ``synthetic`` = N nucleus-sampled captions (seeded per key)."""

    stage = "caption"

    def load(self):
        from capfilt.model.inference.captioner import Captioner

        return Captioner.from_pretrained(self.model_path(), device=self._cfg.device, bf16=self.bf16())

    def infer(self, batch, model):
        cfg = self._cfg
        captions = model.caption(
            self.images(batch), [s.key for s in batch], n=cfg.num_captions, seed=cfg.seed,
            prompt=cfg.prompt, top_p=cfg.top_p, max_length=cfg.max_length,
            min_length=cfg.min_length, repetition_penalty=cfg.repetition_penalty, top_k=cfg.top_k,
        )
        return [dataclasses.replace(s, synthetic=list(c)) for s, c in zip(batch, captions)]


def _with_candidates(batch: list[Sample]) -> list[Sample]:
    return [s for s in batch if candidates(s)]


def _by_sample(batch: list[Sample], todo: list[Sample], scores: list) -> list:
    """One entry per sample of ``batch``: its scores, or None for a sample without candidates."""
    by_id = {id(s): sc for s, sc in zip(todo, scores)}
    return [by_id.get(id(s)) for s in batch]


def _split_scores(sample: Sample, values) -> tuple[float | None, list[float]]:
    """Scores in candidate order -> (web score or None, synthetic scores)."""
    values = [float(v) for v in values]
    if sample.web_caption:
        return values[0], values[1:]
    return None, values


def _joined_scores(sample: Sample, web, synthetic) -> list[float]:
    """(web score, synthetic scores) -> scores in candidate order; the inverse of ``_split_scores``."""
    return ([web] if sample.web_caption else []) + list(synthetic or [])


class FilterHandler(_SampleHandler):
    """Sample -> Sample with ITM p(match) and ITC cosine of every candidate caption."""

    stage = "filter"

    def load(self):
        from capfilt.model.inference.filter import load_filter

        return load_filter(self.model_path(), device=self._cfg.device, bf16=self.bf16(),
                           itm_first_token=self._cfg.itm_first_token)

    def infer(self, batch, model):
        todo = _with_candidates(batch)
        result = checked_filter_scores(model, self.images(todo), [candidates(s) for s in todo],
                                       check=self.checked() and self.bf16(), itm_threshold=self._cfg.itm_threshold,
                                       margin=self._cfg.itm_margin)
        Metrics.counter(NAMESPACE, "filter_fp32_rescored").inc(len(result.rescored))
        out = []
        for s, sc in zip(batch, _by_sample(batch, todo, result.scores)):
            if sc is None:
                out.append(dataclasses.replace(s, synthetic_itm=[], synthetic_itc=[]))
                continue
            web_itm, syn_itm = _split_scores(s, sc.itm)
            web_itc, syn_itc = _split_scores(s, sc.itc)
            out.append(dataclasses.replace(
                s, web_itm=web_itm, web_itc=web_itc, synthetic_itm=syn_itm, synthetic_itc=syn_itc
            ))
        return out


class RankHandler(_SampleHandler):
    """Sample -> Sample with the CLIP cosine of every candidate caption."""

    stage = "rank"

    def load(self):
        from capfilt.model.inference.ranker import ClipRanker

        # bf16-checked sizes its CLIP margin for a bf16 image tower; the text stays fp32
        return ClipRanker.load(self.model_path(), device=self._cfg.device, bf16=self.bf16(), bf16_text=not self.checked())

    def infer(self, batch, model):
        cfg = self._cfg
        todo = _with_candidates(batch)
        itm = None
        if cfg.use_filter:  # the filter ran before: candidates' ITM in candidate order
            itm = [_joined_scores(s, s.web_itm, s.synthetic_itm) for s in todo]
        result = checked_rank_scores(
            model, self.images(todo), [candidates(s) for s in todo], itm,
            check=self.checked() and self.bf16(), itm_threshold=cfg.itm_threshold,
            keep_top=cfg.keep_top, margin=cfg.clip_margin,
        )
        Metrics.counter(NAMESPACE, "rank_fp32_rescored").inc(len(result.rescored))
        out = []
        for s, sc in zip(batch, _by_sample(batch, todo, result.scores)):
            web_clip, syn_clip = _split_scores(s, sc) if sc is not None else (None, [])
            out.append(dataclasses.replace(s, web_clip=web_clip, synthetic_clip=syn_clip))
        return out


def _keyed(sample: Sample):
    return sample.key, sample


def model_tag(handler: _SampleHandler) -> str:
    """The ``model_identifier`` of a stage's two RunInference transforms (batches, and rows
    retried alone), so they share one model. It is the same for every pipeline of one run
    (same launcher process, model, device and precision): with shared models, the copies Beam
    loaded for the first pipeline serve the next ones instead of new copies piling up."""
    cfg = handler._cfg
    ident = hashlib.sha256(repr((handler._spec, cfg.device, cfg.precision)).encode()).hexdigest()[:12]
    return f"{NAMESPACE}-{handler.stage}-{_LAUNCH}-{ident}"


class InferStage(beam.PTransform):
    """PCollection[Sample] -> (updated Samples, ErrorRows) through one RunInference stage."""

    def __init__(self, handler: _SampleHandler):
        super().__init__()
        self._handler = handler

    def expand(self, samples):
        model_id = model_tag(self._handler)
        results, failed = (
            samples
            | "Key" >> beam.Map(_keyed)
            | "RunInference" >> RunInference(KeyedModelHandler(self._handler), model_identifier=model_id)
            .with_exception_handling()
        )
        retried, failed_alone = (
            failed.failed_inferences
            | "FailedBatchRows" >> beam.FlatMap(unbatch)
            | "KeyAgain" >> beam.MapTuple(lambda sample, _exc_info: _keyed(sample))
            | "RunAlone" >> RunInference(KeyedModelHandler(self._handler.alone()), model_identifier=model_id)
            .with_exception_handling()
        )
        ok = (results, retried) | "Results" >> beam.Flatten() | "Unkey" >> beam.Values()
        rows = failed_alone.failed_inferences | "FailedRows" >> beam.FlatMap(unbatch)
        return ok, error_rows(rows, "Errors", self._handler.stage)
