"""`capfilt report` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Write an HTML report for a curate or release directory"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt report is not implemented yet")
