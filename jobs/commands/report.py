"""`capfilt report` — write report.html for a curate output or a release directory."""
from __future__ import annotations

import sys

HELP = "Write an HTML report for a curate or release directory"
DESCRIPTION = """\
Write one self-contained HTML page (plots and thumbnails embedded) for DIR, which is either a
`capfilt curate --out` directory or a `capfilt release --out` directory: the run's counts,
histograms of ITM and CLIP scores for kept against dropped rows, the drop-reason breakdown,
caption length distributions and a grid of sample images with their web and selected captions.
Exit codes: 0 written, 2 DIR is not a curate or release directory, or --out cannot be written."""


def add_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="curate output or release directory")
    parser.add_argument("--out", metavar="FILE", help="where to write the page (default: DIR/report.html)")
    parser.add_argument("--samples", type=int, default=12, metavar="N",
                        help="sample images shown for kept rows and for dropped rows")


def run(args) -> int:
    from capfilt.pipeline.release.report import write_report

    if args.samples < 0:
        print(f"capfilt report: --samples must be >= 0, got {args.samples}", file=sys.stderr)
        return 2
    try:
        path = write_report(args.dir, out_file=args.out, samples=args.samples)
    except (ValueError, FileNotFoundError) as err:
        print(f"capfilt report: {err}", file=sys.stderr)
        return 2
    print(f"report written to {path}")
    return 0
