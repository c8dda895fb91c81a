"""Model directories on object storage (``s3://``, ``gs://``): a local copy per machine, keyed
and checked by content hash.

``from_pretrained`` and open_clip read local directories, so a model given as a URL is copied
once into a local cache (``$CAPFILT_MODEL_CACHE``, else ``~/.cache/capfilt/models``) under
its SHA-256 (``transforms.files.hashing.dir_sha256``, the hash curate records for a local
directory). The launcher copies it first, checks it like a local directory and records that
hash; each worker then copies it once per machine (a file lock keeps several SDK processes from
copying it twice) and refuses a copy whose hash differs (the model changed during the run).
Hub ids and local directories are not touched. Beam's ``FileSystems`` has no directory copy
that verifies content, hence this module.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid

from apache_beam.io.filesystems import FileSystems

from capfilt.model.specs import ModelSpec
from capfilt.pipeline.files import list_files
from capfilt.transforms.files import hashing, locks

LOG = logging.getLogger(__name__)
CACHE_ENV = "CAPFILT_MODEL_CACHE"


def is_remote_spec(spec: str | None) -> bool:
    return spec is not None and ModelSpec.parse(spec).remote


def cache_root() -> str:
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "capfilt", "models"))


def local_copy(url: str, sha256: str | None = None) -> str:
    """A local directory holding the files below ``url``, in the cache. With ``sha256`` a
    cached copy of that hash is used as is, and a fresh copy must have it (ValueError naming
    both hashes otherwise)."""
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    if sha256 and os.path.isdir(os.path.join(root, sha256)):
        return os.path.join(root, sha256)
    lock_name = sha256 or hashing.bytes_sha256(url.encode("utf-8"))
    with locks.waited(os.path.join(root, f"{lock_name}.lock")):
        if sha256 and os.path.isdir(os.path.join(root, sha256)):
            return os.path.join(root, sha256)  # another process copied it meanwhile
        rel_paths = list_files(url)
        if not rel_paths:
            raise ValueError(f"{url}: no model files there (an empty or missing directory)")
        tmp = os.path.join(root, f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            for rel in rel_paths:
                dest = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with FileSystems.open(f"{url.rstrip('/')}/{rel}", compression_type="uncompressed") as src, \
                        open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            got = hashing.dir_sha256(tmp)
            if sha256 and got != sha256:
                raise ValueError(f"{url}: its files now hash to {got}, the run started with {sha256} "
                                 f"(the model changed during the run)")
            final = os.path.join(root, got)
            if os.path.isdir(final):
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
            raise
    LOG.info("model %s copied to %s (%d files)", url, final, len(rel_paths))
    return final


def local_spec(spec: str, sha256: str | None = None) -> str:
    """``spec`` itself, or for a model on object storage the local copy's directory."""
    return local_copy(ModelSpec.parse(spec).name, sha256) if is_remote_spec(spec) else spec
