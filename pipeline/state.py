"""The state of a curate output directory: done markers, settings, staging, the run record.

Layout of ``--out``::

    shards/part-<shard>.parquet    curated rows of input shard <shard>
    errors/part-<shard>.parquet    error rows of input shard <shard>
    _state/<shard>.json            done marker: input (path, size, sha256, rows), outputs
                                   (name, sha256, rows), counts; written last
    _state/settings.json           the settings that decide rows (refused if they change)
    _staging/<run>/                pipeline output before it is final (deleted on every run)
    stats.json  manifest.json      the run record
    .lock                          held while a run works here (local directories)

Paths go through Beam's ``FileSystems`` so the layout works on any filesystem Beam knows;
the lock only where the directory is local.
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath

from apache_beam.io.filesystems import FileSystems

from pipeline.sinks import check_identity, check_schema, code_version, model_record, output_counts
from pipeline.sources import ShardInfo, file_sha256
from transforms.schemas import CURATED_SCHEMA, ERROR_SCHEMA


def _join(*parts: str) -> str:
    return FileSystems.join(*parts)


def output_name(shard_id: str) -> str:
    """``part-<id>.parquet`` (an id that already starts with ``part-`` is used as is)."""
    return f"part-{shard_id.removeprefix('part-')}.parquet"


def read_json(path: str):
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return json.loads(f.read().decode("utf-8"))


def write_json(path: str, obj) -> None:
    """Write to a temporary name, then rename: readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with FileSystems.create(tmp, compression_type="uncompressed") as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    FileSystems.rename([tmp], [path])


def staged_counts(shard: ShardInfo, curated: str, errors: str) -> dict:
    """Counts of one shard's staged files, after checking their schemas and the identity."""
    check_schema(curated, CURATED_SCHEMA)
    check_schema(errors, ERROR_SCHEMA)
    counts = dict(output_counts(curated, errors), input_rows=shard.num_rows)
    check_identity(counts, f"shard {shard.path}")
    return counts


def check_models(cfg) -> None:
    """Local model paths must be loadable before any work: ValueError naming the option."""
    from model.device import check_model_dir, is_local_spec
    from model.ranker import parse_spec

    checks = [("--clip", cfg.clip, parse_spec)]
    if cfg.use_captioner:
        checks.append(("--captioner", cfg.captioner, check_model_dir))
    if cfg.use_filter:
        checks.append(("--filter", cfg.filter, check_model_dir))
    for flag, spec, check in checks:
        if check is parse_spec or is_local_spec(spec):
            try:
                check(spec)
            except ValueError as err:
                raise ValueError(f"{flag} {spec}: {err}") from err


def settings_record(cfg) -> dict:
    """What decides the rows: the settings and each model's content hash."""
    check_models(cfg)
    return {
        "settings": cfg.fingerprint(),
        "models": {
            "captioner": model_record(cfg.captioner if cfg.use_captioner else None),
            "filter": model_record(cfg.filter if cfg.use_filter else None),
            "clip": model_record(cfg.clip),
        },
    }


def manifest(cfg, settings: dict, markers: list[dict]) -> dict:
    markers = sorted(markers, key=lambda m: m["shard_id"])
    return {
        "code_version": code_version(),
        "models": settings["models"],
        "settings": settings["settings"],
        "thresholds": {"itm_threshold": cfg.itm_threshold if cfg.use_filter else None, "keep_top": cfg.keep_top},
        "seeds": {"run_seed": cfg.seed, "per_sample": "transforms.seeding.sample_seed(run_seed, key, index)"},
        "round": cfg.round,
        "inputs": [m["input"] for m in markers],
        "outputs": [o for m in markers for o in (m["curated"], m["errors"])],
    }


