"""Does --tta flip or --study-fusion lower the MSE? Measured on the demo's held-out test images.

    python benchmarks/compare_submission_options.py --checkpoints /tmp/compare/sampler+affine \\
        --data-root /tmp/compare/demo_data --cache-dir /tmp/compare/cache

Runs make_submission.main on student_labels/test_labels.csv (the demo keeps the test images' true
labels there) with each option set and prints macro MSE and AUC against those labels.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluation  # noqa: E402
import make_submission  # noqa: E402
from common import format_table
from dataset import PATHOLOGIES  # noqa: E402

OPTIONS = {"plain": [], "--tta flip": ["--tta", "flip"], "--study-fusion": ["--study-fusion"],
           "both": ["--tta", "flip", "--study-fusion"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", type=Path, required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, required=True)
    args = p.parse_args(argv)
    labels_csv = args.data_root / "student_labels" / "test_labels.csv"
    labels = pd.read_csv(labels_csv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in OPTIONS.items():
            out = Path(tmp) / "submission.csv"
            make_submission.main(["--data-root", str(args.data_root), "--test-csv", str(labels_csv), "--checkpoints",
                                  str(args.checkpoints), "--out", str(out), "--cache-dir", str(args.cache_dir),
                                  "--fill-missing", "0", "--no-progress", *extra])
            pred = pd.read_csv(out).set_index("Id").loc[labels["Id"]]
            mse, aucs = [], []
            for col in PATHOLOGIES:
                t = labels[col].to_numpy(float)
                m = ~np.isnan(t)
                mse.append(np.mean((pred[col].to_numpy(float)[m] - t[m]) ** 2))
                aucs.append(evaluation.auc(pred[col].to_numpy(float)[m], t[m]))
            rows.append({"option": name, "test_macro_mse": float(np.mean(mse)), "test_macro_auc": float(np.nanmean(aucs))})
    print("\n" + format_table(rows, ["option", "test_macro_mse", "test_macro_auc"]))


if __name__ == "__main__":
    main()
