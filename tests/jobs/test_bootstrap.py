"""`capfilt bootstrap`: config parsing, stage skipping/resuming, and the ci_small config end to end."""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from capfilt.jobs import cli
from capfilt.jobs.bootstrap.stages import Stages
from capfilt.jobs.bootstrap.config import ABLATIONS, cli_options, load_bootstrap_config as load_config
from capfilt.jobs.bootstrap.report import targets


def _config_path(name: str) -> Path:
    return Path(str(resources.files("capfilt.jobs").joinpath("configs", name)))


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ci_small.yaml", "demo.yaml"])
def test_packaged_configs_load(name):
    config = load_config(_config_path(name))
    assert config.world is not None and config.data is None
    assert set(config.ablations) <= set(ABLATIONS)


@pytest.mark.parametrize(
    "text, match",
    [
        ("pretrain: {stepz: 3}", r"unknown key\(s\) \['stepz'\] in .*pretrain"),
        ("ablations: [none, magic]", "unknown ablation 'magic'"),
        ("curate: {itm_threshold: 1.5}", "itm_threshold must be in"),
        ("data: {web: w, human: h, test: t, truth: x}\nworld: {n: 10}", "exactly one of 'world'"),
        ("rounds: 2\nablations: [none, filter]", "keep 'capfilt'"),
        ("- just a list", "must be a YAML mapping"),
        ("clip: {steps: 0}", "clip: steps and batch_size must be >= 1"),
        ("jobs: 0", "jobs must be an integer >= 1, got 0"),
        # checked when the config is read, not when the stage finally runs
        ("pretrain: {steps: ten}", "pretrain.steps must be int, got 'ten'"),
        ("curate: {keep_top: true}", "curate.keep_top must be int, got True"),
        ("world: {noise: high}", "world.noise must be float, got 'high'"),
        ("curate: {options: {max_lenght: 12}}", r"curate.options: .*--max-lenght"),
        ("finetune_retrieval: {options: {warmpu: 10}}", r"finetune_retrieval.options: unknown option\(s\) \['--warmpu'"),
        ("pretrain: {options: {itm_negatives: sometimes}}", "pretrain.options: .*invalid choice: 'sometimes'"),
        ("model_config: {vision_confg: {patch_size: 16}}", "unknown model config key 'vision_confg'"),
        # the filter must curate with the first token its ITM was trained with
        ("curate: {options: {itm_first_token: cls}}",
         r"itm_first_token must be the same in every ITM stage, got \{'pretrain': 'enc', "
         r"'finetune_retrieval': 'enc', 'curate': 'cls'\}"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path)


def test_data_paths_are_relative_to_the_config(tmp_path):
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"data": {"web": "w/*.parquet", "human": "/abs/h", "test": "t", "truth": "truth.parquet"}}))
    config = load_config(path)
    assert config.world is None
    assert config.data.web == str(path.parent / "w/*.parquet") and config.data.human == "/abs/h"


def test_cli_options():
    assert cli_options({"warmup": 20, "momentum": True, "bf16": False, "max_length": 12}) == [
        "--warmup", "20", "--momentum", "--max-length", "12"]


# --- stages ------------------------------------------------------------------------------------

