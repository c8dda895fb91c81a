"""`capfilt pretrain` — placeholder until its issue lands."""
from __future__ import annotations

HELP = "Pretrain BLIP, BLIP-2 stage 1 or CLIP on shards"


def add_arguments(parser):
    pass


def run(args) -> int:
    raise NotImplementedError("capfilt pretrain is not implemented yet")
