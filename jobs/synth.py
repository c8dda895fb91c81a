"""`capfilt synth` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Generate the synthetic noisy-web world"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt synth is not implemented yet")
