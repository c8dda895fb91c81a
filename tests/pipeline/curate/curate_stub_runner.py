"""Plug-in runners for tests/pipeline/curate/test_portable.py, named by their full class path
(``--runner curate_stub_runner.NoMetricsRunner``). A module of its own, imported only by
curate's ``--runner`` handling: whether curate imports it before Beam's options are checked is
what the options test is about, so no test imports it first."""
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.runners.runner import PipelineResult, PipelineRunner


class StubOptions(PipelineOptions):
    """A plug-in runner's own option."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--stub_flag", default=None, help="read by NoMetricsRunner")


class NoMetricsResult(PipelineResult):
    """A finished run whose runner reports no Metrics."""

    def __init__(self, result):
        super().__init__(result.state)
        self._result = result

    def wait_until_finish(self, duration=None):
        return self._result.wait_until_finish(duration)

    def metrics(self):
        raise NotImplementedError("this runner reports no Metrics")


class NoMetricsRunner(PipelineRunner):
    """FnApiRunner underneath; ``flags`` holds the --stub_flag of every run."""

    flags: list = []

    def run_pipeline(self, pipeline, options):
        NoMetricsRunner.flags.append(options.view_as(StubOptions).stub_flag)
        return NoMetricsResult(FnApiRunner().run_pipeline(pipeline, options))


class BrokenRunner(PipelineRunner):
    """A runner that cannot be created."""

    def __init__(self):
        raise RuntimeError("no cluster configured")
