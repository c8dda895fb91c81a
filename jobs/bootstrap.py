"""`capfilt bootstrap` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Run CapFilt bootstrap rounds from a YAML config"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt bootstrap is not implemented yet")
