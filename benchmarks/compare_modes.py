"""Compare training modes on the demo data, on validation and on the held-out demo test set.

    python benchmarks/compare_modes.py --work /tmp/compare [--epochs 3] [--image-size 64]

Modes: per-pathology models with the weighted sampler (the default), without it, one --multi-head
model, and view-specific (frontal + lateral) models. Each is trained with train.main, then
make_submission.main predicts the demo's test images, whose true labels the demo keeps in
student_labels/test_labels.csv (the real course data does not give them). Prints one table per
mode: validation MSE raw / calibrated / constant, AUC, and the same on the held-out test set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluation  # noqa: E402
import make_submission  # noqa: E402
import train  # noqa: E402
from common import format_table
from dataset import PATHOLOGIES, read_train_csv
from demo import ensure_demo  # noqa: E402

MODES = {
    "sampler+affine": [],
    "no-sampler+affine": ["--no-sampler"],
    "multi-head": ["--multi-head"],
    "views": ["--view", "frontal"],  # + a lateral run, below
}


def held_out(submission: Path, labels: pd.DataFrame, train_means: dict) -> dict:
    pred = pd.read_csv(submission).set_index("Id").loc[labels["Id"]]
    out = {}
    for name in PATHOLOGIES:
        t = labels[name].to_numpy(float)
        m = ~np.isnan(t)
        p = pred[name].to_numpy(float)[m]
        out[name] = {"test_mse_cal": float(np.mean((p - t[m]) ** 2)),
                     "test_const_mse": float(np.mean((train_means[name] - t[m]) ** 2)),
                     "test_auc": evaluation.auc(p, t[m])}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="scratch folder for checkpoints and caches")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = p.parse_args(argv)
    root = ensure_demo(args.work / "demo_data")
    labels = pd.read_csv(root / "student_labels" / "test_labels.csv")
    table = read_train_csv(root / "student_labels" / "train2023.csv")
    train_means = {n: float(np.nanmean(table[n])) for n in PATHOLOGIES}
    common = ["--data-root", str(root), "--cache-dir", str(args.work / "cache"), "--epochs", str(args.epochs),
              "--image-size", str(args.image_size), "--weights", "none", "--no-progress", "--pathology", "all"]
    results = {}
    for mode in args.modes:
        out = args.work / mode
        runs = [MODES[mode]] + ([["--view", "lateral"]] if mode == "views" else [])
        for extra in runs:
            train.main(common + ["--out-dir", str(out), "--resume", *extra])
        sub = out / "submission.csv"
        make_submission.main(["--data-root", str(root), "--test-csv", str(root / "student_labels" / "test_labels.csv"),
                              "--checkpoints", str(out), "--out", str(sub), "--cache-dir", str(args.work / "cache"),
                              "--fill-missing", "0", "--no-progress"])
        test = held_out(sub, labels, train_means)
        rows = []
        for s in sorted(out.glob("*/summary.json")):
            summary = json.loads(s.read_text())
            for name, m in summary["per_pathology"].items():
                rows.append({"pathology": name, "view": summary["view"], **{k: m.get(k) for k in
                             ("val_mse", "val_mse_cal", "const_mse", "val_auc")}, **test[name]})
        cols = ["val_mse", "val_mse_cal", "const_mse", "val_auc"]
        agg = rows if mode != "views" else rows  # views: one row per pathology and view
        macro = {"pathology": "macro mean", **{k: float(np.nanmean([r[k] if r[k] is not None else np.nan for r in agg]))
                                              for k in cols + ["test_mse_cal", "test_const_mse", "test_auc"]}}
        results[mode] = macro
        print(f"\n== {mode}\n" + format_table(rows + [macro], ["pathology", "view", *cols, "test_mse_cal",
                                                                 "test_const_mse", "test_auc"]))
    print("\n== summary (macro means)\n" + format_table([{"mode": k, **v} for k, v in results.items()],
          ["mode", "val_mse", "val_mse_cal", "const_mse", "val_auc", "test_mse_cal", "test_const_mse", "test_auc"]))


if __name__ == "__main__":
    main()
