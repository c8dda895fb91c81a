"""Lineage and accounting of a release: ``manifest.json``, the count check and the dataset card.

The manifest is what a scheduled job compares against to decide whether a release is stale
(``jobs/scheduled/run_job.py``), so it holds no timestamps: the same inputs and settings give the same
manifest, byte for byte. Model hashes and the code version come from the same functions the
curate run record uses (``pipeline.curate.record``), so a model has one hash in both manifests.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from capfilt.pipeline.curate.record import UNTRAINED, code_version, model_record, untrained_models
from capfilt.pipeline.files import file_sha256
from capfilt.transforms import shards as reader
from capfilt.transforms.files import outputs

log = logging.getLogger(__name__)

FORMAT = outputs.RELEASE_FORMAT + "1"
# Keys of a curate manifest that describe how its rows were made (copied into the lineage).
CURATE_LINEAGE_KEYS = ("models", "thresholds", "seeds", "round", "settings", "code_version")


class AccountingError(RuntimeError):
    """The release's counts do not reconcile; the release is not published."""


def curate_lineage(inputs: list[Path]) -> list[dict]:
    """Per input dir: the parts of its curate manifest.json and stats.json that say how it was made."""
    lineage = []
    for d in inputs:
        entry = {"dir": str(d), "curate": None, "stats": None}
        for name, key in (("manifest.json", "curate"), ("stats.json", "stats")):
            path = d / name
            if path.is_file():
                try:
                    data = json.loads(path.read_text())
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: not valid JSON ({err})") from err
                entry[key] = {k: data[k] for k in CURATE_LINEAGE_KEYS if k in data} if key == "curate" else data
        if entry["curate"] is None:
            log.warning("%s has no manifest.json: the release lineage will lack its models", d)
        lineage.append(entry)
    return lineage


def is_release_dir(path: Path) -> bool:
    """True when ``path/manifest.json`` says the directory is a capfilt release (``format``)."""
    try:
        data = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(outputs.RELEASE_FORMAT)


def recorded_shards(d: Path) -> list[dict]:
    """The curated shards the curate run recorded in ``d/manifest.json`` (``outputs`` entries
    whose ``path`` is ``shards/NAME``): [{"name", "sha256", "rows"}], sorted by name.

    The release reads these and only these: globbing ``shards/*.parquet`` would silently ship
    a partial dataset when a shard was lost, or pick up a file curate never wrote."""
    path = d / "manifest.json"
    if not path.is_file():
        raise ValueError(f"release input {d} has no manifest.json: only a finished `capfilt curate` "
                         f"output (which records its shards and their hashes) can be released")
    try:
        outputs = json.loads(path.read_text()).get("outputs")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{path}: not a curate manifest ({err})") from err
    if not isinstance(outputs, list):
        raise ValueError(f"{path} lists no output shards (`outputs`): not a finished curate output")
    shards = []
    for entry in outputs:
        rel = str(entry.get("path", "")) if isinstance(entry, dict) else ""
        if not rel.startswith("shards/"):
            continue  # errors/ shards are not released
        if "/" in rel[len("shards/"):] or not entry.get("sha256"):
            raise ValueError(f"{path}: bad output entry {entry!r}")
        shards.append({"name": rel[len("shards/"):], "sha256": entry["sha256"], "rows": entry.get("rows")})
    return sorted(shards, key=lambda s: s["name"])


def default_clip(lineage: list[dict]) -> str:
    """The CLIP model the first curate run used (its ``models.clip`` entry)."""
    for entry in lineage:
        clip = ((entry.get("curate") or {}).get("models") or {}).get("clip")
        if isinstance(clip, dict):
            clip = clip.get("spec") or clip.get("id") or clip.get("path") or clip.get("name")
        if clip:
            return str(clip)
    raise ValueError("no CLIP model recorded in the inputs' manifest.json (models.clip); pass --clip")


def clip_embedder(spec: str):
    """Images -> (B, D) normalised CLIP image embeddings (``model.ranker.ClipRanker``)."""
    from capfilt.model.inference.ranker import ClipRanker

    return ClipRanker.load(spec).encode_images


