"""`capfilt convert` — import an original BLIP/LAVIS checkpoint into a transformers directory."""
from __future__ import annotations

import logging
import sys

HELP = "Convert an original BLIP checkpoint to the transformers layout"
DESCRIPTION = (
    "Convert an original BLIP/LAVIS checkpoint (.pth, read with torch.load(weights_only=True)) "
    "into a transformers directory that `capfilt curate --captioner/--filter` loads. "
    "--task caption gives BlipForConditionalGeneration, --task itm BlipForImageTextRetrieval. "
    "Keys the target model does not know, and weights it needs but the checkpoint lacks, "
    "stop the conversion and are listed, as does a --processor whose tokenizer does not match "
    "the checkpoint's vocabulary. Nothing is written unless the conversion succeeds. Example: "
    "capfilt convert --from blip --task caption model_large_caption.pth models/blip-large-caption "
    "--processor Salesforce/blip-image-captioning-large"
)

log = logging.getLogger(__name__)


def add_arguments(parser):
    parser.add_argument("--from", dest="source_format", required=True, choices=["blip"],
                        help="layout of the source checkpoint (original salesforce/BLIP or LAVIS BLIP)")
    parser.add_argument("--task", required=True, choices=["caption", "itm"],
                        help="which model to build: the captioner or the ITM/ITC filter")
    parser.add_argument("src", metavar="SRC.pth",
                        help="original checkpoint file (.pth, or .safetensors in the original layout); "
                             "a transformers directory needs no conversion")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to write (save_pretrained layout)")
    parser.add_argument("--config", default=None,
                        help="BlipConfig to build (directory, hub id or config.json); "
                             "default: inferred from the checkpoint's tensor shapes")
    parser.add_argument("--processor", default=None,
                        help="directory or hub id whose BlipProcessor (image processor + tokenizer) "
                             "is saved into OUT_DIR; its tokenizer must match the checkpoint's vocabulary "
                             "and special token ids. Without it OUT_DIR holds only the model")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty OUT_DIR (its old contents are deleted once the "
                             "conversion has succeeded)")


def run(args) -> int:
    from capfilt.model.builders.convert import convert_blip_checkpoint

    log.info("converting %s (%s, task %s) -> %s", args.src, args.source_format, args.task, args.out_dir)
    try:
        out = convert_blip_checkpoint(
            args.src, args.out_dir, args.task,
            config=args.config, processor=args.processor, overwrite=args.overwrite,
        )
    except ValueError as exc:
        print(f"capfilt convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.task} model to {out}")
    return 0
