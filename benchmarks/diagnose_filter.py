"""Why the filter misses wrong shapes and positions: two diagnostics on the synthetic world
(docs/results.md, "What the filter's features and negatives hold"). Not a test: it prints JSON
(and writes it with --json-out).

``probe``: which attributes can be read off the filter's vision tower at all. A linear probe
(multinomial logistic regression with an L2 penalty, fitted by L-BFGS) on the flattened last
hidden state, (1 + patches) x D per image, predicts the colour, shape and position of each
single-object image; it is fitted on the web and human images and scored on the test images.
Chance is one over the number of values. The features are standardised on the fitting set.

``negatives``: what the ITM negatives of a filter finetune differ in. Batches of the human split
are drawn as the trainer draws them (--batch-size distinct rows); each image gets one negative
caption drawn BLIP's way (softmax of the ITC similarity / --temp over the captions that are not
its own, `model.losses.negative_weights`, the trainer's function) and one drawn uniformly. Each
negative is classed against the image by the truth: "count" (another number of objects), else
the attributes whose values differ as multisets ("shape", "colour+position", ...), or "none"
(the caption is also true of the image, worded otherwise).

``blind``: the best any filter could do on a world's web split if it cannot see some attributes
(no model involved; truth only). A web caption is "hidden" from a filter blind to attributes B
when everything it gets wrong about its image (by the truth: the wrong attribute, or what differs
between its image and the image it was written for) lies in B. The filter is granted perfect
verdicts on every other caption; a hidden noisy caption scores like a correct one, so reaching
the recall means flagging that share of the correct captions too. Printed per blind set: the
precision at --recall, and the share of correct captions among the web captions it keeps.

The probe is fitted here rather than with scikit-learn, which is not in the pinned stack: a
diagnostic is not worth a dependency, and the fit is a dozen lines of torch.

    .venv/bin/python benchmarks/diagnose_filter.py probe --model F --world W
    .venv/bin/python benchmarks/diagnose_filter.py negatives --model F --world W
    .venv/bin/python benchmarks/diagnose_filter.py blind --world W
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from capfilt.model.evaluation.evaluate import filter_itc_matrix, load_eval_images, read_truth  # noqa: E402
from capfilt.model.inference.filter import load_filter  # noqa: E402
from capfilt.model.training.losses import negative_weights  # noqa: E402
from capfilt.model.builders.model_dirs import find_model_dirs  # noqa: E402

PROBED = {"colour": "colours", "shape": "shapes", "position": "positions"}  # name -> truth column


def _filter_dir(model: str) -> str:
    """The ITM model (BLIP or BLIP-2) in ``model`` or its pretrain/finetune subdirectories."""
    dirs = find_model_dirs(model)
    for kind in ("itm", "blip2"):
        if kind in dirs:
            return dirs[kind]
    raise ValueError(f"--model {model}: no ITM model directory, found {sorted(dirs)}")


def _truth_by_key(world: Path) -> dict[str, dict]:
    return {r["key"]: r for r in read_truth(world / "truth.parquet").to_pylist()}


def vision_tokens(flt, world: Path, splits: list[str], truth: dict, batch_size: int = 64):
    """(N, (1 + P) * D) flattened vision tower output and the truth rows of the single-object
    images of ``splits``."""
    feats, rows = [], []
    for split in splits:
        evalset = load_eval_images(str(world / split))
        keep = [i for i, k in enumerate(evalset.keys) if truth[k]["n_objects"] == 1]
        images = [evalset.images[i] for i in keep]
        rows += [truth[evalset.keys[i]] for i in keep]
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                pixels = flt.pixel_values(images[start:start + batch_size])
                embeds = flt.encode_images(pixels)["embeds"]  # (B, 1 + P, D)
                feats.append(embeds.float().flatten(1))
    if not rows:
        raise ValueError(f"{world}: no single-object image in splits {splits}")
    return torch.cat(feats), rows


def linear_probe(x_fit: torch.Tensor, y_fit: torch.Tensor, x_test: torch.Tensor, n_classes: int,
                 l2: float = 1e-3, max_iter: int = 200) -> torch.Tensor:
    """Predicted classes of ``x_test`` (T,) by a softmax regression fitted on (x_fit, y_fit)."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_test = (x_fit - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_fit.shape[1], n_classes, requires_grad=True)  # (D', K)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_fit @ w + b, y_fit) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (x_test @ w + b).argmax(dim=1)


