"""The pretraining / finetuning loop shared by BLIP, BLIP-2 stage 1 and CLIP.

A model plugged in here is an `nn.Module` with ``collate(samples) -> dict`` (tensors),
``forward(batch) -> {"loss": ..., <component>: ...}`` and ``export(out_dir) -> [paths]``. The
loop adds what every run needs and no library bundles in this shape for custom losses:
AdamW (no weight decay on biases / norms / the temperature), transformers' cosine schedule with
warmup, gradient accumulation and clipping, optional bf16 autocast, DDP under `torchrun`
(gloo on CPU, nccl on GPU), JSONL logs and a tqdm bar, and checkpoints every N steps that resume
*exactly*: model (safetensors), optimizer, scheduler, torch RNG and every rank's data position
(`torch.save` of plain state, read back with ``weights_only=True``).

By default a run checkpoints every ``max(20, steps // 10)`` steps (`auto_checkpoint_every`), so
an interrupted run loses at most a tenth of its steps. On the demo-size tiny BLIP a checkpoint
costs ~0.18 of a training step (docs/training.md), so the floor of 20 keeps checkpointing
under 1 % of the training time; writing one reads the RNG state but draws nothing from it,
so the cadence does not change the trained weights.

Layout under ``out_dir`` (RUN = `run_name`, e.g. ``pretrain``):
``checkpoints/RUN/step-XXXXXXXX/{model.safetensors,train_state.pt}``, ``checkpoints/RUN/latest``
(name of the newest complete checkpoint), ``RUN_log.jsonl``, ``RUN_summary.json`` and the
exported model directories.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from capfilt.model.training.data import ImageTextStream, SourceSpec
from capfilt.model.inference.device import use_bf16
from capfilt.transforms.files import atomic, modes
from capfilt.transforms.seeding import sample_seed

log = logging.getLogger(__name__)


def differing_option(saved: dict, now: dict) -> str | None:
    """A message naming the first option (CLI spelling) whose value differs in `saved` and `now`."""
    for name in sorted(set(saved) | set(now)):
        if saved.get(name) != now.get(name):
            return f"--{name.replace('_', '-')} was {saved.get(name)!r}, this run gives {now.get(name)!r}"
    return None


@dataclass
class TrainConfig:
    """Loop options (the fields with a ``help`` are `capfilt pretrain`/`finetune` options).
    `batch_size` is per rank and per micro-batch: the global batch is
    ``batch_size * accum * world_size``."""

    out_dir: str = field(metadata={"help": "output directory (models, checkpoints, logs)", "flag": "--out"})
    run_name: str = "train"  # names the checkpoint folder, log and summary (pretrain, finetune-caption, ...)
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "samples per rank per micro-batch"})
    accum: int = field(default=1, metadata={"help": "gradient accumulation micro-batches"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (matrices only)"})
    warmup: int = field(default=0, metadata={"help": "linear warmup steps before the cosine decay"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final lr as a fraction of --lr"})
    clip_grad: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    # True / "auto": bf16 autocast where the hardware runs it natively
    bf16: bool | str = field(default=False, metadata={
        "help": "bf16 autocast where the hardware runs bf16 natively (else fp32, with a warning)"})
    # None: auto_checkpoint_every(steps); 0: only the final checkpoint
    checkpoint_every: int | None = field(default=None, metadata={
        "help": "checkpoint every N steps (0: only at the end; default max(20, steps // 10))", "metavar": "N"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "JSONL log interval in steps"})
    seed: int = field(default=0, metadata={"help": "data order, caption draws, ITM negatives, dropout"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    # end this run after this global step (time-boxed jobs)
    stop_after: int | None = field(default=None, metadata={"help": "end this run after step N (checkpointed)"})
    shuffle_buffer: int = field(default=1000, metadata={"help": "rows in the shuffle buffer per source"})
    progress: bool = field(default=True, metadata={"help": "no progress bar", "flag": "--no-progress"})
    # The options that built the model and its losses (jobs.pretrain.model_options): a resume
    # from a checkpoint written with other ones is refused.
    model_options: dict | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "accum", "log_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("warmup", "checkpoint_every"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.stop_after is not None and int(self.stop_after) < 1:  # 0 would mean "no limit" if tested for truth
            raise ValueError(f"stop_after must be >= 1 (or None: run every step), got {self.stop_after}")

    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints (0: only the final one)."""
        return auto_checkpoint_every(self.steps) if self.checkpoint_every is None else int(self.checkpoint_every)


# At least 20 steps between automatic checkpoints: a checkpoint of the demo-size tiny BLIP costs
# ~0.18 of a training step (docs/training.md), so this keeps the cost under 1 %.
AUTO_CHECKPOINT_MIN = 20


