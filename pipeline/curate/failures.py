"""A failed Beam job as one line: the stage, the worker's exception class and its message.

A pipeline failure reaches the launcher in one of these shapes, depending on the runner:

* the in-process ``FnApiRunner`` re-raises the worker's exception, its message ending in Beam's
  `` [while running 'STEP']``;
* ``PortableRunner`` (and ``FnApiRunner`` with worker processes) raises ``RuntimeError`` whose
  text is the worker's whole traceback (``Pipeline JOB failed in state FAILED: ...`` on a job
  service), chained exceptions included;
* a job service that does not answer: ``grpc.FutureTimeoutError`` (no text at all) after
  ``--job_server_timeout`` seconds, or a ``grpc.RpcError`` with a status code and details.

:func:`job_failure` turns each into a :class:`JobFailure` whose text is one line; any other
exception (the launcher's own checks) is not a job failure and is left as it is.
"""
from __future__ import annotations

import logging
import os
import re

_TRACEBACK = "Traceback (most recent call last):"
_STEP = re.compile(r" ?\[while running '([^']*)'\]")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?:: ?(.*))?$")
_JOB = re.compile(r"Pipeline (\S+) failed in state (\w+)")
# Where a traceback's exception text ends: a blank line or the start of the next one.
_CHAIN = ("During handling of the above exception", "The above exception was the direct cause")
# The graph's composite labels around the stages (pipeline.curate.graph): CapFilt/Curate/Caption/...
_WRAPPERS = ("CapFilt", "Curate")


class JobFailure(RuntimeError):
    """A Beam job that failed: `where` (the stage, or the job or job service), `worker_error`
    (the class name of the exception that failed it; ``jobs.cli`` maps it to an exit code as it
    maps a launcher's own exceptions), `detail` (its message) and the Beam `step`."""

    def __init__(self, where: str, worker_error: str, detail: str, step: str | None = None):
        self.where, self.worker_error, self.detail, self.step = where, worker_error, detail, step
        text = f"{where}: {worker_error}" + (f": {detail}" if detail else "")
        super().__init__(text + (f" (Beam step {step})" if step else ""))


def job_failure(exc: BaseException, beam_args=()) -> JobFailure | None:
    """`exc` as a :class:`JobFailure` when it is a Beam job's failure, else None. `beam_args`
    (the run's Beam options) name the job service a gRPC error came from."""
    import grpc

    if isinstance(exc, grpc.FutureTimeoutError):
        endpoint, timeout = _job_service(beam_args)
        return JobFailure(f"job service at {endpoint}", "FutureTimeoutError",
                          f"no answer within --job_server_timeout {timeout} s")
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        endpoint, _ = _job_service(beam_args)
        code = getattr(exc.code(), "name", str(exc.code()))
        return JobFailure(f"job service at {endpoint}", f"gRPC {code}", _one_line(exc.details() or ""))
    text = str(exc)
    steps = _STEP.findall(text)
    raised = _last_exception(text)
    if raised is None:
        if not steps:
            return None  # not Beam's: the launcher's own error
        raised = (type(exc).__name__, text)
    name, message = raised
    message = _one_line(_STEP.sub("", message))
    if steps:
        return JobFailure(f"stage {stage_of(steps[-1])}", name, message, steps[-1])
    job = _JOB.search(text)
    return JobFailure(f"Beam job {job.group(1)}" if job else "Beam job", name, message)


def stage_of(step: str) -> str:
    """``CapFilt/Curate/Caption/RunAlone/...`` -> ``Caption``: the graph's label of the stage."""
    parts = step.split("/")
    while len(parts) > 1 and parts[0] in _WRAPPERS:
        parts = parts[1:]
    return parts[0]


def _last_exception(text: str) -> tuple[str, str] | None:
    """(class name, message) of the last exception in the traceback(s) `text` holds, or None
    when it holds none. The last one is the outermost: with Beam, the worker's exception with
    the step appended."""
    found = None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].rstrip().endswith(_TRACEBACK):
            i += 1
            continue
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i][:1].isspace()):
            i += 1  # the frames: indented
        if i < len(lines) and (match := _EXCEPTION_LINE.match(lines[i])):
            message = [match.group(2) or ""]
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(_CHAIN + (_TRACEBACK,)):
                message.append(lines[i])
                i += 1
            found = (match.group(1), "\n".join(message))
    return found


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _job_service(beam_args) -> tuple[str, int]:
    """(--job_endpoint, --job_server_timeout) of `beam_args`, as Beam reads them."""
    from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions

    portable = PipelineOptions(list(beam_args)).view_as(PortableOptions)
    return portable.job_endpoint or "(none given)", portable.job_server_timeout


class HideJobMessages(logging.Filter):
    """On the root logger: drops the records Beam's own code logs there. ``PortableRunner``
    logs every job message on the root logger, a failed job's worker traceback at ERROR, and
    then raises the failure, which the command states in one line."""

    _BEAM = os.sep + "apache_beam" + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and self._BEAM in record.pathname)