def probe(model: str, world: Path) -> dict:
    flt = load_filter(_filter_dir(model), device="cpu")
    truth = _truth_by_key(world)
    torch.manual_seed(0)
    x_fit, fit_rows = vision_tokens(flt, world, ["web", "human"], truth)
    x_test, test_rows = vision_tokens(flt, world, ["test"], truth)
    out = {"model": model, "world": str(world), "n_fit": len(fit_rows), "n_test": len(test_rows),
           "features": int(x_fit.shape[1]), "accuracy": {}, "chance": {}}
    for name, column in PROBED.items():
        values = sorted({r[column][0] for r in fit_rows + test_rows})
        index = {v: i for i, v in enumerate(values)}
        y_fit = torch.tensor([index[r[column][0]] for r in fit_rows])
        y_test = torch.tensor([index[r[column][0]] for r in test_rows])
        predicted = linear_probe(x_fit, y_fit, x_test, len(values))
        out["accuracy"][name] = round(float((predicted == y_test).float().mean()), 4)
        out["chance"][name] = round(1 / len(values), 4)
    return out


def difference(image: dict, caption_of: dict) -> str:
    """What the caption of ``caption_of`` gets wrong about ``image``, by the truth."""
    if image["n_objects"] != caption_of["n_objects"]:
        return "count"
    wrong = [name for name, column in PROBED.items() if sorted(image[column]) != sorted(caption_of[column])]
    return "+".join(wrong) if wrong else "none"


def negatives(model: str, world: Path, batch_size: int = 32, batches: int = 200, temp: float = 0.07,
              seed: int = 0) -> dict:
    if batch_size < 2 or batches < 1 or temp <= 0:
        raise ValueError(f"need batch_size >= 2, batches >= 1, temp > 0; got {batch_size}, {batches}, {temp}")
    flt = load_filter(_filter_dir(model), device="cpu")
    truth = _truth_by_key(world)
    evalset = load_eval_images(str(world / "human"))
    n = len(evalset.keys)
    if n < batch_size:
        raise ValueError(f"{world / 'human'} has {n} rows, fewer than --batch-size {batch_size}")
    rows = [truth[k] for k in evalset.keys]
    sim = torch.from_numpy(filter_itc_matrix(flt, evalset.images, evalset.captions))  # (N, N) cosine
    captions = np.array(evalset.captions, dtype=object)
    rng = np.random.default_rng(seed)
    hard, uniform = collections.Counter(), collections.Counter()
    for _ in range(batches):
        idx = rng.choice(n, batch_size, replace=False)  # (B,)
        positive = torch.from_numpy(captions[idx][None, :] == captions[idx][:, None])  # (B, B) same text
        weights = negative_weights(sim[idx][:, idx] / temp, positive).numpy()  # (B, B)
        for r, i in enumerate(idx):
            if positive[r].all():
                continue  # every caption of the batch is this image's: no negative exists
            j = idx[rng.choice(batch_size, p=weights[r] / weights[r].sum())]
            hard[difference(rows[i], rows[j])] += 1
            others = idx[~positive[r].numpy()]
            uniform[difference(rows[i], rows[rng.choice(others)])] += 1
    total = sum(hard.values())
    kinds = sorted(set(hard) | set(uniform), key=lambda k: (-hard[k], k))
    return {"model": model, "world": str(world), "draws": total, "temp": temp, "batch_size": batch_size,
            "hard_percent": {k: round(100 * hard[k] / total, 1) for k in kinds},
            "uniform_percent": {k: round(100 * uniform[k] / total, 1) for k in kinds}}


