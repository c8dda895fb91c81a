"""`capfilt models` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Build tiny random-initialised model directories"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt models is not implemented yet")
