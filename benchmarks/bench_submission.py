"""Benchmark make_submission.py: test images per second for K = 1 and K = 9 per-pathology models.

    python benchmarks/bench_submission.py [--models 1 9] [--image-size 64] [--test-patients 60]
                                          [--batch-size 64] [--device cpu] [--repeat R] [--tta flip]

Makes a small demo dataset (make_demo: 320 x 384 JPEGs, frontal and lateral) in a temporary folder,
and for each K, K random-init ResNet-50 checkpoints (one per pathology, made without training; the
cost of a forward pass does not depend on the weights). Then runs make_submission.main on every
test image (test_labels.csv: all of them, Id and Path):
  - the decode pass once (a cold cache: the first run), reported on its own;
  - each K with the cache warm: the predict loop alone (K forward passes per image) and the whole
    run (checkpoint loading, routing, checks and the CSV included).
The target shape is time ~ one decode pass + K forward passes: predict seconds per image should
grow about K-fold, the decode pass not at all. With --repeat R each number is the fastest of R runs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import format_table, run_cli
from dataset import PATHOLOGIES
from demo import make_demo  # noqa: E402


def make_checkpoints(folder: Path, k: int, image_size: int) -> Path:
    """K per-pathology checkpoints (the first K submission columns) under folder/<slug>/best.pt."""
    import torch
    from dataset import slug
    from model import IMAGE_MEAN, IMAGE_STD
    from model import Checkpoint, build_model, model_config
    for i, name in enumerate(PATHOLOGIES[:k]):
        torch.manual_seed(i)
        Checkpoint.of(build_model(model_config([name])), view="all", epoch=1,
                      preprocess={"image_size": image_size, "square": "resize", "mean": IMAGE_MEAN,
                                  "std": IMAGE_STD, "uncertain": "keep"}).save(folder / slug(name) / "best.pt")
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=int, nargs="+", default=[1, 9], help="values of K (1-9)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--test-patients", type=int, default=60, help="demo test patients (about 1.9 images each)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tta", choices=["none", "flip"], default="none")
    p.add_argument("--repeat", type=int, default=1, help="take the fastest of this many warm runs")
    p.add_argument("--workers", type=int, default=1, help="decoding processes for the cold-cache run")
    args = p.parse_args(argv)
    if not all(1 <= k <= len(PATHOLOGIES) for k in args.models):
        p.error(f"--models must be between 1 and {len(PATHOLOGIES)}")

    import torch
    import make_submission
    work = Path(tempfile.mkdtemp(prefix="bench_submission_"))
    try:
        root = make_demo(work / "data", n_train_patients=5, n_test_patients=args.test_patients, progress=False)
        csv = root / "student_labels" / "test_labels.csv"

        def submit(ckpts: Path) -> dict:
            argv = ["--data-root", str(root), "--test-csv", str(csv), "--checkpoints", str(ckpts),
                    "--out", str(work / "submission.csv"), "--cache-dir", str(work / "cache"),
                    "--batch-size", str(args.batch_size), "--device", args.device, "--tta", args.tta,
                    "--workers", str(args.workers), "--fill-missing", "0", "--no-progress"]
            with contextlib.redirect_stdout(io.StringIO()):  # the summary table is not the point here
                return make_submission.main(argv)

        rows = []
        for k in args.models:
            ckpts = make_checkpoints(work / f"ckpt{k}", k, args.image_size)
            if not (work / "cache").exists():
                cold = submit(ckpts)
                n = cold["n_images"]
                rows.append({"run": "decode pass (cold cache, once)", "K": "-", "seconds": cold["seconds"]["decode"],
                             "img/s": n / cold["seconds"]["decode"]})
            best = min((submit(ckpts) for _ in range(args.repeat)), key=lambda r: r["seconds"]["total"])
            pred, total = best["seconds"]["predict"], best["seconds"]["total"]
            rows.append({"run": "predict loop (warm cache)", "K": k, "seconds": pred, "img/s": n / pred,
                         "model-img/s": n * k / pred})
            rows.append({"run": "whole run (warm cache)", "K": k, "seconds": total, "img/s": n / total})
            shutil.rmtree(ckpts)
        print(format_table(rows, ["run", "K", "seconds", "img/s", "model-img/s"]))
        print(f"\n{n} test images (demo JPEGs 320 x 384, frontal and lateral) at {args.image_size} px, batch "
              f"{args.batch_size}, tta {args.tta}, device {args.device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} usable CPUs, "
              f"fastest of {args.repeat} warm run(s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
