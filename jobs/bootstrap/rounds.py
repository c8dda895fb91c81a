"""`capfilt bootstrap` — BLIP's CapFilt bootstrap rounds, with the Table 1 ablations, from a YAML config.

The command, `capfilt bootstrap` (jobs/commands/bootstrap.py), runs a ``Bootstrap``:

    capfilt bootstrap --config jobs/configs/demo.yaml --out runs/demo [--rounds 2]

Round 0 (ablation ``none``, no bootstrap): a synthetic world (or the config's data), a model
pretrained on the web split plus the human split, evaluated on the test split.
Round r >= 1: the previous round's model is finetuned on the human split into a captioner and a
filter (separate models, as in BLIP), `capfilt curate` rewrites the web split with them and the
CLIP ranker (trained once, on the splits in ``clip_data``), and a NEW model is pretrained from
scratch on the curated set plus the human split, then evaluated. Round 1 runs each ablation in the
config (``filter``: --no-synthetic, ``captioner``: --no-filter, ``capfilt``); later rounds run
``capfilt`` only, starting from the previous round's capfilt model.

Every stage calls the ``run`` of the command a user would run, with config objects
(``options.Call``), no command line. A stage that finished records the command line those
configs stand for in ``OUT/stages/<name>.json``; a re-run skips it when the command is
unchanged and its outputs exist, re-runs it (from scratch) when the command changed, and resumes
an interrupted training stage from its last checkpoint. The report is `OUT/report.json` and
`OUT/report.md` (see `jobs/bootstrap/report.py`).

Independent stages run side by side with ``jobs`` > 1 (``--jobs``, the config's ``jobs``): the
ablations of a round (each a chain curate -> pretrain -> evaluate, the bulk of a bootstrap's
time), the two finetunes of a round, and round 0's pretraining with the CLIP ranker's. They run
in that many worker processes, each with ``threads`` torch threads; their results and stage
records are the same as a sequential run's, in the same order (tests/test_bootstrap.py).
Processes rather than threads: each stage sets torch's global thread count, and its Python
code holds the interpreter lock between torch calls. Neither Beam nor torch schedules whole CLI
stages, so this uses the standard library's process pool directly.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from capfilt.jobs import options
from capfilt.jobs.bootstrap.stages import Stages, write_record
from capfilt.jobs.options import Call

log = logging.getLogger(__name__)


def _cli(call) -> None:
    """Run one stage's command (an ``options.Call``) in this process."""
    from capfilt.jobs.cli import error_line, exit_code

    try:
        call.run()
    except Exception as exc:  # noqa: BLE001 - the stage failed: say which command, with its message
        raise RuntimeError(f"`capfilt {' '.join(call)}` exited with code {exit_code(exc)} "
                           f"({error_line(call.command, exc)})") from exc


