"""`capfilt report` — write report.html for a curate output or a release directory."""
from __future__ import annotations

from dataclasses import dataclass, field

from capfilt.jobs import options

DESCRIPTION = """\
Write one self-contained HTML page (plots and thumbnails embedded) for DIR, which is either a
`capfilt curate --out` directory or a `capfilt release --out` directory: the run's counts,
histograms of ITM and CLIP scores for kept against dropped rows, the drop-reason breakdown,
caption length distributions and a grid of sample images with their web and selected captions.
Exit codes: 0 written, 2 DIR is not a curate or release directory, or --out cannot be written."""


@dataclass
class ReportOptions:
    dir: str = field(metadata={"help": "curate output or release directory", "positional": True, "flag": "DIR"})
    out: str | None = field(default=None, metadata={
        "help": "where to write the page (default: DIR/report.html)", "metavar": "FILE"})
    samples: int = field(default=12, metadata={
        "help": "sample images shown for kept rows and for dropped rows", "metavar": "N"})

    def __post_init__(self):
        if self.samples < 0:
            raise ValueError(f"--samples must be >= 0, got {self.samples}")


def add_arguments(parser) -> None:
    options.add_arguments(parser, ReportOptions)


def run(args) -> int:
    from capfilt.pipeline.release.report import write_report

    opts = options.from_args(ReportOptions, args)
    path = write_report(opts.dir, out_file=opts.out, samples=opts.samples)
    print(f"report written to {path}")
    return 0
