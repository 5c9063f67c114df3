"""Compare training recipes on a labelled data set: validation and held-out test numbers per recipe.

    python benchmarks/compare_recipes.py --data-root ../shared/data/nih_dev --work /tmp/recipes --set sampler
    python benchmarks/compare_recipes.py --data-root ../shared/data/nih_dev --work /tmp/recipes --set recipe \\
        --image-size 64 --epochs 6 --seeds 0 1 -- --batch-size 32

Each recipe is a list of train.py flags. Every (recipe, seed) trains one --multi-head model on the
pathologies the CSV labels (one pass per recipe keeps the comparison affordable), or with
--no-multi-head one model per pathology (needed for the sampler: a multi-head row's weight is the
mean over its pathologies, which dilutes a rare value's), then make_submission.py predicts the
held-out test images, and their
true labels (DATA_ROOT/student_labels/test_labels.csv, which nih_dev and the demo have) give the
test MSE and AUC with patient-grouped 95% intervals (evaluation.evaluate). Validation numbers are
the best epoch's: AUC and the out-of-sample calibrated MSE (val_mse_cv). Results are appended to
WORK/results.jsonl as each run finishes (a run already there is not trained again), and the table
of means over seeds (with the spread, max - min) is printed at the end. Flags after `--` go to every
train.py run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_submission  # noqa: E402
import train  # noqa: E402
from common import format_table, run_cli
from dataset import PATHOLOGIES, read_test_csv, read_train_csv  # noqa: E402
from common import jsonable
from evaluation import evaluate  # noqa: E402

PLAIN = ["--arch", "resnet50", "--no-sampler", "--augment", "none", "--head-type", "regression"]
SETS = {
    # issue 12: the sampler's over-sampling bound
    "sampler": {"unbounded": ["--sampler-cap", "0"], "cap5": ["--sampler-cap", "5"], "no-sampler": ["--no-sampler"]},
    # issue 14: arch x augmentation x head, everything else at the defaults
    # (arch varies fastest, so a time-limited run still covers every arch)
    "recipe": {f"{arch}/{aug}/{head}": ["--arch", arch, "--augment", aug, "--head-type", head]
               for head in ("regression", "three-class") for aug in ("none", "standard")
               for arch in ("resnet18", "resnet50", "densenet121")},
    # the default recipe against a plain ResNet-50 loop (uniform shuffling, MSE, no augmentation)
    "default": {"plain-resnet50": PLAIN, "default": []},
    # issue 20: timm backbones against the default ResNet-50, and the weights' moving average
    "backbones": {"default": [], "timm-convnext-atto": ["--arch", "timm/convnext_atto"],
                  "timm-vit-tiny": ["--arch", "timm/vit_tiny_patch16_224"], "ema-0.99": ["--ema", "0.99"]},
}


def labelled_pathologies(csv: Path) -> list[str]:
    table = read_train_csv(csv)
    return [n for n in PATHOLOGIES if n in table.columns and table[n].notna().any()]


def run_one(name: str, flags: list[str], seed: int, args, extra: list[str], names: list[str]) -> dict:
    out = args.work / "runs" / name.replace("/", "_") / f"seed{seed}"
    argv = ["--data-root", str(args.data_root), "--cache-dir", str(args.work / "cache"), "--out-dir", str(out),
            "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--weights", args.weights,
            "--seed", str(seed), "--no-progress", "--pathology", *names, *flags, *extra]
    t0 = time.time()
    summaries = train.main(argv + (["--multi-head"] if args.multi_head else []))
    seconds = time.time() - t0
    per = {n: m for s in summaries for n, m in s["per_pathology"].items()}
    val = {k: float(np.nanmean([per[n].get(k, np.nan) for n in names])) for k in ("val_auc", "val_mse_cv", "const_mse")}
    # the epochs' own seconds (training + validation), not the cache build of a first run
    epoch_seconds = float(np.mean([pd.read_csv(out / s["folder"] / "history.csv")["seconds"].mean() for s in summaries]))
    sub = out / "test_submission.csv"
    make_submission.main(["--data-root", str(args.data_root), "--checkpoints", str(out), "--out", str(sub),
                          "--cache-dir", str(args.work / "cache"), "--fill-missing", "0", "--no-progress"])
    test = read_test_csv(args.data_root / "student_labels" / "test_ids.csv")
    labels = pd.read_csv(args.data_root / "student_labels" / "test_labels.csv").set_index("Id").loc[test["Id"]]
    pred = pd.read_csv(sub).set_index("Id").loc[test["Id"]]
    const = {n: per[n].get("train_mean", np.nan) for n in names}
    m = evaluate(pred[names].to_numpy(float), labels[names].to_numpy(float), test["patient"].to_numpy(), names,
                 const, n_boot=args.n_boot, seed=0)
    return {"recipe": name, "seed": seed, "flags": flags, "seconds": round(seconds, 1),
            "epoch_seconds": round(epoch_seconds, 2), "best_epoch": [s["best_epoch"] for s in summaries],
            **val,
            "test_mse": m["macro"]["mse"], "test_auc": m["macro"]["auc"],
            "test_mse_ci": [float(np.mean([m["per_pathology"][n]["mse_ci"][i] for n in names])) for i in (0, 1)],
            "per_pathology": m["per_pathology"]}


def summarise(results: list[dict], order: list[str]) -> list[dict]:
    rows = []
    for name in order:
        rs = [r for r in results if r["recipe"] == name]
        if not rs:
            continue
        row = {"recipe": name, "seeds": len(rs)}
        for k in ("val_auc", "val_mse_cv", "test_mse", "test_auc", "epoch_seconds"):
            v = np.array([r[k] if r[k] is not None else np.nan for r in rs], float)
            row[k] = float(np.nanmean(v))
            if len(rs) > 1 and k != "epoch_seconds":
                row[k + "_spread"] = float(np.nanmax(v) - np.nanmin(v))
        rows.append(row)
    return rows


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, required=True, help="a CS 156b-layout root with test_labels.csv")
    p.add_argument("--work", type=Path, required=True, help="scratch folder: caches, checkpoints, results.jsonl")
    p.add_argument("--set", nargs="+", default=["sampler"], choices=list(SETS), help="which comparisons")
    p.add_argument("--only", nargs="+", help="only these recipe names of the chosen sets")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--weights", default="none")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--pathology", nargs="+", help="default: every submission column the CSV labels")
    p.add_argument("--multi-head", action=argparse.BooleanOptionalAction, default=True,
                   help="one multi-head model per run (default), or one model per pathology")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="start no new run after this many seconds (what finished is kept and summarised)")
    args = p.parse_args(argv)
    names = args.pathology or labelled_pathologies(args.data_root / "student_labels" / "train2023.csv")
    results_path = args.work / "results.jsonl"
    args.work.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    order, t_start = [], time.time()
    for s in args.set:
        for name, flags in SETS[s].items():
            if args.only and name not in args.only:
                continue
            order.append(name)
            for seed in args.seeds:
                if any(r["recipe"] == name and r["seed"] == seed for r in done):
                    continue
                if time.time() - t_start > args.max_seconds:
                    print(f"== {name} seed {seed}: skipped, past --max-seconds {args.max_seconds:g}", flush=True)
                    continue
                r = run_one(name, flags, seed, args, extra, names)
                done.append(r)
                with open(results_path, "a") as f:
                    f.write(json.dumps(jsonable(r)) + "\n")
                print(f"== {name} seed {seed}: val auc {r['val_auc']:.3f} mse_cv {r['val_mse_cv']:.4f} | test mse "
                      f"{r['test_mse']:.4f} auc {r['test_auc']:.3f} | {r['epoch_seconds']:.1f} s/epoch", flush=True)
    rows = summarise(done, order)
    cols = ["recipe", "seeds", "val_auc", "val_auc_spread", "val_mse_cv", "test_mse", "test_mse_spread", "test_auc",
            "test_auc_spread", "epoch_seconds"]
    print(f"\n{args.data_root}: {', '.join(names)}; {'multi-head' if args.multi_head else 'per-pathology'} models, "
          f"{args.image_size} px, {args.epochs} epochs, --weights {args.weights}, seeds {args.seeds}, extra {extra}\n"
          + format_table(rows, cols))
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
