"""`capfilt ingest` — download a URL list into raw shards with img2dataset.

    capfilt ingest --url-list urls.parquet --out raw [--output-format webdataset] \\
        --image_size 384 --resize_mode keep_ratio --processes_count 4 --thread_count 64
    capfilt ingest --url-list urls.parquet --out /shared/raw --distributor pyspark \\
        --spark-master spark://HOST:7077

Options this command does not declare are img2dataset ``download`` options (either spelling,
``--image_size`` or ``--image-size``). See docs/curate.md.
"""
from __future__ import annotations

from capfilt.jobs import options

DESCRIPTION = (
    "Download the images of a URL list (parquet, csv, tsv, txt, json; with url and caption "
    "columns) into img2dataset shards that `capfilt curate` reads: parquet with the image bytes "
    "in `jpg` (default) or webdataset tars. Every img2dataset option passes through, e.g. "
    "--image_size 384 --resize_mode keep_ratio --processes_count 4 --thread_count 64 --retries 2. "
    "--distributor pyspark downloads on a Spark cluster instead (--spark-master; a SparkSession is "
    "started for the download and stopped after it). "
    "Failed downloads stay in the shards with status != success (curate reports them as error "
    "rows). After the download every shard is checked against the URL list (readable, its row count "
    "that of its stats, each URL once under its key); a mismatch is an error. One ingest at a time per "
    "OUT: a second one, or one started while the processes of a killed one still run, is refused. "
    "Re-running into the same OUT resumes (img2dataset's incremental mode): shards a killed run left "
    "unfinished are downloaded again; other download settings than those OUT was made with are an error."
)


def add_arguments(parser) -> None:
    from capfilt.pipeline.ingest.download import IngestConfig

    parser.set_defaults(_accepts_extra=True)  # img2dataset options pass through
    options.add_arguments(parser, IngestConfig)


def run(args) -> int:
    from capfilt.pipeline.ingest.download import IngestConfig, parse_img2dataset_options

    return ingest(options.from_args(IngestConfig, args, options=parse_img2dataset_options(args.extra)))


def ingest(cfg) -> int:
    """Download `cfg`'s URL list and print what arrived (`capfilt ingest` and run-job)."""
    from capfilt.pipeline.ingest.download import run_ingest

    summary = run_ingest(cfg)
    print(f"capfilt ingest -> {cfg.out} ({cfg.output_format})")
    if summary["redone"]:
        print(f"  shards a killed run left unfinished, downloaded again: {', '.join(summary['redone'])}")
    for key in ("shards", "count", "successes", "failed_to_download", "failed_to_resize"):
        print(f"  {key:<22}{summary[key]:>10}")
    print(f"  {'url list rows':<22}{summary['url_list_rows']:>10}  (each in the shards once, checked)")
    for status, count in summary["status"].items():
        print(f"    {status[:60]:<60}{count:>8}")
    if summary["count"] == 0:
        raise RuntimeError("nothing was downloaded (empty URL list?)")
    return 0
