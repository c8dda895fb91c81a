"""`capfilt release` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Build a dataset release: dedup, decontaminate, manifest, report"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt release is not implemented yet")
