"""`capfilt release` — build a dataset release from curate output directories.

Exit codes: 0 release written; 2 bad input or options (the message names the file, row or
value; checked before the embedding pass wherever possible); 4 the counts did not reconcile
(nothing is published). See docs/release.md.
"""
from __future__ import annotations

import logging
import sys

HELP = "Build a dataset release: dedup, decontaminate, manifest, report"
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

EXIT_OK, EXIT_BAD_INPUT, EXIT_ACCOUNTING = 0, 2, 4
log = logging.getLogger("capfilt.release")


def add_arguments(parser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="DIR",
                        help="curate output directories; the shards each one's manifest.json records are read, "
                             "checked against their recorded SHA-256")
    parser.add_argument("--out", required=True, metavar="DIR", help="release directory to write")
    parser.add_argument("--dedup-threshold", type=float, default=0.95, metavar="T",
                        help="cosine of CLIP image embeddings at or above which two images are near-duplicates")
    parser.add_argument("--decontaminate", metavar="GLOB",
                        help="raw or curated parquet shards of evaluation images (e.g. the synth test split); "
                             "near-duplicates of any of them are removed")
    parser.add_argument("--decontaminate-threshold", type=float, metavar="T",
                        help="cosine threshold for decontamination; None means the same as --dedup-threshold")
    parser.add_argument("--rows-per-shard", type=int, default=10_000, metavar="N",
                        help="rows per output shard (shards are named part-00000.parquet, ...)")
    parser.add_argument("--webdataset", action="store_true",
                        help="also write webdataset tars (jpg + json with 'caption') for LAVIS's LAION loader")
    parser.add_argument("--clip", metavar="M",
                        help="CLIP model for image embeddings (open_clip name:pretrained, a directory from "
                             "`models init --kind clip`, or hub id); None means the CLIP in the first input's curate manifest")
    parser.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto",
                        help="faiss index: auto = exact flat up to 50k images, IVF above")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="images per CLIP batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the IVF k-means training")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it is a capfilt release (manifest.json format) or an empty "
                             "directory; anything else is refused, as is an --out that is, holds or is "
                             "inside an --input")
    parser.add_argument("--no-report", action="store_true", help="skip report.html")


def config_from_args(args):
    from capfilt.pipeline.release.build import ReleaseConfig

    return ReleaseConfig(
        inputs=args.input, out=args.out, dedup_threshold=args.dedup_threshold,
        decontaminate=args.decontaminate, decontaminate_threshold=args.decontaminate_threshold,
        rows_per_shard=args.rows_per_shard, webdataset=args.webdataset, clip=args.clip,
        index=args.index, batch_size=args.batch_size, seed=args.seed, overwrite=args.overwrite,
        report=not args.no_report,
    )


def run(args) -> int:
    from capfilt.pipeline.release.build import build_release
    from capfilt.pipeline.release.manifest import AccountingError

    try:
        manifest = build_release(config_from_args(args))
    except AccountingError as err:
        print(f"capfilt release: {err}", file=sys.stderr)
        return EXIT_ACCOUNTING
    except (ValueError, FileNotFoundError) as err:
        print(f"capfilt release: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(_summary(manifest, args.out))
    return EXIT_OK


def _summary(manifest: dict, out) -> str:
    lines = [f"release written to {out}", f"{'step':<15}{'in':>10}{'removed':>10}{'out':>10}"]
    for step in manifest["counts"]["steps"]:
        lines.append(f"{step['step']:<15}{step['in']:>10}{sum(step['removed'].values()):>10}{step['out']:>10}")
    lines.append(f"{'released':<15}{'':>10}{'':>10}{manifest['counts']['released']:>10}")
    return "\n".join(lines)
