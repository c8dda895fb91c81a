"""`capfilt finetune` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Finetune a captioner or filter on a clean split"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt finetune is not implemented yet")
