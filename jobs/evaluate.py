"""`capfilt evaluate` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Evaluate a model on retrieval, captioning or filtering"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt evaluate is not implemented yet")