class Bootstrap:
    """One bootstrap run: the stages of every round and ablation, then the report."""

    def __init__(self, config, out: Path, force: bool = False, threads: int | None = None, jobs: int = 1):
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.config = config
        self.threads = threads
        self.jobs = jobs
        self.out = out
        self.stages = Stages(out, force)
        if config.data is not None:
            self.web, self.human, self.test, self.truth = (
                config.data.web, config.data.human, config.data.test, Path(config.data.truth))
        else:
            world = out / "world"
            self.web, self.human, self.test = (str(world / s / "*.parquet") for s in ("web", "human", "test"))
            self.truth = world / "truth.parquet"
        self.world_deps = ("world",) if config.data is None else ()

    # --- stages --------------------------------------------------------------------------------

    def world(self) -> None:
        from capfilt.jobs.commands.synth import SynthOutput
        from capfilt.transforms.synth.world import SynthConfig, parse_noise_mix

        w, world = self.config.world, self.out / "world"
        mix = {"noise_mix": parse_noise_mix(w.noise_mix)} if w.noise_mix else {}
        cfg = SynthConfig(n=w.n, noise=w.noise, seed=self.config.seed, image_size=w.image_size, human=w.human,
                          test=w.test, rows_per_shard=w.rows_per_shard, **mix)
        call = Call("synth", (SynthOutput(out=world, no_progress=True), cfg))
        self.stages.run("world", call.argv(), [self.truth], lambda resume: _cli(call), out_dir=world)

    def _train(self, name: str, model, data, train, out_dir: Path, outputs: list[Path], deps=()) -> float:
        """A pretrain (`model` a PretrainModel) or finetune (a FinetuneModel) stage on `data`
        (TrainingData), with the budget and ``options`` of section `train`; the options win."""
        from capfilt.jobs.bootstrap.config import stage_classes
        from capfilt.jobs.commands.finetune import FinetuneModel
        from capfilt.jobs.commands.pretrain import Objectives
        from capfilt.model.training.loop import TrainConfig

        command = "finetune" if isinstance(model, FinetuneModel) else "pretrain"
        values, _ = options.check_mapping(train.options, *stage_classes(command))
        loop = options.pick(TrainConfig, values, out_dir=str(out_dir), steps=train.steps,
                            batch_size=train.batch_size, lr=train.lr, seed=self.config.seed)
        call = Call(command, (options.pick(type(model), values, **vars(model)),
                              options.pick(type(data), values, **vars(data)), loop,
                              options.pick(Objectives, values)))
        return self.stages.run(name, call.argv(), outputs,
                               lambda resume: _cli(call.with_(resume=True) if resume else call),
                               out_dir=out_dir, resumable=True, deps=(*self.world_deps, *deps))

    def pretrain(self, name: str, data: str | None, deps=()) -> tuple[Path, float]:
        """A new BLIP model from scratch on `data` plus the human split (the human split alone
        when `data` is None); `deps` names the stage that wrote `data`."""
        from capfilt.jobs.commands.pretrain import PretrainModel, TrainingData

        out_dir = self.out / name / "model"
        sources = (TrainingData(data=data, mix=[f"{self.human}:{self.config.human_weight}"]) if data
                   else TrainingData(data=self.human))
        model_config = None
        if self.config.model_config:
            model_config = self.out / "model_config.json"
            write_record(model_config, self.config.model_config)
        model = PretrainModel(arch="blip", model_config=str(model_config) if model_config else None)
        train = self.config.pretrain
        if name.startswith("round0/") and self.config.round0_pretrain is not None:
            train = self.config.round0_pretrain
        seconds = self._train(f"{name}/pretrain", model, sources, train, out_dir,
                              [out_dir / "captioner" / "config.json", out_dir / "itm" / "config.json"], deps)
        return out_dir, seconds

    def clip(self) -> Path:
        from capfilt.jobs.commands.pretrain import PretrainModel, TrainingData

        splits = {"human": self.human, "web": self.web}
        data = [splits[s] for s in self.config.clip_data]
        sources = TrainingData(data=data[0], mix=[f"{d}:1" for d in data[1:]])
        out_dir = self.out / "clip"
        self._train("clip", PretrainModel(arch="clip"), sources, self.config.clip, out_dir, [out_dir / "clip"])
        return out_dir / "clip"

    def finetune(self, name: str, model_dir: Path) -> dict:
        """The captioner and filter finetuned on the human split from `model_dir`, and the
        filter's quality on the web split (what the next curate will face)."""
        from capfilt.jobs.commands.finetune import FinetuneModel
        from capfilt.jobs.commands.pretrain import TrainingData

        cap_dir, itm_dir = self.out / name / "finetune_caption", self.out / name / "finetune_retrieval"
        human = TrainingData(data=self.human)
        seconds = sum(self._parallel([
            ("_train", (f"{name}/finetune_caption", FinetuneModel(task="caption", init=str(model_dir)), human,
                        self.config.finetune_caption, cap_dir, [cap_dir / "captioner" / "config.json"],
                        (f"{name}/pretrain",))),
            ("_train", (f"{name}/finetune_retrieval", FinetuneModel(task="retrieval", init=str(model_dir)), human,
                        self.config.finetune_retrieval, itm_dir, [itm_dir / "itm" / "config.json"],
                        (f"{name}/pretrain",))),
        ]))
        deps = (f"{name}/finetune_caption", f"{name}/finetune_retrieval")
        result = self.evaluate(f"{name}/finetuned_eval", {"captioner": cap_dir, "filter": itm_dir}, deps=deps)
        return {"captioner": cap_dir / "captioner", "filter": itm_dir / "itm", "seconds": seconds,
                "deps": deps, **result}

    def curate(self, name: str, round_: int, ablation: str, finetuned: dict, clip: Path) -> tuple[Path, float]:
        from capfilt.jobs.bootstrap.config import CURATE_ABLATIONS, cli_options, stage_options
        from capfilt.pipeline.curate.options import CurateConfig

        c, out_dir = self.config.curate, self.out / name / "curated"
        values, beam = stage_options("curate", c)
        models = {}  # set after the stage's options: they decide these
        if ablation != "filter":
            models.update(captioner=str(finetuned["captioner"]), num_captions=c.num_captions, top_p=c.top_p)
        if ablation != "captioner":
            models.update(filter=str(finetuned["filter"]), itm_threshold=c.itm_threshold)
        cfg = options.pick(CurateConfig, {**values, **models}, inputs=(self.web,), out=str(out_dir), clip=str(clip),
                           round=round_, seed=self.config.seed, keep_top=c.keep_top, batch_size=c.batch_size,
                           **CURATE_ABLATIONS[ablation])
        call = Call("curate", (cfg,), tuple(cli_options(beam)))
        # not part of the stage key: the threads change the speed, not the rows
        run = call.with_(torch_threads=self.threads) if self.threads else call
        # curate resumes by itself (it skips finished input shards), so no --resume flag.
        seconds = self.stages.run(f"{name}/curate", call.argv(), [out_dir / "stats.json"],
                                  lambda resume: _cli(run), out_dir=out_dir, resumable=True,
                                  deps=(*self.world_deps, "clip", *finetuned["deps"]))
        return out_dir / "shards", seconds

    def evaluate(self, name: str, models: dict, curated: Path | None = None, filter_applied: bool = False,
                 deps=()) -> dict:
        """Held-out metrics of `models` ({"model": pretrain dir} -> retrieval + caption;
        {"captioner", "filter"} -> caption + filter on web), and of `curated` shards."""
        from capfilt.jobs.bootstrap.config import itm_first_token
        from capfilt.jobs.commands.finetune import CAPTION_PROMPT
        from capfilt.jobs.commands.pretrain import PretrainModel
        from capfilt.model.evaluation import evaluate as ev

        e, path = self.config.evaluate, self.out / name.rsplit("/", 1)[0] / (name.rsplit("/", 1)[1] + ".json")
        key = {k: str(v) for k, v in {**models, "curated": curated, "filter_applied": filter_applied}.items()}
        first = itm_first_token(self.config)
        key["config"] = {"evaluate": vars(e), "threshold": self.config.curate.itm_threshold, "itm_first_token": first}
        if "filter" in models:  # part of the key so that runs from before it was measured re-evaluate
            key["filter_clean"] = ["human", "test"]

        def work(resume):
            result = {}
            if "model" in models:
                result["retrieval"] = ev.evaluate_retrieval(models["model"], self.test, itm_rerank=e.itm_rerank,
                                                            batch_size=e.batch_size, itm_first_token=first)
            cap = models.get("model") or models.get("captioner")
            if cap is not None:  # a pretrained decoder learnt with pretrain's prompt (none by default)
                prompt = (self.config.pretrain.options.get("prompt", PretrainModel.prompt) if "model" in models
                          else self.config.finetune_caption.options.get("prompt", CAPTION_PROMPT))
                result["caption"] = ev.evaluate_captions(cap, self.test, truth=self.truth, batch_size=e.batch_size,
                                                         limit=e.caption_limit, seed=self.config.seed, prompt=prompt)
            if "filter" in models:
                result["filter"] = ev.evaluate_filter(models["filter"], self.web, truth=self.truth,
                                                      threshold=self.config.curate.itm_threshold,
                                                      batch_size=e.batch_size, itm_first_token=first)
                # False alarms on the pairs it was finetuned on and on held-out clean pairs: a
                # gap means it learnt its training pairs (docs/results.md).
                result["filter_clean"] = {
                    split: ev.evaluate_filter_clean(models["filter"], data, batch_size=e.batch_size,
                                                    threshold=self.config.curate.itm_threshold, itm_first_token=first)
                    for split, data in (("human", self.human), ("test", self.test))}
            if curated is not None:
                result["curated"] = ev.evaluate_curated(str(curated), self.truth)
                if filter_applied:
                    result["curated_filter"] = ev.evaluate_filter(None, str(curated), truth=self.truth,
                                                                  threshold=self.config.curate.itm_threshold)
            write_record(path, result)

        seconds = self.stages.run(name, key, [path], work, deps=(*self.world_deps, *deps))
        return {"eval": json.loads(path.read_text()), "eval_seconds": seconds}

    def ablation(self, round_: int, ablation: str, finetuned: dict, clip: Path) -> dict:
        """One ablation's chain: curate the web split, pretrain a new model on it, evaluate."""
        name = f"round{round_}/{ablation}"
        shards, t_curate = self.curate(name, round_, ablation, finetuned, clip)
        kept = json.loads((shards.parent / "stats.json").read_text())["kept"]
        if kept == 0:  # nothing survived curation: the new model sees the human split only
            log.warning("[%s] curation kept no row; pretraining on the human split alone", name)
        model_dir, t_pretrain = self.pretrain(name, str(shards / "*.parquet") if kept else None,
                                              deps=(f"{name}/curate",))
        result = self.evaluate(f"{name}/eval", {"model": model_dir}, curated=shards,
                               filter_applied=ablation in ("filter", "capfilt"),
                               deps=(f"{name}/curate", f"{name}/pretrain"))
        return {"model": model_dir, "eval": result["eval"],
                "seconds": {"curate": t_curate, "pretrain": t_pretrain, "evaluate": result["eval_seconds"]}}

    def _parallel(self, calls: list[tuple[str, tuple]]) -> list:
        """``getattr(self, method)(*args)`` for each ``(method, args)`` of ``calls``: independent
        stages, in ``self.jobs`` worker processes at once (in this process, one after the other,
        when ``jobs`` is 1). Calls whose stages are all done already are answered here, without a
        worker. Results, stage records and stamps come back in the order of ``calls``. A failed
        call does not stop the others: they finish (and record their stages, so a re-run skips
        them) before its error is raised."""
        if min(self.jobs, len(calls)) <= 1:
            return [getattr(self, method)(*args) for method, args in calls]
        outcomes = []
        for method, args in calls:
            self.stages.dry = True  # skip what is done; WouldRun at the first stage that is not
            try:
                outcomes.append(self._here(method, args))
            finally:
                self.stages.dry = False
        # Calls with a stage to run (or an error, which the real run raises and reports again).
        pending = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, Exception)]
        if len(pending) == 1:  # nothing to run beside it: no worker needed
            method, args = calls[pending[0]]
            outcomes[pending[0]] = self._here(method, args)
        elif pending:
            for i, outcome in zip(pending, self._in_workers([calls[i] for i in pending])):
                outcomes[i] = outcome
        for outcome in outcomes:
            if not isinstance(outcome, Exception):
                self.stages.records.extend(outcome[1])
                self.stages.stamps.update(outcome[2])
        failed = [o for o in outcomes if isinstance(o, Exception)]
        if failed:
            raise failed[0]
        return [o[0] for o in outcomes]

    def _here(self, method: str, args: tuple):
        """One call in this process, as ``_in_workers`` returns it: (result, records, new stamps)."""
        records, stamps = len(self.stages.records), set(self.stages.stamps)
        try:
            result = getattr(self, method)(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised by _parallel
            return exc
        finally:
            new = self.stages.records[records:]
            del self.stages.records[records:]  # _parallel puts them back in the order of the calls
        return result, new, {k: v for k, v in self.stages.stamps.items() if k not in stamps}

    def _in_workers(self, calls: list[tuple[str, tuple]]) -> list:
        """Each call's (result, stage records, new stamps) from a worker process, or its exception."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        workers = min(self.jobs, len(calls))
        names = [next((a for a in args if isinstance(a, str)), method) for method, args in calls]
        log.info("%d independent stages in %d processes: %s", len(calls), workers, ", ".join(names))
        state = (self.config, self.out, self.stages.force, self.threads, dict(self.stages.stamps))
        # spawn: a fresh interpreter per worker (fork would copy torch's thread pools and locks).
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
            futures = [pool.submit(_worker, state, method, args) for method, args in calls]
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result())
                except Exception as exc:  # noqa: BLE001 - re-raised by _parallel, after the others finish
                    outcomes.append(exc)
        return outcomes

    # --- rounds --------------------------------------------------------------------------------

    def run(self) -> dict:
        from capfilt.jobs.bootstrap.report import entry, write_report

        cfg, started = self.config, time.perf_counter()
        if cfg.data is None:
            self.world()
        entries, finetuned_log = [], []
        # The CLIP ranker needs only the world: it trains beside round 0's model.
        first = self._parallel([("pretrain", ("round0/none", self.web)),
                                *([("clip", ())] if cfg.rounds >= 1 else [])])
        model_dir, seconds = first[0]
        clip = first[1] if cfg.rounds >= 1 else None
        result = self.evaluate("round0/none/eval", {"model": model_dir}, deps=("round0/none/pretrain",))
        web_fraction = ev_web_correct(self.truth)
        entries.append(entry(0, "none", model_dir, result["eval"], None,
                             {"pretrain": seconds, "evaluate": result["eval_seconds"]}, web_fraction))
        previous = model_dir
        for round_ in range(1, cfg.rounds + 1):
            source = "round0/none" if round_ == 1 else f"round{round_ - 1}/capfilt"
            finetuned = self.finetune(source, previous)
            finetuned_log.append({"used_in_round": round_, "from": source, **finetuned["eval"],
                                  "seconds": finetuned["seconds"] + finetuned["eval_seconds"]})
            ablations = [a for a in cfg.ablations if a != "none"] if round_ == 1 else ["capfilt"]
            chains = self._parallel([("ablation", (round_, a, finetuned, clip)) for a in ablations])
            for ablation, done in zip(ablations, chains):
                entries.append(entry(round_, ablation, done["model"], done["eval"], finetuned["filter"],
                                     done["seconds"], web_fraction))
                if ablation == "capfilt":
                    previous = done["model"]
        report = {"rounds": entries, "finetuned": finetuned_log, "stages": self.stages.records,
                  "total_seconds": time.perf_counter() - started, "config": _config_dict(cfg)}
        write_report(self.out, report)
        return report


def exit_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when the bootstrap process that started it is gone. A
    kill -9 skips the pool's shutdown, and an orphan went on training in the stage directory a
    re-run resumes in (or held its curate lock), then hung when it had nothing to report to."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _worker(state, method: str, args: tuple):
    """``Bootstrap.<method>(*args)`` in a worker process: its result, stage records and new stamps."""
    config, out, force, threads, stamps = state
    logging.basicConfig(level=logging.INFO,  # a spawned interpreter starts without the CLI's logging
                        format=f"%(asctime)s %(levelname)s [pid {os.getpid()}] %(name)s: %(message)s")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    boot = Bootstrap(config, out, force=force, threads=threads)
    boot.stages.stamps.update(stamps)
    result = getattr(boot, method)(*args)
    return result, boot.stages.records, {k: v for k, v in boot.stages.stamps.items() if k not in stamps}


def ev_web_correct(truth: Path) -> float:
    """Share of web rows whose caption is correct by the truth label (before any curation)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(truth, columns=["split", "noise_type"])
    web = table.filter(pc.equal(table["split"], "web"))
    if web.num_rows == 0:
        raise ValueError(f"truth file {truth} has no web rows")
    return pc.sum(pc.equal(web["noise_type"], "correct")).as_py() / web.num_rows


def _config_dict(cfg) -> dict:
    from capfilt.jobs.bootstrap.config import as_dict

    return as_dict(cfg)