CAPTION_ATTRIBUTES = {"colour": "colours", "shape": "shapes", "position": "positions", "size": "sizes"}
BLIND_SETS = {"nothing": (), "shape": ("shape",), "position": ("position",), "shape+position": ("shape", "position")}


def wrong_in(row: dict, truth: dict) -> set[str]:
    """What a web caption gets wrong about its image, by the truth: {} for a correct caption
    (and for another image's caption that is also true of this one), {"junk"}, {"count"}, or
    the attributes that differ. Size counts as visible, which can only raise the bounds."""
    kind = row["noise_type"]
    if kind == "correct":
        return set()
    if kind == "junk":
        return {"junk"}
    if kind == "attribute":
        return {row["wrong_attribute"]}
    if kind != "other":
        raise ValueError(f"truth row {row['key']}: unknown noise_type {kind!r}")
    source = truth[row["source_key"]]
    if source["n_objects"] != row["n_objects"]:
        return {"count"}
    return {name for name, column in CAPTION_ATTRIBUTES.items() if sorted(row[column]) != sorted(source[column])}


def blind_bounds(world: Path, recall: float = 0.9) -> dict:
    if not 0 < recall <= 1:
        raise ValueError(f"--recall must be in (0, 1], got {recall}")
    truth = _truth_by_key(world)
    web = [r for r in truth.values() if r["split"] == "web"]
    if not web:
        raise ValueError(f"{world / 'truth.parquet'} has no web rows")
    wrong = {r["key"]: wrong_in(r, truth) for r in web}
    correct = sum(r["noise_type"] == "correct" for r in web)
    noisy = len(web) - correct
    out = {"world": str(world), "web": len(web), "noisy": noisy, "correct": correct, "recall": recall, "blind": {}}
    for name, blind in BLIND_SETS.items():
        hidden = sum(r["noise_type"] != "correct" and wrong[r["key"]] <= set(blind) for r in web)
        visible = noisy - hidden
        need = math.ceil(recall * noisy - 1e-9) - visible  # hidden captions that must be flagged
        flag = 0.0 if need <= 0 else need / hidden  # the share of hidden and correct captions flagged
        caught = visible + flag * hidden if need > 0 else math.ceil(recall * noisy - 1e-9)
        out["blind"][name] = {
            "hidden_noisy": hidden, "visible_noisy": visible, "correct_flagged": round(flag, 4),
            "best_precision": round(caught / (caught + flag * correct), 4),
            "kept_correct": round(correct / (correct + hidden), 4) if flag < 1 else None,
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name, text in (("probe", "linear probes of the vision tokens for colour / shape / position"),
                       ("negatives", "what hard and uniform ITM negatives differ in, by the truth"),
                       ("blind", "the best precision of a filter blind to shape and/or position (truth only)")):
        p = sub.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == "blind":
            p.add_argument("--recall", type=float, default=0.9, help="the recall the filter must reach")
        else:
            p.add_argument("--model", required=True, help="ITM model directory (or a run with an itm/ subdirectory)")
        p.add_argument("--world", required=True, type=Path,
                       help="`capfilt synth` output (web/, human/, test/, truth.parquet)")
        p.add_argument("--json-out", type=Path, help="also write the JSON here")
        if name == "negatives":
            p.add_argument("--batch-size", type=int, default=32, help="rows per drawn batch (the finetune's)")
            p.add_argument("--batches", type=int, default=200, help="batches drawn")
            p.add_argument("--temp", type=float, default=0.07, help="ITC temperature (BLIP's initial value)")
            p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.world / "truth.parquet").is_file():
        parser.error(f"--world {args.world}: no truth.parquet (run `capfilt synth --out {args.world}`)")
    if args.what == "probe":
        result = probe(args.model, args.world)
    elif args.what == "blind":
        result = blind_bounds(args.world, args.recall)
    else:
        result = negatives(args.model, args.world, args.batch_size, args.batches, args.temp, args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