def count_steps(dec, reasons, outputs: dict) -> dict:
    """The count at every step, from the per-row decisions (``RowDecisions``)."""
    removed = {r: dec.count(r) for r in reasons}
    n = len(dec.reason)
    steps, have = [], n
    # Decontamination runs before dedup (pipeline.release.build.decide), so the steps chain in that order.
    for step, why in (("keep", ("not_kept", "unreadable")),
                      ("decontaminate", ("contaminated",)),
                      ("dedup", ("exact_duplicate", "duplicate_key", "near_duplicate"))):
        gone = {r: removed[r] for r in why}
        steps.append({"step": step, "in": have, "removed": gone, "out": have - sum(gone.values())})
        have -= sum(gone.values())
    released = sum(s["rows"] for s in outputs["shards"])
    return {
        "input_rows": n, "kept": steps[0]["out"], "decontaminated": steps[1]["out"],
        "deduped": steps[2]["out"], "released": released, "removed": removed, "steps": steps,
    }


def _file_entry(base: Path, name: str, rows: int | None = None) -> dict:
    path = base / name
    if rows is None:
        rows = reader.row_count([path])
    return {"name": name, "sha256": file_sha256(str(path)), "rows": rows}


def build_manifest(cfg, files, sources, hashes, lineage, eval_set, plans, counts, outputs, stage: Path) -> dict:
    """``hashes``: the SHA-256 of each input shard, checked against its curate record before the build."""
    inputs = []
    for entry in lineage:
        shards = [{"name": f"shards/{p.name}", "sha256": h, "rows": reader.row_count([p])}
                  for p, s, h in zip(files, sources, hashes) if s.startswith(f"{entry['dir']}/shards/")]
        inputs.append({"dir": entry["dir"], "shards": shards, "curate": entry["curate"], "curate_stats": entry["stats"]})
    eval_info = None
    if eval_set is not None:
        eval_info = {"pattern": cfg.decontaminate, "images": len(eval_set.keys), "unreadable": eval_set.unreadable,
                     "files": [{"name": f, "sha256": file_sha256(f)} for f in eval_set.files]}
    manifest = {
        "format": FORMAT,
        "code_version": code_version(),
        "settings": cfg.settings(),
        "thresholds": {"dedup_cosine": cfg.dedup_threshold,
                       "decontaminate_cosine": cfg.eval_threshold if cfg.decontaminate else None},
        "seeds": {"index": cfg.seed},
        "models": {"release_clip": model_record(cfg.clip) if cfg.clip else {"id": None, "kind": "custom embedder"}},
        "index": plans,
        "inputs": inputs,
        "eval_set": eval_info,
        "counts": counts,
        "outputs": {
            "shards": [_file_entry(stage, s["name"]) for s in outputs["shards"]],
            "webdataset": [{**_file_entry(stage, t["name"], t["rows"])} for t in outputs["webdataset"]],
            "removed": _file_entry(stage, "removed.parquet"),
        },
    }
    for model in untrained_models(manifest):  # the flags are in the models entries; say so in the log
        log.warning("release: %s %s", model, UNTRAINED)
    return manifest


def check_counts(manifest: dict) -> None:
    """Raise AccountingError unless every count agrees with the others and with the files."""
    c, out = manifest["counts"], manifest["outputs"]
    problems = []
    chain = c["input_rows"]
    for step in c["steps"]:
        if step["in"] != chain or step["in"] - sum(step["removed"].values()) != step["out"]:
            problems.append(f"step {step['step']}: in {step['in']} - removed {step['removed']} != out {step['out']}")
        chain = step["out"]
    shard_rows = sum(s["rows"] for s in out["shards"])
    if not c["released"] == c["deduped"] == shard_rows:
        problems.append(f"released {c['released']}, deduped {c['deduped']}, rows in shards {shard_rows}")
    if out["webdataset"] and sum(t["rows"] for t in out["webdataset"]) != shard_rows:
        problems.append("webdataset tars and parquet shards hold different row counts")
    if c["released"] + out["removed"]["rows"] != c["input_rows"]:
        problems.append(f"released {c['released']} + removed.parquet {out['removed']['rows']} != input {c['input_rows']}")
    in_rows = sum(s["rows"] for i in manifest["inputs"] for s in i["shards"])
    if in_rows != c["input_rows"]:
        problems.append(f"input shards hold {in_rows} rows, the build read {c['input_rows']}")
    if problems:
        raise AccountingError("release counts do not reconcile: " + "; ".join(problems))


