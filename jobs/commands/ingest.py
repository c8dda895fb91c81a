"""`capfilt ingest` — download a URL list into raw shards with img2dataset.

    capfilt ingest --url-list urls.parquet --out raw [--output-format webdataset] \\
        --image_size 384 --resize_mode keep_ratio --processes_count 4 --thread_count 64

Options this command does not declare are img2dataset ``download`` options (either spelling,
``--image_size`` or ``--image-size``). See docs/curate.md.
"""
from __future__ import annotations

import argparse
import sys

HELP = "Download a URL list into raw shards with img2dataset"
DESCRIPTION = (
    "Download the images of a URL list (parquet, csv, tsv, txt, json; with url and caption "
    "columns) into img2dataset shards that `capfilt curate` reads: parquet with the image bytes "
    "in `jpg` (default) or webdataset tars. Every img2dataset option passes through, e.g. "
    "--image_size 384 --resize_mode keep_ratio --processes_count 4 --thread_count 64 --retries 2. "
    "Failed downloads stay in the shards with status != success (curate reports them as error "
    "rows). After the download every shard is checked against the URL list (readable, its row count "
    "that of its stats, each URL once under its key); a mismatch is an error. One ingest at a time per "
    "OUT: a second one, or one started while the processes of a killed one still run, is refused. "
    "Re-running into the same OUT resumes (img2dataset's incremental mode): shards a killed run left "
    "unfinished are downloaded again; other download settings than those OUT was made with are an error."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(_accepts_extra=True)  # img2dataset options pass through
    parser.add_argument("--url-list", required=True, metavar="FILE", help="the URL list")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory for the raw shards")
    parser.add_argument("--output-format", choices=("parquet", "webdataset"), default="parquet",
                        help="shard format")
    parser.add_argument("--input-format", default=None,
                        help="img2dataset input format (parquet, csv, tsv, txt, json, ...); None: from the file name")
    parser.add_argument("--url-col", default="url", help="column holding the URLs")
    parser.add_argument("--caption-col", default="caption", help="column holding the captions ('' for none)")


def run(args) -> int:
    from capfilt.pipeline.ingest.download import IngestConfig, parse_img2dataset_options, run_ingest

    try:
        cfg = IngestConfig(
            url_list=args.url_list, out=args.out, output_format=args.output_format,
            input_format=args.input_format, url_col=args.url_col, caption_col=args.caption_col or None,
            options=parse_img2dataset_options(args.extra),
        )
        summary = run_ingest(cfg)
    except ValueError as err:
        print(f"capfilt ingest: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # img2dataset's process failed or was killed
        print(f"capfilt ingest: error: {err}", file=sys.stderr)
        return 1
    print(f"capfilt ingest -> {cfg.out} ({cfg.output_format})")
    if summary["redone"]:
        print(f"  shards a killed run left unfinished, downloaded again: {', '.join(summary['redone'])}")
    for key in ("shards", "count", "successes", "failed_to_download", "failed_to_resize"):
        print(f"  {key:<22}{summary[key]:>10}")
    print(f"  {'url list rows':<22}{summary['url_list_rows']:>10}  (each in the shards once, checked)")
    for status, count in summary["status"].items():
        print(f"    {status[:60]:<60}{count:>8}")
    if summary["count"] == 0:
        print("capfilt ingest: error: nothing was downloaded (empty URL list?)", file=sys.stderr)
        return 1
    return 0
