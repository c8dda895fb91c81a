"""`capfilt ingest` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Download a URL list into raw shards with img2dataset"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt ingest is not implemented yet")