COLUMNS = [
    "| `key`, `url`, `sha256` | sample key, source URL, SHA-256 of the original download |",
    "| `jpg`, `width`, `height` | image bytes and size |",
    "| `captions`, `caption_sources` | the selected training captions, each `web` or `synthetic` |",
    "| `web_caption`, `web_itm`, `web_itc`, `web_clip` | the cleaned web caption and its ITM p(match), ITC and CLIP cosines |",
    "| `synthetic_captions`, `synthetic_itm`, `synthetic_itc`, `synthetic_clip` | every sampled caption and its scores |",
    "| `keep`, `drop_reason`, `round`, `seed` | always true here; curate's reason (null); bootstrap round; sampling seed |",
]
LIMITATIONS = """\
- Selected captions come from a captioner and a filter trained on other data: they inherit
  their vocabulary and biases, and the ITM filter has false accepts and false rejects.
- Near-duplicates are judged by CLIP image embeddings at one cosine threshold: crops and heavy
  edits below it stay, and distinct but visually near-identical images above it are merged.
  Clusters are transitive (a~b and b~c removes two of a, b, c even when a !~ c).
- Decontamination covers only the evaluation images named at build time.
- Image licences, personal data and unsafe content are not checked by this build.
"""


def dataset_card(m: dict, report: bool = True) -> str:
    """The release README.md: what it is, counts, filters, lineage, limitations (`report`:
    whether the release has a report.html)."""
    c, s = m["counts"], m["settings"]
    lines = [
        "# CapFilt image-text release", "",
        "Image-text pairs curated with BLIP's CapFilt: each web image was captioned by a BLIP "
        "captioner, the web and synthetic captions were filtered by an ITM model, the survivors "
        "ranked by CLIP, and the best ones kept (`captions`, with `caption_sources`). This release "
        "then removed images that match the evaluation set, and exact and near-duplicate images.", "",
        "## Counts", "", "| step | rows in | removed | rows out |", "|---|---|---|---|",
    ]
    for step in c["steps"]:
        removed = ", ".join(f"{k} {v}" for k, v in step["removed"].items())
        lines.append(f"| {step['step']} | {step['in']} | {removed} | {step['out']} |")
    lines += ["", f"Released: **{c['released']}** rows in {len(m['outputs']['shards'])} parquet shards"
              + (f" and {len(m['outputs']['webdataset'])} webdataset tars" if m["outputs"]["webdataset"] else "")
              + ". Every other input row is listed in `removed.parquet` with its reason.", "",
              "## Filters", "",
              f"- curate: rows kept by the CapFilt filter (`keep`); curate settings per input are in `manifest.json`;",
              f"- decontamination (before dedup): " + (f"cosine >= {s['decontaminate_threshold']} to any image of `{s['decontaminate']}`"
                                                       if s["decontaminate"] else "not run") + ";",
              f"- exact duplicates: identical image bytes (SHA-256);",
              f"- near duplicates: CLIP image cosine >= {s['dedup_threshold']} (index: {m['index'].get('near_dedup', {}).get('kind', 'none')});"
              " the kept copy has the best selected-caption CLIP score, then ITM, then the smallest key;",
              f"- unique keys: a key appears once; a row whose image is not otherwise released and whose key"
              " a better-ranked released row has is removed (`duplicate_key`).", "",
              "## Layout", "",
              "- `shards/part-XXXXX.parquet`: one row per image, with the columns below;",
              "- `webdataset/XXXXX.tar` (optional): `NNNNNNNNN.jpg` + `.json` (`caption`, `captions`, `key`, ...) + `.txt`;",
              "- `removed.parquet`, `manifest.json` (hashes, models, settings, counts)"
              + (", `report.html`." if report else "."), "",
              "| column | meaning |", "|---|---|", *COLUMNS, "",
              f"Code version: `{m['code_version']}`.", "", "## Known limitations", "", LIMITATIONS]
    untrained = untrained_models(m)
    if untrained:  # first thing a reader sees, under the title
        lines[1:1] = ["", *(f"**Warning:** {model} {UNTRAINED}." for model in untrained)]
    return "\n".join(lines)