class OutStore:
    """Reads and updates one ``--out`` directory (see the module docstring)."""

    def __init__(self, out: str):
        self.out = out
        self.local = "://" not in out
        self.shards_dir = _join(out, "shards")
        self.errors_dir = _join(out, "errors")
        self.state_dir = _join(out, "_state")
        self.staging_root = _join(out, "_staging")

    @contextlib.contextmanager
    def locked(self):
        if not self.local:
            yield
            return
        import fcntl

        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, ".lock"), "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise RuntimeError(f"{self.out}: another curate run is working in this directory") from err
            yield

    def _ensure(self, path: str) -> None:
        if not FileSystems.exists(path):
            FileSystems.mkdirs(path)

    def _list(self, pattern: str) -> list[str]:
        return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)

    def remove(self, path: str) -> None:
        if FileSystems.exists(path):
            FileSystems.delete([path])

    def reset(self) -> None:
        """--overwrite: delete everything a previous run wrote."""
        for path in (self.shards_dir, self.errors_dir, self.state_dir, self.staging_root,
                     _join(self.out, "stats.json"), _join(self.out, "manifest.json")):
            self.remove(path)

    # -- settings and markers ----------------------------------------------------------------
    def check_settings(self, settings: dict) -> None:
        path = _join(self.state_dir, "settings.json")
        if not FileSystems.exists(path):
            return
        old = read_json(path)
        if old != json.loads(json.dumps(settings)):
            diff = _diff(old, settings)
            raise ValueError(
                f"{self.out} was curated with other settings ({'; '.join(diff)}); "
                f"pass --overwrite to start again, or use another --out"
            )

    def save_settings(self, settings: dict) -> None:
        path = _join(self.state_dir, "settings.json")
        if FileSystems.exists(path):
            return  # check_settings has confirmed they are the same
        self._ensure(self.state_dir)
        write_json(path, settings)

    def markers(self) -> dict[str, dict]:
        if not FileSystems.exists(self.state_dir):
            return {}
        out = {}
        for path in self._list(_join(self.state_dir, "*.json")):
            if posixpath.basename(path) == "settings.json":
                continue
            marker = read_json(path)
            out[marker["shard_id"]] = marker
        return out

    def is_done(self, shard: ShardInfo, markers: dict) -> bool:
        marker = markers.get(shard.shard_id)
        if marker is None:
            return False
        if marker["input"]["size"] != shard.size:
            raise ValueError(
                f"{shard.path} has {shard.size} bytes but was curated into {self.out} with "
                f"{marker['input']['size']}; the input changed: pass --overwrite or use another --out"
            )
        return True

    def completed_files(self) -> tuple[list[str], list[str]]:
        markers = self.markers().values()
        return ([_join(self.shards_dir, m["curated"]["name"]) for m in markers],
                [_join(self.errors_dir, m["errors"]["name"]) for m in markers])

    def clean_incomplete(self, markers: dict) -> None:
        """Delete what a killed run left: staging, outputs without a marker, temp files."""
        self.remove(self.staging_root)
        keep = {m[kind]["name"] for m in markers.values() for kind in ("curated", "errors")}
        for folder in (self.shards_dir, self.errors_dir, self.state_dir):
            if not FileSystems.exists(folder):
                continue
            for path in self._list(_join(folder, "*")):
                name = posixpath.basename(path)
                stray = ".tmp-" in name or (folder != self.state_dir and name not in keep)
                if stray:
                    FileSystems.delete([path])

    # -- one shard ------------------------------------------------------------------------
    def staging_dir(self, run_id: str) -> str:
        path = _join(self.staging_root, run_id)
        self._ensure(path)
        return path

    def staged_paths(self, staging: str, shard: ShardInfo) -> tuple[str, str]:
        stem = output_name(shard.shard_id).removesuffix(".parquet")
        return _join(staging, "curated", stem), _join(staging, "errors", stem)

    def complete(self, shard: ShardInfo, curated: str, errors: str, counts: dict, input_sha256: str) -> dict:
        """Move a shard's staged files into place, then write its done marker (last)."""
        name = output_name(shard.shard_id)
        self._ensure(self.shards_dir)
        self._ensure(self.errors_dir)
        final_cur, final_err = _join(self.shards_dir, name), _join(self.errors_dir, name)
        FileSystems.rename([curated, errors], [final_cur, final_err])
        marker = {
            "shard_id": shard.shard_id,
            "input": {"path": shard.path, "name": posixpath.basename(shard.path), "size": shard.size,
                      "sha256": input_sha256, "rows": shard.num_rows, "format": shard.fmt},
            "curated": {"name": name, "path": f"shards/{name}", "sha256": file_sha256(final_cur),
                        "rows": counts["curated_rows"]},
            "errors": {"name": name, "path": f"errors/{name}", "sha256": file_sha256(final_err),
                       "rows": counts["errors"]},
            "counts": {k: counts[k] for k in ("input_rows", "kept", "dropped", "errors",
                                              "drop_reasons", "error_types")},
        }
        write_json(_join(self.state_dir, f"{shard.shard_id}.json"), marker)
        return marker

    # -- the run record -------------------------------------------------------------------
    def last_run(self) -> dict | None:
        path = _join(self.out, "stats.json")
        return read_json(path).get("this_run") if FileSystems.exists(path) else None

    def write_record(self, stats: dict, manifest_: dict) -> None:
        """stats.json and manifest.json, each rewritten only when its content changed (a
        re-run with nothing to do changes no file)."""
        for name, obj in (("stats.json", stats), ("manifest.json", manifest_)):
            path = _join(self.out, name)
            if FileSystems.exists(path) and read_json(path) == json.loads(json.dumps(obj)):
                continue
            write_json(path, obj)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: was {a!r}, now {b!r}")
    return out
