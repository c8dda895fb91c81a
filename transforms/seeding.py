"""Per-sample random streams.

A caption's randomness must depend only on (run seed, sample key, caption index), never on
batch size, batch order or worker count (docs/architecture.md, "Contracts"). Every stage that
draws random numbers for a sample derives its seed here, so the rule lives in one place.
"""
from __future__ import annotations

import hashlib

_MASK_63 = (1 << 63) - 1


def sample_seed(run_seed: int, key: str, index: int = 0) -> int:
    """A 63-bit seed from (run seed, key, index), stable across processes and platforms.

    Python's ``hash`` is salted per process, so a keyed blake2b digest is used instead.
    """
    if not isinstance(key, str):
        raise ValueError(f"sample key must be a string, got {type(key).__name__}: {key!r}")
    digest = hashlib.blake2b(
        f"{int(run_seed)}\x1f{key}\x1f{int(index)}".encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") & _MASK_63
