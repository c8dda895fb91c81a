"""Curate's models and --device, checked before anything is written.

A failed ``--overwrite`` would otherwise delete the old output for nothing, and a typo in a
hub id would surface only in a Beam worker's traceback. Hub ids are resolved (their config
through ``AutoConfig``, which fails at once offline) and open_clip specs looked up; the
weights themselves are read by the workers. --device is checked only for a local runner: on
any other the workers run on other machines, which decide (a CPU-only launcher can start a
GPU run).
"""
from __future__ import annotations

import os


def check_models(cfg, local_runner: bool = True) -> dict[str, str]:
    """--device (with a `local_runner` only) and every model must be usable before --out is
    touched (a failed ``--overwrite`` would otherwise have deleted the old output for
    nothing): ValueError naming the option. Hub ids are resolved too (their config through
    ``AutoConfig``, which fails at once offline); the weights themselves are read by the workers.
    A model on object storage is copied to the local cache and its copy checked
    (``capfilt.pipeline.models``). Returns {spec: sha256} of those models (the hash every
    worker's copy must have)."""
    from capfilt.model.inference.device import resolve_device
    from capfilt.model.loading import load_hf_config
    from capfilt.model.specs import ModelSpec, check_model_dir
    from capfilt.pipeline.models import is_remote_spec, local_copy

    hashes: dict[str, str] = {}

    def copied(spec):  # a model on object storage: its local copy, whose hash the workers check
        if not is_remote_spec(spec):
            return spec
        path = local_copy(ModelSpec.parse(spec).name)
        hashes[spec] = os.path.basename(path)
        return path

    def check_blip(spec) -> None:  # a local directory's files, then its config (a hub id's too)
        spec = copied(spec)
        parsed = ModelSpec.parse(spec)
        if parsed.local:
            check_model_dir(parsed.path)
        load_hf_config(spec)

    if local_runner:
        _named("--device", cfg.device, resolve_device)
    if cfg.use_captioner:
        _named("--captioner", cfg.captioner, check_blip)
    if cfg.use_filter:
        _named("--filter", cfg.filter, check_blip)
    _named("--clip", cfg.clip, lambda spec: _check_clip(copied(spec)))
    return hashes


def _named(flag: str, spec, check) -> None:
    try:
        check(spec)
    except ValueError as err:
        message = " ".join(str(err).split())  # the hub's messages span lines
        raise ValueError(f"{flag} {spec}: {message}") from err


def _check_clip(spec: str) -> None:
    """A ranker spec open_clip can load: a model directory, or a known architecture with a
    weights file or a known pretrained tag (offline: already in the cache)."""
    import open_clip
    from huggingface_hub import constants, hf_hub_download

    from capfilt.model.specs import CLIP_CONFIG, OPEN_CLIP_HUB, parse_clip

    parsed = parse_clip(spec)  # a local directory is checked here
    if parsed.local:
        return
    name, pretrained = parsed.name, parsed.weights
    try:
        if parsed.kind == OPEN_CLIP_HUB:
            if constants.HF_HUB_OFFLINE:
                hf_hub_download(name, CLIP_CONFIG)
            return
        if name not in open_clip.list_models():
            raise ValueError(f"open_clip has no architecture {name!r}")
        if os.path.isfile(os.path.expanduser(pretrained)):
            return
        cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if not cfg:
            raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {name} (known: "
                             f"{', '.join(open_clip.list_pretrained_tags_by_model(name))}) and it is not a file")
        if constants.HF_HUB_OFFLINE:  # only a cache lookup then; online, the workers download
            open_clip.download_pretrained(cfg)
    except (OSError, RuntimeError) as err:  # the hub's and urllib's error types
        raise ValueError(f"cannot find its files ({err})") from err
