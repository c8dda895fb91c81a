"""`capfilt demo` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Run a full bootstrap round on the embedded defaults"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt demo is not implemented yet")
