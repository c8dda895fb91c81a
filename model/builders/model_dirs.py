"""Where the model directories of a pretrained run are: `--init DIR` may be a run's output
(DIR/captioner, DIR/itm, DIR/clip), a single transformers directory, or an open_clip directory.
The kind of each is read from its config (`architectures`), never guessed from names."""
from __future__ import annotations

import json
from pathlib import Path

from capfilt.model.specs import CLIP_CONFIG, ModelSpec, near_miss

ARCHITECTURES = {"BlipForConditionalGeneration": "captioner", "BlipForImageTextRetrieval": "itm",
                 "Blip2ForImageTextRetrieval": "blip2"}


def find_model_dirs(init) -> dict[str, str]:
    """Model directories under `init`: {"captioner", "itm", "blip2", "clip"} -> path, from
    DIR itself or DIR/{captioner,itm,clip} (read from each config's `architectures`)."""
    spec = ModelSpec.parse(init)
    root = spec.path or Path(spec.text)  # a hub id names no directory: nothing is found there
    if not root.is_dir():
        raise ValueError(f"--init {init}: no such directory {root}{near_miss(root)}")
    found: dict[str, str] = {}
    for d in (root, root / "captioner", root / "itm", root / "clip"):
        if (d / "config.json").is_file():
            arch = (json.loads((d / "config.json").read_text()).get("architectures") or [""])[0]
            if arch in ARCHITECTURES:
                found.setdefault(ARCHITECTURES[arch], str(d))
        if (d / CLIP_CONFIG).is_file():
            found.setdefault("clip", str(d))
    tower = next((d / "tower.json" for d in (root, root / "qformer") if (d / "tower.json").is_file()), None)
    if not found and tower is not None:
        spec = json.loads(tower.read_text()).get("tower")
        raise ValueError(f"{init}: {tower.parent} holds a BLIP-2 Q-Former trained against the frozen tower "
                         f"{spec!r}, which transformers' Blip2VisionModel cannot express, so no library "
                         f"loader reads it; train with a tower that maps into it "
                         f"(timm:<a ViT>, hf:DIR) to get a loadable DIR/itm")
    if not found:
        raise ValueError(f"--init {init}: no model directory found (looked for config.json with a BLIP "
                         f"architecture, or {CLIP_CONFIG}, in {root} and its captioner/, itm/, clip/)")
    return found
