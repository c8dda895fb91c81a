"""Curate outputs on object storage (``s3://``, ``gs://``) as release inputs.

A release reads every input row twice and builds its faiss index in memory on one machine, so a
remote curate output is first copied into a local folder: its ``manifest.json`` and
``stats.json``, and the curated shards that manifest names (``shards/NAME``; a file no marker or
manifest names is a killed run's and is never read). The release then checks the copies against
the manifest's sha256s as it checks local inputs, and names the remote objects (not the local
copies) in its ``source`` column and lineage. Object access goes through Beam's ``FileSystems``
with its default options (credentials and, for S3, the endpoint from the client library's own
environment: ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, ...).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from apache_beam.io.filesystems import FileSystems

from capfilt.pipeline.files import is_remote

log = logging.getLogger(__name__)


def _open(url: str):
    return FileSystems.open(url, compression_type="uncompressed")


def fetch_curate_output(url: str, dest: Path) -> Path:
    """Copy the curate output at ``url`` (its record files and the shards its manifest names)
    into the new folder ``dest``; ValueError naming the object that is missing."""
    base = url.rstrip("/")
    (dest / "shards").mkdir(parents=True)
    for name in ("manifest.json", "stats.json"):
        if not FileSystems.exists(f"{base}/{name}"):
            if name == "manifest.json":
                raise ValueError(f"release input {url} has no manifest.json: only a finished `capfilt curate` "
                                 f"output (which records its shards and their hashes) can be released")
            continue
        with _open(f"{base}/{name}") as src, open(dest / name, "wb") as out:
            shutil.copyfileobj(src, out)
    try:
        outputs = json.loads((dest / "manifest.json").read_text()).get("outputs") or []
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{base}/manifest.json: not a curate manifest ({err})") from err
    names = [str(o.get("path", "")) for o in outputs if isinstance(o, dict)]
    shards = [n for n in names if n.startswith("shards/") and "/" not in n[len("shards/"):]]
    for rel in shards:
        src_url = f"{base}/{rel}"
        if not FileSystems.exists(src_url):
            raise ValueError(f"release input {url}: shard {rel} is recorded in its manifest.json but missing; "
                             f"re-run curate to restore it")
        with _open(src_url) as src, open(dest / rel, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    log.info("release input %s: %d shard(s) copied to %s", url, len(shards), dest)
    return dest


def local_inputs(inputs, workdir: Path) -> tuple[list[Path], dict[str, str]]:
    """``inputs`` with every URL replaced by a local copy under ``workdir``; and {local copy:
    URL} to name the originals in the release's records."""
    out, names = [], {}
    for i, given in enumerate(inputs):
        if isinstance(given, str) and is_remote(given):
            local = fetch_curate_output(given, workdir / f"input-{i}")
            names[str(local)] = given.rstrip("/")
            out.append(local)
        else:
            out.append(Path(given))
    return out, names


def renamed(text: str, names: dict[str, str]) -> str:
    """A local copy's path (or a path below it) given as the remote input it was copied from."""
    for local, url in names.items():
        if text == local or text.startswith(local + "/"):
            return url + text[len(local):]
    return text


def as_given(sources: list[str], lineage: list[dict], names: dict[str, str]) -> tuple[list[str], list[dict]]:
    """The release's ``source`` names and lineage entries with local copies named by their URLs."""
    return ([renamed(s, names) for s in sources],
            [dict(entry, dir=renamed(entry["dir"], names)) for entry in lineage])