def auto_checkpoint_every(steps: int) -> int:
    """The default cadence: ten checkpoints a run, no closer than AUTO_CHECKPOINT_MIN steps."""
    return max(AUTO_CHECKPOINT_MIN, int(steps) // 10)


def _describe_source(source: dict | None) -> str:
    if source is None:
        return "no source"
    return f"{source['name']!r} (weight {source['weight']:g}, {len(source['files'])} shard(s))"


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the `torchrun` process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, device


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms and scalars (the temperature) are left alone."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """Runs `cfg.steps` optimizer steps of `model` on `sources`; see the module docstring."""

    def __init__(self, model: torch.nn.Module, sources: list[SourceSpec], cfg: TrainConfig):
        from transformers import get_cosine_with_min_lr_schedule_with_warmup

        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed()
        # bf16 only where it is native: emulated bf16 on an AVX2 CPU is ~100x slower than fp32
        # (docs/benchmarks/models.md); there the run goes on in fp32, with a warning.
        self.bf16 = use_bf16(cfg.bf16, self.device)
        torch.manual_seed(cfg.seed + self.rank)  # dropout differs per rank, as in any DDP run
        self.module = model.to(self.device)
        self.out = Path(cfg.out_dir)
        self.ckpt_root = self.out / "checkpoints" / cfg.run_name
        self.stream = ImageTextStream(sources, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                                      rank=self.rank, world_size=self.world, batch_size=cfg.batch_size)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, cfg.warmup, cfg.steps, min_lr_rate=cfg.min_lr_ratio)
        self.step = 0
        if cfg.resume:
            self._resume()
        self._truncate_log()  # lines past the starting step belong to an interrupted run
        self.model = model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- the loop ----------------------------------------------------------------------------

    def train(self) -> dict:
        """Step until `steps` (or `stop_after`), log, checkpoint, export when finished; returns
        the summary also written to RUN_summary.json."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        end = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
        every = cfg.checkpoint_interval
        global_batch = cfg.batch_size * cfg.accum * self.world
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", desc="train",
                   disable=not (self.is_main and cfg.progress))
        self.module.train()
        last = self._last_logged()  # a resumed run that has nothing left to do keeps its last losses
        t_start, window_t, window_steps = time.perf_counter(), time.perf_counter(), 0
        while self.step < end:
            sums = self._one_step()
            self.step += 1
            window_steps += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == end:
                last = self._reduce(sums)
                now = time.perf_counter()
                last.update(step=self.step, lr=self.scheduler.get_last_lr()[0],
                            samples_per_s=global_batch * window_steps / max(now - window_t, 1e-9),
                            skipped_images=sum(self.stream.stats.skipped.values()))
                window_t, window_steps = now, 0
                bar.set_postfix(loss=f"{last['loss']:.3f}")
                self._log(last)
                if self.is_main and not cfg.progress:  # no bar (a bootstrap stage, a log file): a line
                    log.info("%s: step %d/%d, loss %.4f, %.1f samples/s", cfg.run_name, self.step, cfg.steps,
                             last["loss"], last["samples_per_s"])
            if (every and self.step % every == 0) or self.step == end:
                self.save_checkpoint()
        bar.close()
        summary = {"steps": self.step, "finished": self.step >= cfg.steps, "global_batch": global_batch,
                   "world_size": self.world, "bf16": self.bf16, "seconds_this_run": time.perf_counter() - t_start,
                   "last": last, "data": self.stream.describe(), "model_options": cfg.model_options, "exported": []}
        if summary["finished"] and self.is_main:
            self.module.eval()
            summary["exported"] = [str(p) for p in self.module.export(self.out)]
            for path in summary["exported"]:
                modes.respect_umask(path)  # safetensors writes its files 0600, whatever the umask
        if self.is_main:
            atomic.write_json(self.out / f"{cfg.run_name}_summary.json", summary, indent=2)
        self._barrier()
        return summary

    def _one_step(self) -> dict:
        cfg = self.cfg
        sums: dict[str, torch.Tensor] = {}
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                    else contextlib.nullcontext())
        for micro in range(cfg.accum):
            batch = self.module.collate(self.stream.next_batch())
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            # the ITM draw depends on the step only (not on rank or world size)
            batch["seed"] = sample_seed(cfg.seed, "itm", self.step * cfg.accum + micro)
            batch["step"] = self.step
            sync = (self.model.no_sync() if self.world > 1 and micro < cfg.accum - 1
                    else contextlib.nullcontext())
            with sync:
                with autocast:
                    out = self.model(batch)
                (out["loss"] / cfg.accum).backward()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.accum
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    def _reduce(self, sums: dict) -> dict:
        names = sorted(sums)
        vec = torch.stack([sums[k] for k in names]).to(self.device)
        if self.world > 1:
            dist.all_reduce(vec)
            vec /= self.world
        return {k: float(v) for k, v in zip(names, vec.cpu())}

    def _log_path(self) -> Path:
        return self.out / f"{self.cfg.run_name}_log.jsonl"

    def _last_logged(self) -> dict:
        """The log record of the current step, if the log has one ({} otherwise)."""
        path = self._log_path()
        if self.step == 0 or not path.is_file():
            return {}
        records = [json.loads(ln) for ln in path.read_text().splitlines() if ln]
        return records[-1] if records and records[-1]["step"] == self.step else {}

    def _log(self, record: dict) -> None:
        if self.is_main:
            with open(self.out / f"{self.cfg.run_name}_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _barrier(self):
        if self.world > 1:
            dist.barrier()

    # --- checkpoints -------------------------------------------------------------------------

    def _rank_state(self) -> dict:
        state = {"data": self.stream.state_dict(), "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self) -> Path:
        ranks = [self._rank_state()]
        if self.world > 1:
            ranks = [None] * self.world
            dist.all_gather_object(ranks, self._rank_state())
        path = self.ckpt_root / f"step-{self.step:08d}"
        if self.is_main:
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_model(self.module, str(tmp / "model.safetensors"))
            modes.respect_umask(tmp / "model.safetensors")
            torch.save({"step": self.step, "config": dataclasses.asdict(self.cfg), "ranks": ranks,
                        "data_sources": self._data_sources(),
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       tmp / "train_state.pt")
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            atomic.write_text(self.ckpt_root / "latest", path.name)  # a kill never leaves it empty
            done = self._checkpoint_dirs()
            for old in done[: max(0, len(done) - self.cfg.keep_checkpoints)]:
                shutil.rmtree(old)
        self._barrier()
        return path

    def _data_sources(self) -> list[dict]:
        """What the run trains on, as recorded in a checkpoint: per source its name, weight and
        shard files (absolute), in --data/--mix order."""
        return [{"name": s.name, "weight": float(s.spec.weight), "files": [str(Path(f).resolve()) for f in s.files]}
                for s in self.stream.sources]

    def _check_same_data(self, path: Path, saved: list[dict]) -> None:
        """Refuse to resume on other data: the data positions would point into other shards, and
        a finished run would be re-exported and re-summarised as if nothing changed."""
        now = self._data_sources()
        for i in range(max(len(saved), len(now))):
            a = saved[i] if i < len(saved) else None
            b = now[i] if i < len(now) else None
            if a is not None and b is not None and (a["weight"], a["files"]) == (b["weight"], b["files"]):
                continue  # the same shards, however the glob was spelt
            what = f"{_describe_source(a)} in the checkpoint, {_describe_source(b)} in this run"
            if a and b and _describe_source(a) == _describe_source(b):  # same glob and count, other shards
                diff = next(x for x, y in zip(a["files"], b["files"]) if x != y)
                what += f" (the checkpoint's shard {diff} is not among this run's)"
            raise ValueError(f"{path}: data source {i} differs: {what}; resume with the same --data/--mix "
                             "(or start a new run with --overwrite)")

    def _checkpoint_dirs(self) -> list[Path]:
        """The step-* checkpoint directories, oldest first (a ``.tmp`` one is still being written)."""
        return sorted(p for p in self.ckpt_root.glob("step-*") if not p.name.endswith(".tmp"))

    def _latest_checkpoint(self) -> Path | None:
        """The checkpoint ``latest`` names; if it names none that is whole (a ``latest`` cut
        short by a kill before it was renamed into place), the newest whole step-* directory."""
        latest = self.ckpt_root / "latest"
        name = latest.read_text().strip() if latest.is_file() else ""
        if name and (self.ckpt_root / name / "train_state.pt").is_file():
            return self.ckpt_root / name
        whole = [p for p in self._checkpoint_dirs() if (p / "train_state.pt").is_file()]
        if whole and latest.is_file():
            log.warning("%s names no whole checkpoint (%r): resuming from %s", latest, name, whole[-1].name)
        return whole[-1] if whole else None

    def _resume(self) -> None:
        path = self._latest_checkpoint()
        if path is None:
            log.info("no checkpoint in %s: starting from step 0", self.ckpt_root)
            return
        state = torch.load(path / "train_state.pt", map_location="cpu", weights_only=True)
        saved = state["config"]
        for key in ("batch_size", "accum", "seed"):
            if saved[key] != getattr(self.cfg, key):
                raise ValueError(f"{path}: checkpoint has {key}={saved[key]}, this run {getattr(self.cfg, key)}; "
                                 "resume with the same value")
        if saved.get("model_options") is not None and self.cfg.model_options is not None:
            problem = differing_option(saved["model_options"], self.cfg.model_options)
            if problem:
                raise ValueError(f"{path}: the checkpoint's run was built with other options ({problem}); "
                                 "resume with the same options (or start a new run with --overwrite)")
        if len(state["ranks"]) != self.world:
            raise ValueError(f"{path}: checkpoint was written by {len(state['ranks'])} rank(s), this run "
                             f"has {self.world}; resume with the same world size")
        self._check_same_data(path, state["data_sources"])
        missing, unexpected = load_model(self.module, str(path / "model.safetensors"), strict=False,
                                         device=str(self.device))
        if missing or unexpected:
            raise ValueError(f"{path}: model does not match the checkpoint: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        mine = state["ranks"][self.rank]
        self.stream.load_state_dict(mine["data"])
        torch.set_rng_state(mine["torch_rng"])
        if "cuda_rng" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda_rng"], self.device)
        self.step = int(state["step"])
        log.info("resumed from %s (step %d)", path, self.step)

    def _truncate_log(self) -> None:
        """Drop log lines past the starting step (all of them from step 0): an interrupted run
        logged them after its last checkpoint, and this run logs those steps again."""
        path = self._log_path()
        if self.is_main and path.is_file():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))
