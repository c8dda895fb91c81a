"""The run record's pieces: Beam Metrics of a finished pipeline, the counts identity, a model's
content hash, the code version, and stats.json built from the done markers.

Metrics are optional: a runner may not report them (its result's ``metrics()`` raises
NotImplementedError). The written files decide the counts; Metrics, where there are any, are a
second check and the source of the fp32 re-score counts."""
from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

from apache_beam.metrics.metric import MetricsFilter

from capfilt.pipeline.curate.errors import NAMESPACE
from capfilt.model.specs import identity, untrained
from capfilt.pipeline.models import local_spec


def metric_counters(result) -> dict[str, int] | None:
    """Committed ``capfilt`` counters of a finished pipeline, summed over steps; None when the
    runner reports no Metrics."""
    try:
        metrics = result.metrics()
    except NotImplementedError:
        return None
    totals: Counter = Counter()
    for counter in metrics.query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        totals[counter.key.metric.name] += int(counter.committed or 0)
    return dict(totals)


def check_identity(counts: dict, where: str) -> None:
    """Fail loudly unless input_rows == kept + dropped + errors."""
    lhs = counts["input_rows"]
    rhs = counts["kept"] + counts["dropped"] + counts["errors"]
    if lhs != rhs:
        raise RuntimeError(
            f"accounting mismatch in {where}: input_rows {lhs} != kept {counts['kept']} + dropped "
            f"{counts['dropped']} + errors {counts['errors']} = {rhs}"
        )


def model_record(spec: str | None, hashes: dict | None = None) -> dict | None:
    """A model's id and content hash (``capfilt.model.specs.identity``; for a model on object
    storage, the hash of its checked local copy from ``hashes``); None when there is no model."""
    if spec is None:
        return None
    if hashes and spec in hashes:
        record = {"id": spec, "sha256": hashes[spec], "kind": "directory"}
        return {**record, "untrained": True} if untrained(local_spec(spec, hashes[spec])) else record
    return identity(spec)


UNTRAINED = ("is untrained: random weights from `capfilt models init` that no training has touched, so its "
             "captions and scores mean nothing")


def untrained_models(manifest: dict) -> list[str]:
    """"ROLE SPEC" of every model a curate or release manifest marks ``untrained`` (a release's
    own, and its inputs' curate models, prefixed by the input's folder)."""
    found = []

    def scan(models, where: str) -> None:
        for role, record in sorted((models or {}).items()):
            if isinstance(record, dict) and record.get("untrained"):
                found.append(f"{where}{role} {record.get('id')}")

    scan(manifest.get("models"), "")
    for entry in manifest.get("inputs") or []:
        if isinstance(entry, dict):
            scan((entry.get("curate") or {}).get("models"), f"input {entry.get('dir')}: ")
    return found


def code_version() -> str:
    """``git describe`` of the source tree when it is a checkout, else the package version."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty", "--tags"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"capfilt=={version('capfilt')}"
        except PackageNotFoundError:
            return "unknown"


def build_stats(markers: list[dict], run: dict) -> dict:
    """stats.json: totals over every completed shard (from the files) plus this run's part
    (`run`). Raises when the totals break the identity."""
    totals = {"input_rows": 0, "kept": 0, "dropped": 0, "errors": 0}
    reasons: Counter = Counter()
    kinds: Counter = Counter()
    for m in markers:
        for k in totals:
            totals[k] += m["counts"][k]
        reasons.update(m["counts"]["drop_reasons"])
        kinds.update(m["counts"]["error_types"])
    check_identity(totals, "the curated output (files)")
    stats = dict(totals)
    stats.update(
        drop_reasons=dict(sorted(reasons.items())),
        error_types=dict(sorted(kinds.items())),
        shards=len(markers),
        this_run=run,
    )
    return stats


def comparable(record: dict) -> dict:
    """A settings record as a resume compares it: a model with a content hash is that hash,
    however its spec was spelt (``trained/captioner``, ``./trained/captioner``, a copy or a
    link elsewhere, the same directory on object storage); a model without one (a hub id, a
    pretrained tag) is its spec."""
    record = json.loads(json.dumps(record))
    settings, models = record.get("settings") or {}, record.get("models") or {}
    for role, model in models.items():
        if isinstance(model, dict) and model.get("sha256"):
            models[role] = {"sha256": model["sha256"]}
            if role in settings:
                settings[role] = "(by content: models." + role + ".sha256)"
    return record


def settings_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(settings_diff(a, b, f"{prefix}{key}."))
        elif key not in old:  # a setting the writing run did not record: what it used is unknown
            out.append(f"{prefix}{key}: not recorded by the run that wrote it, now {b!r}")
        elif a != b:
            out.append(f"{prefix}{key}: was {a!r}, now {b!r}")
    return out
