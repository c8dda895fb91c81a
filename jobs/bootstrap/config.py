"""The YAML config of `capfilt bootstrap`: world or data, model sizes, steps, thresholds, seeds.

A config is a plain YAML mapping (see `jobs/configs/demo.yaml` for every key, commented). It is
read into dataclasses so that a typo is an error naming the key, not a silently ignored
option. Stage options the sections do not name (a learning-rate warmup, a Beam runner flag)
go in an ``options`` mapping: keys are the stage command's options (the fields of its config
classes, :func:`stage_classes`), checked against those classes when the config is read; curate's
other keys are Beam options, passed as ``--key value``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from capfilt.jobs import options
from capfilt.pipeline.curate.options import CurateConfig

ABLATIONS = ("none", "filter", "captioner", "capfilt")
# BLIP Table 1 rows as CurateConfig switches: filter only keeps web captions that pass ITM;
# captioner only adds synthetic captions and ranks everything by CLIP without the ITM filter.
CURATE_ABLATIONS = {"filter": {"no_synthetic": True}, "captioner": {"no_filter": True}, "capfilt": {}}


@dataclass
class WorldConfig:
    """`capfilt synth` options (sizes in images)."""

    n: int = 2000
    human: int | None = None
    test: int | None = None
    noise: float = 0.45
    image_size: int = 64
    noise_mix: str | None = None
    rows_per_shard: int = 1000


@dataclass
class DataConfig:
    """Existing data instead of a synthetic world: shard globs and the truth file."""

    web: str
    human: str
    test: str
    truth: str


@dataclass
class TrainingStage:
    """A pretrain or finetune stage: its budget, and further options of the command."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    options: dict = field(default_factory=dict)


@dataclass
class CurateStage:
    """The curate stage (BLIP's CapFilt settings by default, BLIP-2's 10 captions; the
    options it does not set are CurateConfig's defaults)."""

    num_captions: int = CurateConfig.num_captions
    top_p: float = CurateConfig.top_p
    itm_threshold: float = CurateConfig.itm_threshold
    keep_top: int = CurateConfig.keep_top
    batch_size: int = 16
    options: dict = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Held-out evaluation: ITM re-ranking of the ITC top-k (0 = off) and how many test
    images to caption (None = all)."""

    itm_rerank: int = 0
    caption_limit: int | None = None
    batch_size: int = 32


@dataclass
class BootstrapConfig:
    seed: int = 0
    rounds: int = 1
    threads: int | None = None  # torch threads in training/evaluation; None = torch's default
    jobs: int = 1  # independent stages run in this many processes at once (jobs.bootstrap)
    # JSON deep-merged into the tiny BLIP config of every pretrained model (`pretrain
    # --model-config`), e.g. {"vision_config": {"num_hidden_layers": 4}}; None = model/configs.
    model_config: dict | None = None
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    world: WorldConfig | None = field(default_factory=WorldConfig)
    data: DataConfig | None = None
    human_weight: float = 1.0  # mixture weight of the human split against web/curated (weight 1)
    pretrain: TrainingStage = field(default_factory=lambda: TrainingStage(steps=600, lr=3e-4))
    # Round 0's pretraining when it should differ from `pretrain` (None: the same). The demo keeps
    # them equal, so rounds compare at equal budgets; the CI config trains round 0 longer, since
    # its finetuned filter decides the curated data, and the later models only briefly.
    round0_pretrain: TrainingStage | None = None
    finetune_caption: TrainingStage = field(default_factory=lambda: TrainingStage(steps=150, lr=1e-4))
    finetune_retrieval: TrainingStage = field(default_factory=lambda: TrainingStage(steps=150, lr=1e-4))
    clip: TrainingStage = field(default_factory=lambda: TrainingStage(steps=300, lr=5e-4))
    clip_data: list[str] = field(default_factory=lambda: ["human"])  # splits the ranker trains on
    curate: CurateStage = field(default_factory=CurateStage)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"jobs must be an integer >= 1, got {self.jobs!r}")
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise ValueError(f"unknown ablation {bad[0]!r}; expected some of {ABLATIONS}")
        if self.rounds > 1 and "capfilt" not in self.ablations:
            raise ValueError("round 2 continues from the capfilt model: keep 'capfilt' in ablations")
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise ValueError(f"model_config must be a mapping, got {type(self.model_config).__name__}")
        if (self.world is None) == (self.data is None):
            raise ValueError("give exactly one of 'world' (a synthetic world) and 'data' (existing shards)")
        if not 0.0 <= self.curate.itm_threshold <= 1.0:
            raise ValueError(f"curate.itm_threshold must be in [0, 1], got {self.curate.itm_threshold}")
        if self.human_weight <= 0:
            raise ValueError(f"human_weight must be > 0, got {self.human_weight}")
        bad_splits = [s for s in self.clip_data if s not in ("human", "web")]
        if bad_splits or not self.clip_data:
            raise ValueError(f"clip_data takes 'human' and/or 'web', got {self.clip_data}")
        for name in ("pretrain", "round0_pretrain", "finetune_caption", "finetune_retrieval", "clip"):
            train = getattr(self, name)
            if train is None:
                continue
            if train.steps < 1 or train.batch_size < 1:
                raise ValueError(f"{name}: steps and batch_size must be >= 1, got {train.steps}, {train.batch_size}")


def _build(cls, value, where: str):
    """A dataclass from a mapping; unknown keys are an error naming them."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}{options.did_you_mean(unknown, names)}; "
                         f"known: {sorted(names)}")
    kwargs = {}
    for key, item in value.items():
        nested = _NESTED.get((cls, key))
        kwargs[key] = _build(nested, item, f"{where}.{key}") if nested else item
    return cls(**kwargs)


