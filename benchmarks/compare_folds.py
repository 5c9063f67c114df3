"""One split, K folds or K seeds: which gives the better model, and whose own estimate tracks the test.

    python benchmarks/compare_folds.py --data-root ../shared/data/nih_dev --work /tmp/folds \\
        --image-size 64 --epochs 8 -- --arch resnet18

On a labelled data set with a held-out test set (DATA_ROOT/student_labels/test_labels.csv), every
method trains --multi-head models (one pass for every labelled pathology) and is scored on the test
images through make_submission.py, with patient-grouped 95% intervals (evaluation.evaluate):
- single:     one model on the default patient split (--seed 0); its own estimate is the validation
              split's out-of-sample calibrated MSE (val_mse_cv) and AUC.
- kfold:      --folds K --fold all; the K fold models' calibrated outputs averaged on the test; its
              own estimate is the out-of-fold MSE and AUC over every training row (oof_predictions.csv).
- seeds:      K models with --seed 0..K-1 on the split of seed 0 (--split-seed 0), about the same
              compute as kfold, averaged (make_submission.py --ensemble); its own estimate is
              experiments/blend.py's out-of-fold MSE of the uniform average on the validation split.
- blend-split / blend-oof: experiments/blend.py over two configurations (the flags after `--`, and
              the same with --head-type three-class), fitted on the single split's validation rows
              or on the K-fold runs' out-of-fold rows; its own estimate is blend.py's out-of-fold
              MSE of the blend. Applied with make_submission.py --blend.
Runs already trained under WORK are reused (train.py --resume returns a finished run at once).
Prints one table, then the paired differences of test macro MSE and AUC between methods, each with
a patient-grouped 95% interval from the same resamples for both (tighter than the two methods' own
intervals, which share most of their noise: the test patients); WORK/results.json keeps every number.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_submission  # noqa: E402
import train  # noqa: E402
from common import format_table, jsonable, run_cli, write_text  # noqa: E402
from dataset import PATHOLOGIES, read_test_csv, read_train_csv  # noqa: E402
from evaluation import evaluate  # noqa: E402
from experiments import blend  # noqa: E402

PAIRS = [("kfold", "single"), ("seeds", "single"), ("kfold", "seeds"), ("blend_oof", "blend_split"),
         ("blend_oof", "kfold")]
COLUMNS = ["method", "models", "est_mse", "est_auc", "test_mse", "test_mse_ci", "test_auc", "test_auc_ci", "gap_mse"]


def measurement_parser(description: str, epochs: int, k_help: str) -> argparse.ArgumentParser:
    """The flags this script and compare_levers.py share: the data, the scratch folder, the runs'
    size, K and the bootstrap."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="scratch folder: caches, runs, the results' JSON")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--k", type=int, default=5, help=k_help)
    p.add_argument("--n-boot", type=int, default=1000)
    return p


