"""The one way a row reaches the error output: Beam's ``with_exception_handling``.

Every step of the curate graph that can fail on a row runs its per-row function under
``with_exception_handling`` (:func:`catch`). The function says what went wrong by raising
:class:`StageError` (stage, error type, message); any other exception is recorded under the
step's stage with its class name as the type and its ``repr`` as the message. Each dead letter
becomes one ``ErrorRow`` (:func:`dead_letter_to_error`) and is counted in Beam Metrics as
``errors`` and ``<stage>_errors``. RunInference has a dead letter of its own, a whole failed batch
(``pipeline.curate.inference``); its rows are turned into row dead letters (:func:`unbatch`)
and converted by the same function.

``with_exception_handling`` hands the dead-letter output the exception's type and ``repr``, not
the exception; :class:`StageError` therefore carries its fields as JSON in its ``repr``.
"""
from __future__ import annotations

import dataclasses
import json

import apache_beam as beam
from apache_beam.metrics import Metrics

from capfilt.transforms.rows import ErrorRow

# Beam Metrics namespace of every capfilt counter.
NAMESPACE = "capfilt"
_OWN_KEY = object()


class StageError(Exception):
    """A row-level failure with the stage and error type to record. ``key``: the key to record
    when the row's own is unusable (a raw row whose key is empty records none)."""

    def __init__(self, stage: str, error_type: str, message: str, key=_OWN_KEY):
        super().__init__(message)
        self.stage, self.error_type, self.message, self.key = stage, error_type, message, key

    def __repr__(self) -> str:
        fields = {"stage": self.stage, "error_type": self.error_type, "message": self.message}
        if self.key is not _OWN_KEY:
            fields["key"] = self.key
        return json.dumps(fields)


def dead_letter_to_error(dead_letter, default_stage: str) -> ErrorRow:
    """A ``with_exception_handling`` dead letter ``(row, (type, repr, traceback))`` as an error
    row; ``row`` is a ``Sample`` or a raw row as read. Unexpected exceptions keep their class
    name as the type."""
    row, (exc_type, exc_repr, _tb) = dead_letter
    stage, error_type, message = default_stage, getattr(exc_type, "__name__", str(exc_type)), exc_repr
    fields = {}
    if isinstance(exc_type, type) and issubclass(exc_type, StageError):
        fields = json.loads(exc_repr)
        stage, error_type, message = fields["stage"], fields["error_type"], fields["message"]
    error = ErrorRow.of(row, stage, error_type, message)
    return dataclasses.replace(error, key=fields["key"]) if "key" in fields else error


def unbatch(dead_letter):
    """RunInference's dead letter ``(batch of (key, Sample), exception info)`` -> one row dead
    letter ``(Sample, exception info)`` per element."""
    batch, exc_info = dead_letter
    for _key, sample in batch:
        yield sample, exc_info


def _counted_error(dead_letter, default_stage: str) -> ErrorRow:
    error = dead_letter_to_error(dead_letter, default_stage)
    Metrics.counter(NAMESPACE, "errors").inc()  # the run's identity check reads this one
    Metrics.counter(NAMESPACE, f"{error.stage}_errors").inc()
    return error


def error_rows(dead_letters, label: str, stage: str):
    """PCollection of row dead letters -> PCollection[ErrorRow] (counted)."""
    return dead_letters | label >> beam.Map(_counted_error, stage)


def catch(rows, label: str, fn, *args, stage: str, **kwargs):
    """``rows | label >> beam.Map(fn, *args, **kwargs)`` under ``with_exception_handling``:
    (fn's results, ErrorRows of the rows it raised on). Side inputs pass through ``kwargs``."""
    good, bad = rows | label >> beam.Map(fn, *args, **kwargs).with_exception_handling()
    return good, error_rows(bad, f"{label}Errors", stage)
