"""`capfilt curate` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Run the CapFilt Beam pipeline over raw shards"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt curate is not implemented yet")