def parse_with_extra(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """p's flags before `--`; the train.py flags after it, as args.extra."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    args.extra = argv[cut + 1:]
    return args


def parse_args(argv):
    return parse_with_extra(measurement_parser(__doc__.split("\n\n")[0], 8, "folds, and seeds for the seed ensemble"),
                            argv)


def train_run(args, name: str, *flags: str) -> Path:
    out = args.work / "runs" / name
    train.main(["--data-root", str(args.data_root), "--cache-dir", str(args.work / "cache"), "--out-dir", str(out),
                "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--weights", "none",
                "--pathology", *args.names, "--multi-head", "--no-progress", "--resume", *args.extra, *flags])
    return out


def test_score(args, name: str, checkpoints: Path, *flags: str) -> dict:
    """Test macro MSE and AUC (mean of per-pathology intervals) of make_submission.py's CSV."""
    sub = args.work / "subs" / f"{name}.csv"
    make_submission.main(["--data-root", str(args.data_root), "--checkpoints", str(checkpoints), "--out", str(sub),
                          "--cache-dir", str(args.work / "cache"), "--fill-missing", "0", "--no-progress", *flags])
    test = read_test_csv(args.data_root / "student_labels" / "test_ids.csv")
    labels = pd.read_csv(args.data_root / "student_labels" / "test_labels.csv").set_index("Id").loc[test["Id"]]
    pred = pd.read_csv(sub).set_index("Id").loc[test["Id"]]
    m = evaluate(pred[args.names].to_numpy(float), labels[args.names].to_numpy(float), test["patient"].to_numpy(),
                 args.names, {}, n_boot=args.n_boot, seed=0)
    per = m["per_pathology"]
    return {"test_mse": m["macro"]["mse"], "test_auc": m["macro"]["auc"],
            "test_mse_ci": [float(np.mean([per[n]["mse_ci"][i] for n in args.names])) for i in (0, 1)],
            "test_auc_ci": [float(np.nanmean([per[n]["auc_ci"][i] for n in args.names])) for i in (0, 1)]}


def validation_estimate(run: Path) -> dict:
    s = json.loads((run / "multi_head" / "summary.json").read_text())
    return {"est_mse": s["val_mse_cv"], "est_auc": s["val_auc"]}


def oof_estimate(run: Path, names: list[str]) -> dict:
    df = pd.read_csv(run / "multi_head" / "oof_predictions.csv")
    df = df[df["pathology"].isin(names) & df["target"].notna()]
    mse, auc = [], []
    for n in names:
        d = df[df["pathology"] == n]
        m = evaluate(d[["calibrated_oos"]].to_numpy(), d[["target"]].to_numpy(), d["patient"].to_numpy(), [n], {},
                     n_boot=0)["per_pathology"][n]
        mse.append(m["mse"])
        auc.append(m["auc"])
    return {"est_mse": float(np.mean(mse)), "est_auc": float(np.nanmean(auc))}


def blend_estimate(args, name: str, runs: list[Path]) -> tuple[Path, dict]:
    out = args.work / "blends" / f"{name}.json"
    b = blend.main(["--runs", *map(str, runs), "--out", str(out), "--no-progress"])
    oof = [e["oof"] for e in b["pathologies"].values()]
    key = "uniform" if name.startswith("seeds") else "blend"
    return out, {"est_mse": float(np.nanmean([o[key] if o[key] is not None else np.nan for o in oof])),
                 "est_auc": float("nan")}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.work.mkdir(parents=True, exist_ok=True)
    csv = args.data_root / "student_labels" / "train2023.csv"
    table = read_train_csv(csv)
    args.names = [n for n in PATHOLOGIES if n in table.columns and table[n].notna().any()]
    k = args.k
    rows = []

    single = train_run(args, "split/a", "--seed", "0")
    rows.append({"method": "single", "models": 1, **validation_estimate(single), **test_score(args, "single", single)})

    kfold = train_run(args, "kfold/a", "--seed", "0", "--folds", str(k), "--fold", "all")
    rows.append({"method": f"kfold{k}", "models": k, **oof_estimate(kfold, args.names),
                 **test_score(args, "kfold", kfold)})

    seeds = [train_run(args, f"seeds/s{s}", "--seed", str(s), "--split-seed", "0") for s in range(1, k)]
    if not (args.work / "runs" / "seeds" / "s0").exists():  # seed 0 is the single model: copied, not retrained
        shutil.copytree(single, args.work / "runs" / "seeds" / "s0")
    _, est = blend_estimate(args, "seeds", [args.work / "runs" / "seeds" / "s0", *seeds])
    rows.append({"method": f"seeds{k}", "models": k, **est,
                 **test_score(args, "seeds", args.work / "runs" / "seeds", "--ensemble")})

    b_single = train_run(args, "split/b", "--seed", "0", "--head-type", "three-class")
    path, est = blend_estimate(args, "blend_split", [single, b_single])
    rows.append({"method": "blend-split", "models": 2, **est,
                 **test_score(args, "blend_split", single.parent, "--blend", str(path))})
    b_kfold = train_run(args, "kfold/b", "--seed", "0", "--head-type", "three-class", "--folds", str(k), "--fold", "all")
    path, est = blend_estimate(args, "blend_oof", [kfold, b_kfold])
    rows.append({"method": "blend-oof", "models": 2 * k, **est,
                 **test_score(args, "blend_oof", kfold.parent, "--blend", str(path))})

    for r in rows:
        r["gap_mse"] = r["test_mse"] - r["est_mse"]
        r["test_mse_ci"] = "{:.3f}-{:.3f}".format(*r["test_mse_ci"])
        r["test_auc_ci"] = "{:.3f}-{:.3f}".format(*r["test_auc_ci"])
    pairs = [paired_difference(args, a, b) for a, b in PAIRS]
    write_text(args.work / "results.json", json.dumps(jsonable({"methods": rows, "paired": pairs}), indent=2))
    print(f"\n{args.data_root}: {', '.join(args.names)}; multi-head, {args.image_size} px, {args.epochs} epochs, "
          f"--weights none, extra {args.extra}\n" + format_table(rows, COLUMNS))
    print("\npaired differences on the same test patients (first minus second; 95% patient-grouped interval):\n"
          + format_table(pairs, ["pair", "mse_diff", "mse_diff_ci", "auc_diff", "auc_diff_ci"]))
    return rows


def weighted_macro(pred: np.ndarray, target: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(macro MSE, macro AUC) with row weights w (a bootstrap resample's counts); pred, target (N, P)."""
    mse, auc = [], []
    for k in range(target.shape[1]):
        m = ~np.isnan(target[:, k]) & (w > 0)
        if not m.any():  # a resample without a labelled row of this finding (tiny test sets)
            continue
        mse.append(np.average((pred[m, k] - target[m, k]) ** 2, weights=w[m]))
        pn = m & np.isin(target[:, k], [-1.0, 1.0])
        if len(np.unique(target[pn, k])) == 2:
            auc.append(roc_auc_score(target[pn, k] == 1, pred[pn, k], sample_weight=w[pn]))
    return float(np.mean(mse)), float(np.mean(auc)) if auc else float("nan")


def paired_difference(args, a: str, b: str) -> dict:
    """Test macro MSE and AUC of submission a minus submission b, with a 95% interval from
    args.n_boot resamples of the test patients, the same resamples for both."""
    test = read_test_csv(args.data_root / "student_labels" / "test_ids.csv")
    labels = pd.read_csv(args.data_root / "student_labels" / "test_labels.csv").set_index("Id").loc[test["Id"]]
    target = labels[args.names].to_numpy(float)
    preds = [pd.read_csv(args.work / "subs" / f"{x}.csv").set_index("Id").loc[test["Id"], args.names].to_numpy(float)
             for x in (a, b)]
    _, codes = np.unique(test["patient"].to_numpy(), return_inverse=True)
    rng = np.random.default_rng(0)
    counts = np.stack([np.bincount(rng.integers(0, codes.max() + 1, codes.max() + 1), minlength=codes.max() + 1)
                       for _ in range(args.n_boot)])[:, codes].astype(float)  # (n_boot, N): each row's weight
    diffs = {"mse": [], "auc": []}
    for w in [np.ones(len(codes)), *counts]:
        m = [weighted_macro(pred, target, w) for pred in preds]
        diffs["mse"].append(m[0][0] - m[1][0])
        diffs["auc"].append(m[0][1] - m[1][1])
    out = {"pair": f"{a} - {b}"}
    for k, v in diffs.items():
        lo, hi = np.nanpercentile(v[1:], [2.5, 97.5])
        out[f"{k}_diff"], out[f"{k}_diff_ci"] = v[0], f"{lo:+.3f} to {hi:+.3f}"
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