_NESTED = {
    (BootstrapConfig, "world"): WorldConfig,
    (BootstrapConfig, "data"): DataConfig,
    (BootstrapConfig, "pretrain"): TrainingStage,
    (BootstrapConfig, "round0_pretrain"): TrainingStage,
    (BootstrapConfig, "finetune_caption"): TrainingStage,
    (BootstrapConfig, "finetune_retrieval"): TrainingStage,
    (BootstrapConfig, "clip"): TrainingStage,
    (BootstrapConfig, "curate"): CurateStage,
    (BootstrapConfig, "evaluate"): EvalConfig,
}


def load_bootstrap_config(path) -> BootstrapConfig:
    """Read and validate a YAML config; relative data paths are taken from the config's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read bootstrap config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"bootstrap config {path} must be a YAML mapping")
    if "data" in raw and "world" not in raw:
        raw["world"] = None  # existing data replaces the default synthetic world
    try:
        config = _build(BootstrapConfig, raw, str(path))
        if config.data is not None:
            for name in ("web", "human", "test", "truth"):
                value = getattr(config.data, name)
                if not Path(value).is_absolute():
                    setattr(config.data, name, str(path.parent / value))
        _check_types(config)
        config.validate()
        _check_stage_options(config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bootstrap config {path}: {exc}") from exc
    return config


# Annotation (as written above, a string under `from __future__ import annotations`) -> the
# Python types YAML may give for it. bool is an int subclass, so it is refused explicitly.
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "dict": (dict,), "list[str]": (list,)}


def _check_types(config, where: str = "") -> None:
    """Raise naming a scalar field whose YAML value has the wrong type (``steps: ten``), which
    would otherwise fail deep inside a stage, or not at all."""
    for f in dataclasses.fields(config):
        value, name = getattr(config, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_types(value, name + ".")
            continue
        annotation = str(f.type).replace(" | None", "")
        if value is None or annotation not in _TYPES:
            continue
        if isinstance(value, bool) or not isinstance(value, _TYPES[annotation]):
            raise ValueError(f"{name} must be {annotation}, got {value!r}")


def stage_classes(command: str) -> tuple:
    """The config classes whose fields a stage's ``options`` may set."""
    from capfilt.jobs.commands.pretrain import Objectives, PretrainModel, TrainingData
    from capfilt.model.training.loop import TrainConfig

    if command == "curate":
        from capfilt.pipeline.curate.options import CurateConfig

        return (CurateConfig,)
    if command == "finetune":
        from capfilt.jobs.commands.finetune import FinetuneModel

        return (TrainConfig, Objectives, FinetuneModel, TrainingData)
    return (TrainConfig, Objectives, PretrainModel, TrainingData)


STAGE_COMMANDS = {"pretrain": "pretrain", "round0_pretrain": "pretrain", "finetune_caption": "finetune",
                  "finetune_retrieval": "finetune", "clip": "pretrain", "curate": "curate"}


def stage_options(name: str, section) -> tuple[dict, dict]:
    """(the values of section `name`'s ``options`` by field name, the rest: curate's Beam
    options), checked the way the stage's command checks them."""
    command = STAGE_COMMANDS[name]
    try:
        values, unknown = options.check_mapping(section.options, *stage_classes(command))
    except ValueError as exc:  # a bad value, in argparse's words
        raise ValueError(f"{name}.options: {exc}") from None
    if unknown and command == "curate":  # the rest must be Beam pipeline options
        from capfilt.pipeline.curate.options import make_pipeline_options

        try:
            make_pipeline_options(cli_options(unknown))
        except ValueError as exc:
            raise ValueError(f"{name}.options: {exc}") from None
    elif unknown:
        raise ValueError(f"{name}.options: unknown option(s) {options.flags(unknown)} for `capfilt {command}`"
                         f"{options.did_you_mean(unknown, options.by_name(*stage_classes(command)))}")
    return values, unknown


def _check_stage_options(config: BootstrapConfig) -> None:
    """Check each stage's ``options`` now, so that a misspelt option fails before the first
    stage runs instead of after an hour of them."""
    if config.model_config is not None:  # a misspelt key would build the default model silently
        from capfilt.model.builders.tiny import load_config as tiny_config

        tiny_config("itm", config.model_config)
    for name in STAGE_COMMANDS:
        section = getattr(config, name)
        if section is not None and section.options:
            stage_options(name, section)
    first = {name: getattr(config, name).options.get("itm_first_token", "enc")
             for name in ("pretrain", "round0_pretrain", "finetune_retrieval", "curate") if getattr(config, name)}
    if len(set(first.values())) > 1:  # the filter would curate with a token it was not trained with
        raise ValueError(f"itm_first_token must be the same in every ITM stage, got {first}")


def itm_first_token(config: BootstrapConfig) -> str:
    """The ITM text's first token of every ITM stage (``_check_stage_options`` made them agree)."""
    return config.curate.options.get("itm_first_token", "enc")


def as_dict(config: BootstrapConfig) -> dict:
    return dataclasses.asdict(config)


def cli_options(options: dict) -> list[str]:
    """``{"warmup": 20, "momentum": True}`` -> ``["--warmup", "20", "--momentum"]`` (curate's
    Beam options, which are another tool's syntax)."""
    argv = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        else:
            argv.extend([flag, str(value)])
    return argv
