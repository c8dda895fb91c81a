"""`capfilt release` — build a dataset release from curate output directories.

Exit codes: 0 release written; 2 bad input or options (the message names the file, row or
value; checked before the embedding pass wherever possible); 4 the counts did not reconcile
(nothing is published). See docs/release.md.
"""
from __future__ import annotations

import logging

from capfilt.jobs import options

DESCRIPTION = """\
Build a dataset release from one or more `capfilt curate` output directories: only kept rows,
exact dedup (image SHA-256), near dedup (CLIP image embeddings in faiss, cosine >=
--dedup-threshold; the copy with the best selected-caption CLIP score, then ITM, then the
smallest key is kept), decontamination against evaluation images (--decontaminate), then
resharding to --rows-per-shard. Writes OUT/shards/part-XXXXX.parquet, OUT/removed.parquet
(every row not released, with its reason), OUT/manifest.json, a dataset card OUT/README.md,
OUT/report.html and, with --webdataset, OUT/webdataset/XXXXX.tar for LAVIS's LAION loader.
Each input must be a finished curate output: the shards its manifest.json records are read,
each checked against its recorded SHA-256 first.
Exit codes: 0 ok, 2 bad input or options (an input given twice, a missing or changed shard, an
--out that cannot be written or replaced), 4 counts do not reconcile."""

EXIT_OK, EXIT_ACCOUNTING = 0, 4  # 4: AccountingError (jobs.cli.exit_code)
log = logging.getLogger("capfilt.release")


def add_arguments(parser) -> None:
    from capfilt.pipeline.release.build import ReleaseConfig

    options.add_arguments(parser, ReleaseConfig)


def run(args) -> int:
    from capfilt.pipeline.release.build import ReleaseConfig

    return release(options.from_args(ReleaseConfig, args))


def release(cfg) -> int:
    """Build the release of `cfg` and print its counts (`capfilt release` and run-job)."""
    from capfilt.pipeline.release.build import build_release

    manifest = build_release(cfg)
    print(_summary(manifest, cfg.out))
    return EXIT_OK


def _summary(manifest: dict, out) -> str:
    lines = [f"release written to {out}", f"{'step':<15}{'in':>10}{'removed':>10}{'out':>10}"]
    for step in manifest["counts"]["steps"]:
        lines.append(f"{step['step']:<15}{step['in']:>10}{sum(step['removed'].values()):>10}{step['out']:>10}")
    lines.append(f"{'released':<15}{'':>10}{'':>10}{manifest['counts']['released']:>10}")
    return "\n".join(lines)
