"""`capfilt run-job` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Run a scheduled ingest-curate-release job from YAML"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt run-job is not implemented yet")
