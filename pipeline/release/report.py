"""``report.html`` for a curate output directory or a release directory: one self-contained page.

It shows the run's counts, histograms of ITM and CLIP scores for kept against dropped rows,
the drop-reason breakdown, caption length distributions and a grid of sample images with
their web and selected captions. Plots are drawn with matplotlib's object API (``Figure``
renders through Agg without touching pyplot's global backend) and every plot and thumbnail is
embedded as a base64 data URI, so the file can be mailed or archived alone. All text from the
data (captions, keys, reasons) is HTML-escaped: web captions are untrusted input.
"""
from __future__ import annotations

import base64
import hashlib
import html
import re
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from matplotlib.figure import Figure

from capfilt.pipeline.curate.record import UNTRAINED, untrained_models
from capfilt.transforms import shards as reader
from capfilt.transforms.image import DRAFT_SIDE, ImageDecodeError, decode_image
from capfilt.transforms.schemas import CURATED_SCHEMA

log = logging.getLogger(__name__)

COLUMNS = ["key", "keep", "drop_reason", "web_caption", "captions", "caption_sources",
           "synthetic_captions", "web_itm", "web_clip", "synthetic_itm", "synthetic_clip"]
THUMB_PX = 160
COUNT_ORDER = ("input_rows", "kept", "dropped", "errors", "decontaminated", "deduped", "released")  # release steps in order
KEPT_COLOUR, DROPPED_COLOUR = "#2b8a3e", "#c92a2a"


@dataclass
class ReportData:
    """Rows of a run without images: ``table`` has COLUMNS plus ``status`` ("kept" or the
    reason) and ``source`` (the shard holding the image bytes)."""

    kind: str  # "curate" or "release"
    root: Path
    table: pa.Table
    counts: dict
    errors: dict
    warnings: list[str] = field(default_factory=list)  # shown first: e.g. an untrained model


def _shards(root: Path) -> list[str]:
    return [str(p) for p in sorted((root / "shards").glob("*.parquet"))]


def _read(files: list[str], columns: list[str]) -> pa.Table:
    return reader.read_columns(files, columns, schema=CURATED_SCHEMA)


def load(root: Path) -> ReportData:
    """Read a curate dir (``shards/``, ``errors/``, ``stats.json``) or a release dir."""
    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").is_file() else {}
    warnings = [f"{model} {UNTRAINED}" for model in untrained_models(manifest)]
    if str(manifest.get("format", "")).startswith("capfilt-release"):
        released = _read(_shards(root), COLUMNS)
        released = released.append_column("status", pa.array(["kept"] * released.num_rows, pa.string()))
        released = released.append_column("source", pa.array(["release"] * released.num_rows, pa.string()))
        removed = reader.read_columns([root / "removed.parquet"], COLUMNS + ["reason", "detail", "source"])
        status = [r if r != "not_kept" else f"not_kept: {d}" for r, d in
                  zip(removed.column("reason").to_pylist(), removed.column("detail").to_pylist())]
        source = removed.column("source")
        removed = removed.select(COLUMNS).append_column("status", pa.array(status, pa.string()))
        removed = removed.append_column("source", source)
        table = pa.concat_tables([released, removed.select(released.schema.names).cast(released.schema)])
        return ReportData("release", root, table, manifest.get("counts", {}), {}, warnings)
    files = _shards(root)
    if not files:
        raise ValueError(f"{root}: neither a release (manifest.json format capfilt-release) "
                         f"nor a curate output (no shards/*.parquet)")
    parts = []
    for f in files:
        t = _read([f], COLUMNS)
        status = [("kept" if k else (r or "dropped")) for k, r in
                  zip(t.column("keep").to_pylist(), t.column("drop_reason").to_pylist())]
        t = t.append_column("status", pa.array(status, pa.string()))
        parts.append(t.append_column("source", pa.array([f] * t.num_rows, pa.string())))
    stats = json.loads((root / "stats.json").read_text()) if (root / "stats.json").is_file() else {}
    errors = {}
    err_files = [str(p) for p in sorted((root / "errors").glob("*.parquet"))]
    if err_files:
        et = reader.read_columns(err_files, ["stage", "error_type"])
        for stage, etype in zip(et.column("stage").to_pylist(), et.column("error_type").to_pylist()):
            errors[f"{stage}: {etype}"] = errors.get(f"{stage}: {etype}", 0) + 1
    return ReportData("curate", root, pa.concat_tables(parts), stats, errors, warnings)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _finite(values) -> np.ndarray:
    a = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return a[np.isfinite(a)]


