"""`capfilt convert` — import an original BLIP/LAVIS checkpoint into a transformers directory."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from capfilt.jobs import options

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


@dataclass
class ConvertOptions:
    source_format: str = field(metadata={
        "help": "layout of the source checkpoint (original salesforce/BLIP or LAVIS BLIP)", "flag": "--from",
        "choices": ["blip"]})
    task: str = field(metadata={
        "help": "which model to build: the captioner or the ITM/ITC filter", "choices": ["caption", "itm"]})
    src: str = field(metadata={
        "help": "original checkpoint file (.pth, or .safetensors in the original layout); a transformers "
                "directory needs no conversion", "positional": True, "flag": "SRC.pth"})
    out_dir: str = field(metadata={
        "help": "directory to write (save_pretrained layout)", "positional": True, "flag": "OUT_DIR"})
    config: str | None = field(default=None, metadata={
        "help": "BlipConfig to build (directory, hub id or config.json); default: inferred from the "
                "checkpoint's tensor shapes"})
    processor: str | None = field(default=None, metadata={
        "help": "directory or hub id whose BlipProcessor (image processor + tokenizer) is saved into OUT_DIR; "
                "its tokenizer must match the checkpoint's vocabulary and special token ids. Without it "
                "OUT_DIR holds only the model"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace a model directory in OUT_DIR (its old contents are deleted once the conversion "
                "has succeeded); a directory another command wrote is refused even so"})


def add_arguments(parser) -> None:
    options.add_arguments(parser, ConvertOptions)


def run(args) -> int:
    from capfilt.model.builders.convert import convert_blip_checkpoint

    opts = options.from_args(ConvertOptions, args)
    log.info("converting %s (%s, task %s) -> %s", opts.src, opts.source_format, opts.task, opts.out_dir)
    out = convert_blip_checkpoint(opts.src, opts.out_dir, opts.task, config=opts.config,
                                  processor=opts.processor, overwrite=opts.overwrite)
    print(f"wrote {opts.task} model to {out}")
    return 0