def test_stages_skip_redo_and_resume(tmp_path):
    calls = []

    def work(name):
        def _work(resume):
            calls.append((name, resume))
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "out").write_text("x")
        return _work

    def run_all(key_a="a1"):
        stages = Stages(tmp_path)
        stages.run("a", key_a, [tmp_path / "a" / "out"], work("a"), out_dir=tmp_path / "a")
        stages.run("b", "b1", [tmp_path / "b" / "out"], work("b"), out_dir=tmp_path / "b", resumable=True, deps=("a",))
        return stages

    run_all()
    assert calls == [("a", False), ("b", False)]
    stages = run_all()  # nothing changed: both skipped
    assert calls == [("a", False), ("b", False)]
    assert [r["skipped"] for r in stages.records] == [True, True]
    run_all(key_a="a2")  # a's command changed: a re-runs, and b because its input changed
    assert calls[2:] == [("a", False), ("b", False)]
    # b interrupted (output dir left, no marker): it resumes instead of starting over
    (tmp_path / "stages" / "b.json").unlink()
    (tmp_path / "b" / "partial").write_text("checkpoint")
    run_all(key_a="a2")
    assert calls[4:] == [("b", True)] and (tmp_path / "b" / "partial").exists()
    # a marker cut short (written before markers were renamed into place): b is not done and resumes
    (tmp_path / "stages" / "b.json").write_text("")
    run_all(key_a="a2")
    assert calls[5:] == [("b", True)] and json.loads((tmp_path / "stages" / "b.json").read_text())["key"]
    assert not list((tmp_path / "stages").glob("*.tmp"))
    with pytest.raises(RuntimeError, match="depends on"):
        Stages(tmp_path).run("c", "c", [], work("c"), deps=("zzz",))
    with pytest.raises(RuntimeError, match="without writing"):
        Stages(tmp_path).run("d", "d", [tmp_path / "never"], lambda resume: None)


def test_targets_check_the_ordering():
    def e(round_, ablation, r1, selected=0.5):
        return {"round": round_, "ablation": ablation, "retrieval": {"i2t_r1": r1, "t2i_r1": r1},
                "selected_correct_fraction": selected, "web_correct_fraction": 0.55}

    good = [e(0, "none", 0.1), e(1, "filter", 0.2), e(1, "captioner", 0.25), e(1, "capfilt", 0.3, 0.98)]
    t = targets(good, [])
    assert t["ablation_ordering"]["met"] and t["round1_r1_gain"]["met"]
    assert t["selected_correct_after_one_round"]["met"] and not t["second_round_measured"]["met"]
    bad = targets([e(0, "none", 0.1), e(1, "filter", 0.4), e(1, "captioner", 0.2), e(1, "capfilt", 0.15)], [])
    assert not bad["ablation_ordering"]["met"] and not bad["round1_r1_gain"]["met"]


# --- end to end --------------------------------------------------------------------------------

def _in_range(value) -> bool:
    return value is None or 0.0 <= value <= 1.0