def _split(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """Values of a scalar or list column for kept rows and for dropped rows."""
    kept = pc.equal(table.column("status"), "kept")
    out = []
    for mask in (kept, pc.invert(kept)):
        col = table.filter(mask).column(column)
        if pa.types.is_list(col.type):
            col = pc.list_flatten(col)
        out.append(_finite(col.to_pylist()))
    return out[0], out[1]


def score_figure(table: pa.Table, score: str) -> str:
    """Histograms of `web_<score>` and `synthetic_<score>`, kept against dropped rows."""
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    for ax, column in zip(fig.subplots(1, 2), (f"web_{score}", f"synthetic_{score}")):
        kept, dropped = _split(table, column)
        bins = np.linspace(*(0.0, 1.0) if score == "itm" else (-1.0, 1.0), 41)
        ax.hist([kept, dropped], bins=bins, label=[f"kept rows ({len(kept)})", f"dropped rows ({len(dropped)})"],
                color=[KEPT_COLOUR, DROPPED_COLOUR], alpha=0.5, histtype="stepfilled")
        ax.set_title(f"{column} ({'ITM p(match)' if score == 'itm' else 'CLIP cosine'})")
        ax.set_ylabel("captions")
        ax.legend(fontsize=8)
    return _png(fig)


def reasons_figure(counts: dict[str, int]) -> str:
    fig = Figure(figsize=(10, 0.8 + 0.35 * max(len(counts), 1)), layout="constrained")
    ax = fig.subplots()
    names = list(counts) or ["(none)"]
    ax.barh(names, [counts.get(n, 0) for n in names], color=DROPPED_COLOUR)
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    return _png(fig)


def _word_counts(col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_list(col.type):
        col = pc.list_flatten(col)
    return np.asarray([len(t.split()) for t in col.to_pylist() if t is not None], dtype=np.int64)


def length_figure(table: pa.Table) -> str:
    kept = pc.equal(table.column("status"), "kept")
    series = {
        "web caption, kept rows": _word_counts(table.filter(kept).column("web_caption")),
        "web caption, dropped rows": _word_counts(table.filter(pc.invert(kept)).column("web_caption")),
        "synthetic captions": _word_counts(table.column("synthetic_captions")),
        "selected captions": _word_counts(table.filter(kept).column("captions")),
    }
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax = fig.subplots()
    top = max([int(v.max()) for v in series.values() if len(v)] + [1])
    ax.hist(list(series.values()), bins=np.arange(0, top + 2) - 0.5, label=list(series), histtype="step",
            linewidth=1.5)
    ax.set_xlabel("words per caption")
    ax.set_ylabel("captions")
    ax.legend(fontsize=8)
    return _png(fig)


def _stable_order(keys: list[str]) -> list[int]:
    return sorted(range(len(keys)), key=lambda i: hashlib.blake2b(str(keys[i]).encode(), digest_size=8).digest())


def pick_samples(table: pa.Table, n: int) -> tuple[list[int], list[int]]:
    """Row indices of up to n kept and n dropped samples, in a stable pseudo-random order.
    Dropped samples take turns over the drop reasons so that rare reasons are shown."""
    keys, status = table.column("key").to_pylist(), table.column("status").to_pylist()
    order = _stable_order(keys)
    kept = [i for i in order if status[i] == "kept"][:n]
    by_reason: dict[str, list[int]] = {}
    for i in order:
        if status[i] != "kept":
            by_reason.setdefault(status[i], []).append(i)
    dropped, queues = [], [q for _, q in sorted(by_reason.items())]
    while len(dropped) < n and any(queues):
        for q in queues:
            if q and len(dropped) < n:
                dropped.append(q.pop(0))
    return kept, dropped


def fetch_images(data: ReportData, rows: list[int]) -> dict[int, bytes]:
    """Image bytes of the given rows, read from their shards (kept in a release: its shards)."""
    wanted: dict[str, dict[str, int]] = {}
    keys, sources = data.table.column("key").to_pylist(), data.table.column("source").to_pylist()
    for i in rows:
        src = _shards(data.root) if sources[i] == "release" else [sources[i]]
        for f in src:
            wanted.setdefault(f, {})[keys[i]] = i
    out = {}
    for f, by_key in wanted.items():
        if not Path(f).is_file():
            continue  # an input of a release that has moved: show the row without its image
        t = reader.read_columns([f], ["key", "jpg"], filter=ds.field("key").isin(list(by_key)))
        for key, jpg in zip(t.column("key").to_pylist(), t.column("jpg").to_pylist()):
            if key in by_key and jpg is not None:
                out.setdefault(by_key[key], jpg)
    return out


def thumbnail(data: bytes | None) -> str | None:
    if not data:
        return None
    try:
        img = decode_image(data, draft_side=DRAFT_SIDE)
    except ImageDecodeError:
        return None
    img.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# C0/C1 controls and the bidi embedding, override and isolate marks: a key or caption holding them
# would hide text or reverse what follows it on the page. They are shown as \uXXXX instead.
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape(text: str) -> str:
    """``text`` for HTML: escaped, with control and bidi characters made visible."""
    return _INVISIBLE.sub(lambda m: f"\\u{ord(m.group()):04x}", html.escape(text))


def _fmt(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _card(row: dict, thumb: str | None) -> str:
    e = escape
    img = (f'<img src="{thumb}" alt="{e(str(row["key"]))}">' if thumb
           else '<div class="noimg">image not available</div>')
    selected = "".join(f"<li><span class=src>{e(str(s))}</span> {e(str(c))}</li>"
                       for c, s in zip(row["captions"] or [], row["caption_sources"] or []))
    cls = "kept" if row["status"] == "kept" else "dropped"
    return (f'<div class="card {cls}">{img}<div class="key">{e(str(row["key"]))}</div>'
            f'<div class="status">{e(str(row["status"]))}</div>'
            f'<div class="web"><b>web</b> (ITM {_fmt(row["web_itm"])}, CLIP {_fmt(row["web_clip"])}): '
            f'{e(str(row["web_caption"] or ""))}</div><ul class="sel">{selected or "<li>(none selected)</li>"}</ul></div>')


def _grid(indices: list[int], rows: dict, images: dict) -> str:
    return "".join(_card(rows[i], thumbnail(images.get(i))) for i in indices) or "<p>none</p>"


CSS = """body{font-family:sans-serif;margin:24px;color:#222}h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
img.plot{max-width:100%}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px}
.card{border:2px solid #ccc;border-radius:6px;padding:6px;font-size:12px}.card.kept{border-color:#2b8a3e}
.card.dropped{border-color:#c92a2a}.card img{width:160px;height:auto;display:block;margin:auto}
.noimg{height:100px;background:#eee;display:flex;align-items:center;justify-content:center}
.warning{background:#fff3bf;border:1px solid #f08c00;padding:6px 10px}.key{font-family:monospace;color:#555}.status{font-weight:bold}.src{color:#1864ab;font-size:11px}.sel{padding-left:16px;margin:4px 0}"""


def render(data: ReportData, samples: int = 12, title: str | None = None) -> str:
    t = data.table
    status = t.column("status").to_pylist()
    reasons: dict[str, int] = {}
    for s in status:
        if s != "kept":
            reasons[s] = reasons.get(s, 0) + 1
    reasons.update({f"error: {k}": v for k, v in data.errors.items()})
    kept_rows, dropped_rows = pick_samples(t, samples)
    images = fetch_images(data, kept_rows + dropped_rows)
    sampled = kept_rows + dropped_rows
    rows = dict(zip(sampled, t.take(pa.array(sampled, pa.int64())).to_pylist()))  # only the shown rows
    order = [k for k in COUNT_ORDER if k in data.counts] + sorted(set(data.counts) - set(COUNT_ORDER))
    counts = "".join(f"<tr><th>{escape(k)}</th><td>{data.counts[k]}</td></tr>" for k in order
                     if isinstance(data.counts[k], (int, float)))
    e = escape
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>capfilt report: {e(title or str(data.root))}</title>
<style>{CSS}</style></head><body>
<h1>capfilt {data.kind} report: {e(title or str(data.root))}</h1>
{"".join(f'<p class="warning"><b>Warning:</b> {e(w)}</p>' for w in data.warnings)}
<p>{t.num_rows} rows: {status.count("kept")} kept, {t.num_rows - status.count("kept")} dropped or removed.</p>
<h2>Counts</h2><table>{counts or "<tr><td>no run record</td></tr>"}</table>
<h2>ITM scores</h2><img class="plot" alt="ITM histograms" src="{score_figure(t, "itm")}">
<h2>CLIP scores</h2><img class="plot" alt="CLIP histograms" src="{score_figure(t, "clip")}">
<h2>Drop reasons</h2><img class="plot" alt="drop reasons" src="{reasons_figure(reasons)}">
<table>{"".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in sorted(reasons.items()))}</table>
<h2>Caption lengths</h2><img class="plot" alt="caption lengths" src="{length_figure(t)}">
<h2>Sample kept rows</h2><div class="grid" id="kept">{_grid(kept_rows, rows, images)}</div>
<h2>Sample dropped rows</h2><div class="grid" id="dropped">{_grid(dropped_rows, rows, images)}</div>
</body></html>
"""


def write_report(root, out_file=None, samples: int = 12, title: str | None = None, warn: bool = True) -> Path:
    """Write ``report.html`` for the curate or release directory ``root``; returns its path.
    ``warn``: log the page's warnings too (the release build has logged them already)."""
    data = load(Path(root))
    for warning in data.warnings if warn else ():
        log.warning("report: %s", warning)
    out = Path(out_file) if out_file else Path(root) / "report.html"
    _check_writable(out)  # before rendering: plots and thumbnails are the slow part
    page = render(data, samples, title)
    try:
        out.write_text(page, encoding="utf-8")
    except OSError as err:
        raise ValueError(f"cannot write the report to {out} ({err.strerror or err})") from err
    log.info("report: %s (%d rows)", out, data.table.num_rows)
    return out


def _check_writable(out: Path) -> None:
    """ValueError naming ``out`` unless it can be created as a file (parents are created)."""
    if out.is_dir():
        raise ValueError(f"cannot write the report to {out}: it is a directory")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"cannot write the report to {out}: {blocker} is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write the report to {out}: creating {out.parent} failed "
                         f"({err.strerror or err})") from err
