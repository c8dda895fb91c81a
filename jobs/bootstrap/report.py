"""The bootstrap report: `report.json` (docs/architecture.md, "Contracts") and `report.md`.

One entry per round and ablation. Its fields, all fractions in [0, 1]:

* ``web_correct_fraction`` — web captions correct by the truth label (before curation);
* ``selected_correct_fraction`` — selected training captions that are correct (round 0 trains
  on every web caption, so it equals the web fraction), and ``correct_by_source`` the same for
  the selected web and synthetic captions apart; ``noise_removed`` — noisy web captions not
  selected;
* ``filter`` — precision/recall/F1 of the ITM filter's "web caption is noisy" (p < threshold)
  in this entry's curation; ``applied`` is false (and the figures 0) when the ablation ran
  without the filter;
* ``retrieval`` — held-out R@1/5/10 (ITC; ``itm_rerank`` too when configured) and ``caption``
  — CIDEr, BLEU-4 and attribute accuracy — of the model pretrained in this entry;
* ``seconds`` — time per stage.

``finetuned`` holds, per round, the quality of the captioner and filter finetuned for it: the
filter's ``evaluate --task filter`` result on the web split, ``filter_clean`` (the share of
clean pairs it flags, on the human split it was finetuned on and on the test split) and the
captioner's caption metrics.

``targets`` checks the issue's quality targets against these numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

from capfilt.transforms.synth.scenes import ATTRIBUTES

RETRIEVAL_KEYS = ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10")
CAPTION_KEYS = ("bleu4", "cider", "attribute_accuracy", "exact")
PRF = ("precision", "recall", "f1")


def _r1(entry: dict) -> float:
    """Held-out R@1: the mean of image->text and text->image."""
    return (entry["retrieval"]["i2t_r1"] + entry["retrieval"]["t2i_r1"]) / 2


def entry(round_: int, ablation: str, model_dir: Path, evaluation: dict, filter_dir, seconds: dict,
          web_fraction: float) -> dict:
    """A report entry from the evaluation of one round/ablation (see the module docstring)."""
    curated = evaluation.get("curated")
    retrieval = {k: evaluation["retrieval"][k] for k in RETRIEVAL_KEYS}
    if "itm_rerank" in evaluation["retrieval"]:
        retrieval["itm_rerank"] = {k: evaluation["retrieval"]["itm_rerank"][k] for k in RETRIEVAL_KEYS}
    caption = {k: evaluation["caption"][k] for k in CAPTION_KEYS if k in evaluation["caption"]}
    flt = evaluation.get("curated_filter")
    if flt is not None:
        filter_ = {**{k: flt[k] for k in PRF}, "applied": True, "threshold": flt["threshold"],
                   "model": str(filter_dir),
                   "per_type_flagged": {t: v["flagged_fraction"] for t, v in flt["per_type"].items()}}
    else:
        filter_ = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "applied": False}
    return {
        "round": round_,
        "ablation": ablation,
        "model": str(model_dir),
        "web_correct_fraction": curated["web_correct_fraction"] if curated else web_fraction,
        "selected_correct_fraction": curated["selected_correct_fraction"] if curated else web_fraction,
        "noise_removed": curated["noise_removed"] if curated else 0.0,
        "correct_by_source": curated.get("correct_by_source") if curated else {"web": web_fraction},
        "kept_fraction": curated["kept_rows"] / curated["rows"] if curated else 1.0,
        "synthetic_share": (None if curated["web_selected_fraction"] is None
                            else 1.0 - curated["web_selected_fraction"]) if curated else 0.0,
        "filter": filter_,
        "retrieval": retrieval,
        "caption": caption,
        "seconds": seconds,
    }


def targets(entries: list[dict], finetuned: list[dict]) -> dict:
    """The issue's quality targets, each with its measured value and whether it is met."""
    by = {(e["round"], e["ablation"]): e for e in entries}
    out = {}
    if finetuned and "filter" in finetuned[0]:
        f = finetuned[0]["filter"]
        out["filter_precision_at_recall_0.9"] = {
            "value": {"precision": f["precision"], "recall": f["recall"], "threshold": f["threshold"],
                      "best_precision_at_recall_0.9": f["at_recall_0.9"]["precision"]},
            "target": "precision >= 0.95 at recall >= 0.90 (round-0 finetuned filter, web split)",
            "met": f["precision"] >= 0.95 and f["recall"] >= 0.90,
        }
    one = by.get((1, "capfilt"))
    zero = by.get((0, "none"))
    if one:
        out["selected_correct_after_one_round"] = {
            "value": one["selected_correct_fraction"], "web_noise": 1 - one["web_correct_fraction"],
            "target": ">= 0.97 of selected captions correct, from 40-50% web noise",
            "met": (one["selected_correct_fraction"] or 0.0) >= 0.97,
        }
    if one and zero:
        gain = _r1(one) - _r1(zero)
        out["round1_r1_gain"] = {"value": gain, "round0_r1": _r1(zero), "round1_r1": _r1(one),
                                 "target": "round 1 (capfilt) beats round 0 by >= 0.10 mean R@1",
                                 "met": gain >= 0.10}
    rows = {a: by.get((1, a)) or (zero if a == "none" else None) for a in ("none", "filter", "captioner", "capfilt")}
    if all(rows.values()):
        r = {a: _r1(e) for a, e in rows.items()}
        out["ablation_ordering"] = {
            "value": r, "target": "none < filter, captioner < capfilt (mean R@1)",
            "met": r["none"] < r["filter"] < r["capfilt"] and r["none"] < r["captioner"] < r["capfilt"],
        }
    second = by.get((2, "capfilt"))
    out["second_round_measured"] = {
        "value": None if second is None else {"r1": _r1(second), "gain_over_round1": _r1(second) - _r1(one) if one else None,
                                              "selected_correct_fraction": second["selected_correct_fraction"]},
        "target": "round 2 measured and reported", "met": second is not None,
    }
    return out


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    jobs = report.get("config", {}).get("jobs", 1)
    parallel = (f" (wall clock; independent stages ran {jobs} at a time, so the stage times below add "
                "up to more)") if jobs > 1 else ""
    lines = ["# CapFilt bootstrap report", "",
             f"Total time {report['total_seconds']:.0f} s{parallel}. Fractions and recalls in percent; "
             "R@1 on the held-out test split (ITC). Filter P/R/F1: \"web caption is noisy\" "
             "against the truth.", "",
             "## Rounds and ablations", "",
             "| round | ablation | web correct | selected correct | noise removed | filter P / R / F1 "
             "| i2t R@1 | t2i R@1 | i2t / t2i R@5 | CIDEr | attribute acc. | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["rounds"]:
        f, r, c = e["filter"], e["retrieval"], e["caption"]
        prf = " / ".join(_pct(f[k]) for k in PRF) if f["applied"] else "not applied"
        lines.append(
            f"| {e['round']} | {e['ablation']} | {_pct(e['web_correct_fraction'])} | "
            f"{_pct(e['selected_correct_fraction'])} | {_pct(e['noise_removed'])} | {prf} | "
            f"{_pct(r['i2t_r1'])} | {_pct(r['t2i_r1'])} | {_pct(r['i2t_r5'])} / {_pct(r['t2i_r5'])} | "
            f"{c.get('cider', 0):.3f} | {_pct(c.get('attribute_accuracy'))} | {sum(e['seconds'].values()):.0f} |")
    if report["finetuned"]:
        lines += ["", "## Finetuned captioner and filter (used to curate the next round)", "",
                  "| used in round | finetuned from | filter P / R / F1 | best P at R >= 90 | "
                  "flagged: wrong colour / shape / position | flagged clean pairs: human (trained on) / test | "
                  "caption CIDEr | attribute acc. | exact captions | time (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for f in report["finetuned"]:
            flt, cap = f["filter"], f["caption"]
            wrong = flt.get("per_wrong_attribute", {})
            flagged = " / ".join(_pct(wrong.get(a, {}).get("flagged_fraction")) for a in ATTRIBUTES)
            clean = f.get("filter_clean", {})
            false_alarms = " / ".join(_pct(clean.get(s, {}).get("flagged_fraction")) for s in ("human", "test"))
            lines.append(
                f"| {f['used_in_round']} | {f['from']} | {' / '.join(_pct(flt[k]) for k in PRF)} | "
                f"{_pct(flt['at_recall_0.9']['precision'])} | {flagged} | {false_alarms} | {cap['cider']:.3f} | "
                f"{_pct(cap.get('attribute_accuracy'))} | {_pct(cap.get('exact'))} | {f['seconds']:.0f} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for name, t in report["targets"].items():
        lines.append(f"| {t['target']} | `{json.dumps(_rounded(t['value']))}` | {'yes' if t['met'] else 'no'} |")
    lines += ["", "## Time per stage", "", "| stage | seconds | |", "|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {'skipped (done earlier)' if s['skipped'] else ''} |")
    return "\n".join(lines) + "\n"


def _rounded(value):
    """Floats rounded to 4 places, inside any nesting of dicts."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def write_report(out: Path, report: dict) -> None:
    """Add the targets and write report.json and report.md into `out`."""
    report["targets"] = targets(report["rounds"], report["finetuned"])
    text = json.dumps(report, indent=2, default=str)
    (out / "report.json").write_text(text + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