def test_ci_small_bootstrap_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(["bootstrap", "--config", str(_config_path("ci_small.yaml")), "--out", str(out),
                     "--threads", "1"]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = {(e["round"], e["ablation"]): e for e in report["rounds"]}
    assert sorted(rows) == [(0, "none"), (1, "capfilt"), (1, "captioner"), (1, "filter")]

    truth = pq.read_table(out / "world" / "truth.parquet").to_pylist()
    web = [t for t in truth if t["split"] == "web"]
    web_correct = sum(t["noise_type"] == "correct" for t in web) / len(web)
    for entry in report["rounds"]:
        assert entry["web_correct_fraction"] == pytest.approx(web_correct)
        assert _in_range(entry["selected_correct_fraction"]) and _in_range(entry["noise_removed"])
        assert set(entry["filter"]) >= {"precision", "recall", "f1"}
        assert all(_in_range(entry["filter"][k]) for k in ("precision", "recall", "f1"))
        assert set(entry["retrieval"]) >= {"i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"}
        assert all(_in_range(v) for k, v in entry["retrieval"].items() if k != "itm_rerank")
        assert entry["retrieval"]["i2t_r1"] <= entry["retrieval"]["i2t_r5"]
        assert entry["caption"]["cider"] >= 0 and _in_range(entry["caption"]["attribute_accuracy"])
        assert all(s >= 0 for s in entry["seconds"].values())
    # Round 0 trains on every web caption; filter-only applies the filter, captioner-only does not.
    assert rows[(0, "none")]["selected_correct_fraction"] == pytest.approx(web_correct)
    assert rows[(1, "filter")]["filter"]["applied"] and not rows[(1, "captioner")]["filter"]["applied"]
    # The filter cleans the web captions, against the truth: what filter-only keeps is cleaner
    # than the web split, and so are the web captions capfilt keeps (its synthetic captions come
    # from a captioner trained for a few steps, so they are not checked here).
    assert rows[(1, "filter")]["selected_correct_fraction"] > web_correct
    capfilt = rows[(1, "capfilt")]
    assert capfilt["correct_by_source"]["web"] > web_correct
    assert capfilt["noise_removed"] > 0 and capfilt["filter"]["recall"] > 0
    # Each round-1 model is a new model trained on its own curated shards.
    assert len({e["model"] for e in report["rounds"]}) == 4
    md = (out / "report.md").read_text()
    for round_, ablation in rows:
        assert f"| {round_} | {ablation} |" in md
    assert "## Time per stage" in md and "round1/capfilt/curate" in md
    # The finetuned filter's flags on one-wrong-attribute captions, split by the wrong attribute:
    # this world has none (noise_mix other=1), so the split is empty and the table says so.
    assert report["finetuned"][0]["filter"]["per_wrong_attribute"] == {}
    assert "flagged: wrong colour / shape / position" in md and "| – / – / – |" in md
    # ... and its false alarms on clean pairs: the 64 human pairs it was finetuned on, the 32 test pairs.
    clean = report["finetuned"][0]["filter_clean"]
    assert (clean["human"]["n"], clean["test"]["n"]) == (64, 32)
    for split in ("human", "test"):
        assert clean[split]["flagged"] == round(clean[split]["flagged_fraction"] * clean[split]["n"])
    shown = " / ".join(f"{100 * clean[s]['flagged_fraction']:.1f}" for s in ("human", "test"))
    assert "flagged clean pairs: human (trained on) / test" in md and f"| {shown} |" in md

    # A re-run finds every stage done and skips it.
    assert cli.main(["bootstrap", "--config", str(_config_path("ci_small.yaml")), "--out", str(out)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert all(s["skipped"] for s in again["stages"])
    assert again["rounds"] == report["rounds"]

    # The same bootstrap with independent stages in 2 processes (--jobs 2): round 0's model beside
    # the CLIP ranker, the two finetunes, the three ablations. Same results, same stage order.
    par = tmp_path / "parallel"
    argv = ["bootstrap", "--config", str(_config_path("ci_small.yaml")), "--out", str(par),
            "--threads", "1", "--jobs", "2"]
    assert cli.main(argv) == 0
    parallel = json.loads((par / "report.json").read_text())
    assert [s["stage"] for s in parallel["stages"]] == [s["stage"] for s in report["stages"]]

    def comparable(entries, root):
        return [json.loads(json.dumps({k: v for k, v in e.items() if k != "seconds"}).replace(str(root), "OUT"))
                for e in entries]

    assert comparable(parallel["rounds"], par) == comparable(report["rounds"], out)
    assert "independent stages ran 2 at a time" in (par / "report.md").read_text()
    assert "at a time" not in md

    # Round 1 again, with the finetuned captioner's weights missing: the captioner and capfilt
    # chains fail, the filter chain finishes and records its stages anyway, and the error
    # reaches the caller. Fixed and re-run, only the failed chains run.
    shutil.rmtree(par / "round1")
    for marker in (par / "stages").glob("round1__*.json"):
        marker.unlink()
    weights = par / "round0" / "none" / "finetune_caption" / "captioner" / "model.safetensors"
    weights.rename(weights.with_suffix(".moved"))
    with pytest.raises(RuntimeError, match=r"`capfilt curate .*round1/captioner.* exited with code"):
        cli.main(argv)
    markers = {m.stem for m in (par / "stages").glob("round1__*.json")}
    assert markers == {"round1__filter__curate", "round1__filter__pretrain", "round1__filter__eval"}
    weights.with_suffix(".moved").rename(weights)
    assert cli.main(argv) == 0
    again = json.loads((par / "report.json").read_text())
    ran = [s["stage"] for s in again["stages"] if not s["skipped"]]
    assert ran == [f"round1/{a}/{s}" for a in ("captioner", "capfilt") for s in ("curate", "pretrain", "eval")]
    assert comparable(again["rounds"], par) == comparable(report["rounds"], out)

    # A finished run re-run with --jobs 2 starts no worker process: every stage is found done here.
    import capfilt.jobs.bootstrap.rounds as bootstrap
    def no_workers(self, calls):
        raise AssertionError(f"workers started for {calls}")

    monkeypatch.setattr(bootstrap.Bootstrap, "_in_workers", no_workers)
    assert cli.main(argv) == 0
    done = json.loads((par / "report.json").read_text())
    assert all(s["skipped"] for s in done["stages"]) and done["rounds"] == again["rounds"]


# --- orchestration, with every stage faked ---------------------------------------------------


class FakeStages:
    """Stands in for the `capfilt` commands: records each argv and writes what it would."""

    def __init__(self, kept=5):
        self.calls: list[list[str]] = []
        self.kept = kept

    def __call__(self, argv):
        argv = [str(a) for a in argv]
        self.calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        command = argv[0]
        if command == "synth":
            out.mkdir(parents=True)
            pq.write_table(pa.table({"key": ["w0", "w1", "t0"], "split": ["web", "web", "test"],
                                     "noise_type": ["correct", "junk", "correct"]}), out / "truth.parquet")
        elif command == "pretrain" and "clip" in argv:
            (out / "clip").mkdir(parents=True)
        elif command in ("pretrain", "finetune"):
            for sub in ("captioner", "itm"):
                (out / sub).mkdir(parents=True, exist_ok=True)
                (out / sub / "config.json").write_text("{}")
        elif command == "curate":
            (out / "shards").mkdir(parents=True)
            (out / "stats.json").write_text(json.dumps({"kept": self.kept}))

    def of(self, command, *words):
        return [c for c in self.calls if c[0] == command and all(w in " ".join(c) for w in words)]


def _fake_evaluation(monkeypatch):
    from capfilt.model.evaluation import evaluate as ev

    recall = {k: 0.1 for k in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10")}
    prf = {"precision": 0.9, "recall": 0.8, "f1": 0.85, "threshold": 0.5,
           "per_type": {"correct": {"flagged_fraction": 0.1}}, "at_recall_0.9": {"precision": 0.7}}
    monkeypatch.setattr(ev, "evaluate_retrieval", lambda *a, **k: dict(recall))
    monkeypatch.setattr(ev, "evaluate_captions", lambda *a, **k: {"bleu4": 0.1, "cider": 0.2,
                                                                  "attribute_accuracy": 0.3, "exact": 0.1})
    monkeypatch.setattr(ev, "evaluate_filter", lambda *a, **k: dict(prf))
    monkeypatch.setattr(ev, "evaluate_filter_clean", lambda *a, **k: {"n": 10, "flagged": 1,
                                                                      "flagged_fraction": 0.1})
    monkeypatch.setattr(ev, "evaluate_curated", lambda *a, **k: {
        "rows": 2, "kept_rows": 1, "web_correct_fraction": 0.5, "selected_correct_fraction": 1.0,
        "web_selected_fraction": 0.5, "noise_removed": 1.0, "correct_by_source": {"web": 1.0}})


def _bootstrap(tmp_path, fake, monkeypatch, **overrides):
    import capfilt.jobs.bootstrap.rounds as bootstrap
    monkeypatch.setattr(bootstrap, "_cli", fake)
    config = yaml.safe_load(_config_path("ci_small.yaml").read_text())
    config.update(overrides)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["bootstrap", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    return json.loads((tmp_path / "run" / "report.json").read_text())


def test_rounds_and_ablations_call_the_stages_in_order(tmp_path, monkeypatch):
    _fake_evaluation(monkeypatch)
    fake = FakeStages()
    report = _bootstrap(tmp_path, fake, monkeypatch, rounds=2)
    run = tmp_path / "run"
    assert [(e["round"], e["ablation"]) for e in report["rounds"]] == [
        (0, "none"), (1, "filter"), (1, "captioner"), (1, "capfilt"), (2, "capfilt")]
    assert report["targets"]["second_round_measured"]["met"]
    # Every BLIP model is pretrained from scratch (no --init); round 0 on web, later on curated.
    blip = fake.of("pretrain", "--arch blip")
    assert len(blip) == 5 and not any("--init" in c for c in blip)
    assert blip[0][blip[0].index("--data") + 1].endswith("world/web/*.parquet")
    config = load_config(_config_path("ci_small.yaml"))
    assert blip[0][blip[0].index("--steps") + 1] == str(config.round0_pretrain.steps)  # round 0's own budget
    assert {c[c.index("--steps") + 1] for c in blip[1:]} == {str(config.pretrain.steps)}
    for c in blip[1:]:
        assert "/curated/shards/" in c[c.index("--data") + 1] and "--mix" in c
    # Ablation switches: filter only has no captioner, captioner only has no filter.
    (filter_only,) = fake.of("curate", "round1/filter")
    assert "--no-synthetic" in filter_only and "--captioner" not in filter_only and "--filter" in filter_only
    (captioner_only,) = fake.of("curate", "round1/captioner")
    assert "--no-filter" in captioner_only and "--filter" not in captioner_only
    # Round 2 finetunes the round-1 capfilt model and curates with those finetuned models.
    ft2 = [c for c in fake.of("finetune") if c[c.index("--init") + 1] == str(run / "round1/capfilt/model")]
    assert len(ft2) == 2
    (round2,) = fake.of("curate", "round2/capfilt")
    assert round2[round2.index("--captioner") + 1].startswith(str(run / "round1/capfilt/finetune_caption"))
    assert round2[round2.index("--round") + 1] == "2"
    assert len(fake.of("pretrain", "--arch clip")) == 1  # the ranker is trained once


def test_rounds_and_ablations_flags_override_the_config(tmp_path, monkeypatch):
    import capfilt.jobs.bootstrap.rounds as bootstrap
    _fake_evaluation(monkeypatch)
    monkeypatch.setattr(bootstrap, "_cli", FakeStages())
    out = tmp_path / "run"
    assert cli.main(["bootstrap", "--config", str(_config_path("ci_small.yaml")), "--out", str(out),
                     "--rounds", "2", "--ablations", "none, capfilt"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [(e["round"], e["ablation"]) for e in report["rounds"]] == [(0, "none"), (1, "capfilt"), (2, "capfilt")]
    with pytest.raises(SystemExit, match="capfilt bootstrap: .*'filtre'"):
        cli.main(["bootstrap", "--config", str(_config_path("ci_small.yaml")), "--out", str(out),
                  "--ablations", "none,filtre"])


def test_demo_runs_the_packaged_config_and_prints_the_report(tmp_path, monkeypatch, capsys):
    """`capfilt demo` is bootstrap on jobs/configs/demo.yaml (kept beside the report), with
    --rounds / --jobs / --threads passed through; the stages themselves are not run here."""
    import torch

    import capfilt.jobs.bootstrap.rounds as bootstrap
    seen = []
    monkeypatch.setattr(bootstrap.Bootstrap, "run", lambda self: seen.append(self))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(("threads", n)))
    packaged = _config_path("demo.yaml").read_text()
    assert cli.main(["demo", "--print-config"]) == 0
    assert capsys.readouterr().out == packaged
    out = tmp_path / "d"
    assert cli.main(["demo", "--out", str(out)]) == 0
    assert (out / "demo_config.yaml").read_text() == packaged
    threads, run = seen
    assert threads == ("threads", 1) and run.config.rounds == 1 and run.jobs == 2 and run.out == out
    assert run.config.ablations == ["none", "filter", "captioner", "capfilt"]
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed and f"demo finished: open {out / 'report.md'}" in printed
    seen.clear()
    assert cli.main(["demo", "--out", str(out), "--rounds", "2", "--jobs", "1", "--threads", "2"]) == 0
    threads, run = seen
    assert threads == ("threads", 2) and run.config.rounds == 2 and run.jobs == 1


def test_rerun_skips_and_a_changed_option_redoes_downstream(tmp_path, monkeypatch):
    _fake_evaluation(monkeypatch)
    fake = FakeStages()
    _bootstrap(tmp_path, fake, monkeypatch)
    first = len(fake.calls)
    _bootstrap(tmp_path, fake, monkeypatch)
    assert len(fake.calls) == first  # nothing re-ran
    config = yaml.safe_load(_config_path("ci_small.yaml").read_text())
    config["curate"]["itm_threshold"] = 0.7
    report = _bootstrap(tmp_path, fake, monkeypatch, curate=config["curate"])
    again = [c[0] for c in fake.calls[first:]]
    # Only the filter's curations and what they feed: never the world, round 0 or the ranker.
    assert again == ["curate", "pretrain", "curate", "pretrain"]
    skipped = {s["stage"] for s in report["stages"] if s["skipped"]}
    assert {"world", "round0/none/pretrain", "clip", "round1/captioner/curate"} <= skipped


def test_empty_curation_pretrains_on_the_human_split(tmp_path, monkeypatch):
    _fake_evaluation(monkeypatch)
    fake = FakeStages(kept=0)
    _bootstrap(tmp_path, fake, monkeypatch, ablations=["none", "capfilt"])
    (pretrain,) = fake.of("pretrain", "round1/capfilt")
    assert pretrain[pretrain.index("--data") + 1].endswith("world/human/*.parquet") and "--mix" not in pretrain


def test_parallel_groups_send_only_unfinished_stages_to_workers(tmp_path, monkeypatch):
    """--jobs 2 with the stages faked: workers stood in for by this process (a spawned worker
    would not see the fakes). Which calls go to workers, and the order of the stage records."""
    import capfilt.jobs.bootstrap.rounds as bootstrap
    _fake_evaluation(monkeypatch)
    sent = []

    def in_workers(self, calls):
        sent.append([next((a for a in args if isinstance(a, str)), method) for method, args in calls])
        return [self._here(method, args) for method, args in calls]

    monkeypatch.setattr(bootstrap.Bootstrap, "_in_workers", in_workers)
    (tmp_path / "seq").mkdir()
    (tmp_path / "par").mkdir()
    sequential = _bootstrap(tmp_path / "seq", FakeStages(), monkeypatch)
    parallel = _bootstrap(tmp_path / "par", FakeStages(), monkeypatch, jobs=2)
    assert sent == [["round0/none", "clip"], ["round0/none/finetune_caption", "round0/none/finetune_retrieval"],
                    ["filter", "captioner", "capfilt"]]
    assert [s["stage"] for s in parallel["stages"]] == [s["stage"] for s in sequential["stages"]]
    # A longer CLIP training: only the ranker and the curations that read it run again. The ranker
    # is the one unfinished stage of its group, so it runs here; the three chains go to workers.
    sent.clear()
    fake = FakeStages()
    again = _bootstrap(tmp_path / "par", fake, monkeypatch, jobs=2, clip={"steps": 7})
    assert sent == [["filter", "captioner", "capfilt"]]
    assert [c[0] for c in fake.calls] == ["pretrain", "curate", "pretrain", "curate", "pretrain", "curate", "pretrain"]
    assert [s["stage"] for s in again["stages"]] == [s["stage"] for s in sequential["stages"]]
    assert {s["stage"] for s in again["stages"] if not s["skipped"]} == {
        "clip", *(f"round1/{a}/{s}" for a in ("filter", "captioner", "capfilt") for s in ("curate", "pretrain", "eval"))}


ORPHAN_SCRIPT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from capfilt.jobs.bootstrap.rounds import exit_with_parent

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 600)
    time.sleep(600)
"""


def test_workers_end_when_the_bootstrap_process_is_killed(tmp_path):
    """--jobs 2: a kill -9 of the bootstrap left its worker processes training on (in the stage
    directories a re-run then resumed in) and hanging forever at the end."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60  # a bound on waiting, not a speed assertion
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        raise AssertionError(f"worker {worker} outlived the killed bootstrap process")


@pytest.mark.parametrize("text, match", [
    ("pretrain: {stepz: 10}", r"unknown key\(s\) \['stepz'\] in .*pretrain \(did you mean stepz -> steps\?\)"),
    ("finetune_retrieval: {options: {warmpu: 10}}", r"\['--warmpu'\] for `capfilt finetune` \(did you mean warmpu -> warmup\?\)"),
])
def test_misspelt_config_keys_name_the_key_they_are_close_to(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path)
