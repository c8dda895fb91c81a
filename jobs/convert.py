"""`capfilt convert` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Convert an original BLIP checkpoint to the transformers layout"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt convert is not implemented yet")
