"""Benchmark the patient-grouped bootstrap AUC: evaluation's vectorised weighted Mann-Whitney against
scikit-learn's roc_auc_score with the resample's counts as sample weights.

    python benchmarks/bench_bootstrap.py [--rows 20000] [--resamples 1000] [--pathologies 9]
                                         [--images-per-patient 3.5] [--seed 0]

Synthetic predictions and labels of the size of a real evaluation (positives, negatives, uncertain
0 and blanks, outputs rounded to 3 decimals so that scores tie); the same resamples for both. Prints
the seconds of each way for the AUCs of every resample and pathology, their ratio, and the largest
difference between the two AUCs (they are the same statistic).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from common import run_cli  # noqa: E402
from evaluation import BOOT_CHUNK, _auc_levels, _patient_counts, _weighted_auc  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000, help="images")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--pathologies", type=int, default=9, help="label columns")
    p.add_argument("--images-per-patient", type=float, default=3.5, help="mean images per patient")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.rows, args.resamples, args.pathologies) < 1 or args.images_per_patient < 1:
        p.error("--rows, --resamples, --pathologies must be at least 1, --images-per-patient at least 1")
    return args


def sklearn_aucs(counts: np.ndarray, score: np.ndarray, target: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(B,) AUC per resample by roc_auc_score, each row weighted by its patient's count; NaN where a
    resample has no weighted positive or negative."""
    keep = (target == 1) | (target == -1)
    s, pos, g = score[keep], target[keep] == 1, codes[keep]
    out = np.full(len(counts), np.nan)
    for b, c in enumerate(counts):
        w = c[g]
        if w[pos].sum() > 0 and w[~pos].sum() > 0:
            out[b] = roc_auc_score(pos, s, sample_weight=w)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n_patients = max(1, int(args.rows / args.images_per_patient))
    codes = np.sort(rng.integers(0, n_patients, args.rows))
    target = rng.choice([1.0, 0.0, -1.0, np.nan], (args.rows, args.pathologies), p=[0.15, 0.05, 0.5, 0.3])
    score = np.round(np.clip(0.3 * np.nan_to_num(target) + rng.normal(0, 0.5, target.shape), -1, 1), 3)
    levels = [_auc_levels(score[:, k], target[:, k], codes) for k in range(args.pathologies)]
    boot = np.random.default_rng(args.seed + 1)
    chunks = [_patient_counts(boot, n_patients, min(BOOT_CHUNK, args.resamples - i)).astype(np.float64)
              for i in range(0, args.resamples, BOOT_CHUNK)]

    t0 = time.perf_counter()
    fast = np.concatenate([np.stack([_weighted_auc(c, *lv) for lv in levels], 1) for c in chunks])
    t1 = time.perf_counter()
    slow = np.concatenate([np.stack([sklearn_aucs(c, score[:, k], target[:, k], codes)
                                     for k in range(args.pathologies)], 1) for c in chunks])
    t2 = time.perf_counter()
    diff = float(np.nanmax(np.abs(fast - slow)))
    print(f"{args.rows} rows, {n_patients} patients, {args.resamples} resamples, {args.pathologies} pathologies")
    print(f"vectorised _weighted_auc: {t1 - t0:.2f} s")
    print(f"sklearn roc_auc_score:    {t2 - t1:.2f} s ({(t2 - t1) / (t1 - t0):.1f}x)")
    print(f"largest AUC difference:   {diff:.2e}")
    return {"vectorised_s": t1 - t0, "sklearn_s": t2 - t1, "max_diff": diff}


if __name__ == "__main__":
    sys.exit(run_cli(main))
