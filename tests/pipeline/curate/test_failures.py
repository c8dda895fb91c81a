"""A failed Beam job as one line (pipeline/curate/failures.py) and its exit code (jobs/cli.py), in
each shape a runner hands the failure over. End-to-end cases (PortableRunner with a worker
refusing --device cuda or killed mid-run, a job endpoint where nothing listens, a TypeError in a
stage) are in test_portable.py."""
import logging
import traceback

import apache_beam as beam
import grpc
import pytest

from capfilt.jobs.cli import error_line, exit_code
from capfilt.pipeline.curate.failures import HideJobMessages, JobFailure, job_failure, stage_of
from capfilt.pipeline.curate.options import make_pipeline_options

STEP = "CapFilt/Curate/Caption/RunAlone/BeamML_RunInference/ParDo(_RunInferenceDoFn)"


def worker_traceback(message: str, step: str = STEP) -> str:
    """The text of a worker's failure as Beam reports it from another process: the original
    exception, then the same one re-raised with the step appended."""
    try:
        try:
            raise ValueError(message)
        except ValueError as err:
            raise ValueError(f"{err} [while running '{step}']")  # noqa: B904 - Beam chains implicitly
    except ValueError as err:
        return "".join(traceback.format_exception(err))


def test_a_worker_traceback_becomes_the_stage_and_the_workers_error():
    text = worker_traceback("device 'cuda' requested but torch sees no CUDA device")
    failure = job_failure(RuntimeError(f"Pipeline job-7 failed in state FAILED: {text}"))
    assert (failure.where, failure.worker_error, failure.step) == ("stage Caption", "ValueError", STEP)
    assert str(failure) == (f"stage Caption: ValueError: device 'cuda' requested but torch sees no CUDA device "
                            f"(Beam step {STEP})")
    assert exit_code(failure) == 2  # a ValueError, as on the launcher
    assert error_line("curate", failure) == f"capfilt curate: error: {failure}"


def test_a_multi_line_worker_message_is_one_line():
    failure = job_failure(RuntimeError(worker_traceback("first line\n  second line")))
    assert failure.detail == "first line second line" and "\n" not in str(failure)


def test_a_failure_outside_any_step_names_the_job():
    text = ("Error running pipeline.\nTraceback (most recent call last):\n  File \"q.py\", line 1, in get\n"
            "_queue.Empty\n\nDuring handling of the above exception, another exception occurred:\n\n"
            "Traceback (most recent call last):\n  File \"data_plane.py\", line 594, in input_elements\n"
            "    raise RuntimeError('Channel closed prematurely.')\nRuntimeError: Channel closed prematurely.\n")
    failure = job_failure(RuntimeError(f"Pipeline job-9 failed in state FAILED: {text}"))
    assert str(failure) == "Beam job job-9: RuntimeError: Channel closed prematurely."
    assert exit_code(failure) == 1


def test_the_in_process_runner_s_own_exception_keeps_its_class():
    def boom(_):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    with pytest.raises(TypeError) as err:
        with beam.Pipeline(options=make_pipeline_options([])) as p:
            _ = p | beam.Create([1]) | "CapFilt/Curate/Select/Pick" >> beam.Map(boom)
    failure = job_failure(err.value)
    assert str(failure) == ("stage Select: TypeError: unsupported operand type(s) for +: 'int' and 'str' "
                            "(Beam step CapFilt/Curate/Select/Pick)")
    assert exit_code(failure) == 1


def test_job_service_errors_name_the_endpoint():
    args = ["--runner", "PortableRunner", "--job_endpoint", "localhost:1234", "--job_server_timeout", "7"]
    failure = job_failure(grpc.FutureTimeoutError(), args)  # what Beam raises: no text at all
    assert str(failure) == ("job service at localhost:1234: FutureTimeoutError: "
                            "no answer within --job_server_timeout 7 s")

    class Deadline(grpc.RpcError, grpc.Call):
        def code(self):
            return grpc.StatusCode.DEADLINE_EXCEEDED

        def details(self):
            return "Deadline\nExceeded"

        def initial_metadata(self): ...
        def trailing_metadata(self): ...
        def is_active(self): ...
        def time_remaining(self): ...
        def cancel(self): ...
        def add_callback(self, callback): ...

    failure = job_failure(Deadline(), args)
    assert str(failure) == "job service at localhost:1234: gRPC DEADLINE_EXCEEDED: Deadline Exceeded"
    assert exit_code(failure) == 1


@pytest.mark.parametrize("exc", [ValueError("--out x: not a curate output"), OSError("disk full"),
                                 RuntimeError("Pipeline failed."), KeyError("k")])
def test_the_launcher_s_own_errors_are_not_job_failures(exc):
    assert job_failure(exc) is None


def test_stage_names_and_exit_codes():
    assert stage_of("CapFilt/Curate/Rank/RunInference/BeamML_RunInference") == "Rank"
    assert stage_of("CapFilt/Read/ReadShard") == "Read"
    assert stage_of("Unrelated/Step") == "Unrelated"
    assert exit_code(JobFailure("stage Read", "FileNotFoundError", "x")) == 2
    assert exit_code(JobFailure("stage Read", "MemoryError", "x")) == 1


def test_beam_s_records_on_the_root_logger_are_hidden():
    hide = HideJobMessages()
    beam_record = logging.LogRecord("root", logging.ERROR, "/v/site-packages/apache_beam/runners/portability/"
                                    "portable_runner.py", 540, "Traceback ...", None, None)
    assert not hide.filter(beam_record)
    assert hide.filter(logging.LogRecord("root", logging.ERROR, "/work/capfilt/x.py", 1, "m", None, None))
    assert hide.filter(logging.LogRecord("apache_beam.io", logging.WARNING, "/v/apache_beam/io/x.py", 1, "m",
                                         None, None))
