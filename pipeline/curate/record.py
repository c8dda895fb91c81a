"""The run record's pieces: Beam Metrics of a finished pipeline, the counts identity, a model's
content hash, the code version, and stats.json built from the done markers.

Metrics are optional: a runner may not report them (its result's ``metrics()`` raises
NotImplementedError). The written files decide the counts; Metrics, where there are any, are a
second check and the source of the fp32 re-score counts."""
from __future__ import annotations

import os
import subprocess
from collections import Counter

from apache_beam.metrics.metric import MetricsFilter

from capfilt.pipeline.curate.errors import NAMESPACE
from capfilt.model.specs import identity


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
        return {"id": spec, "sha256": hashes[spec], "kind": "directory"}
    return identity(spec)


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
