"""Training-loop overhead and multi-head cost, on CPU by default.

    python benchmarks/bench_train.py --work /tmp/bench_train [--image-size 64] [--batch-size 32]

1. bare: the same model's forward + backward + AdamW step over images already in memory (uint8,
   as the loader delivers them), batch after batch: the floor for one epoch.
2. train.py --pathology Cardiomegaly: its training images/s in epoch 2 (history.csv
   train_images_per_s: loader, sampler, transfer, loss bookkeeping and progress bar included),
   and the whole epoch with validation and checkpoint writes (history.csv seconds).
3. train.py --pathology all --multi-head: training images/s, i.e. the cost of nine heads instead
   of one on every image.
Prints images/s for each and the ratios.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from model import masked_mse  # noqa: E402
from common import format_table
from demo import ensure_demo  # noqa: E402
from model import build_model, model_config  # noqa: E402


def bare_images_per_s(n: int, size: int, batch_size: int, device: str, heads: int = 1) -> float:
    torch.manual_seed(0)
    names = ["Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Edema", "Pneumonia", "Fracture",
             "Support Devices", "No Finding", "Pleural Other"][:heads]
    model = build_model(model_config(names, "mlp", 512, 0.2)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    x = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8)
    y = torch.rand(n, heads) * 2 - 1
    mask = torch.ones_like(y, dtype=torch.bool)

    def step(i):
        pred = model(x[i:i + batch_size].to(device))
        loss = masked_mse(pred, y[i:i + batch_size].to(device), mask[i:i + batch_size].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for i in range(0, 2 * batch_size, batch_size):  # warm-up
        step(i)
    t0 = time.time()
    for i in range(0, n, batch_size):
        step(i)
    return n / (time.time() - t0)


def run_train(work: Path, root: Path, extra: list[str], size: int, batch_size: int, device: str) -> dict:
    out = work / ("multi" if "--multi-head" in extra else "single")
    train.main(["--data-root", str(root), "--cache-dir", str(work / "cache"), "--out-dir", str(out), "--epochs", "2",
                "--patience", "0", "--image-size", str(size), "--batch-size", str(batch_size), "--weights", "none",
                "--device", device, "--no-progress", *extra])
    folder = next(p for p in out.iterdir() if (p / "history.csv").is_file())
    return pd.read_csv(folder / "history.csv").iloc[-1].to_dict()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    root = ensure_demo(args.work / "demo_data")
    single = run_train(args.work, root, ["--pathology", "Cardiomegaly"], args.image_size, args.batch_size, args.device)
    multi = run_train(args.work, root, ["--pathology", "all", "--multi-head"], args.image_size, args.batch_size, args.device)
    n = int(round(single["train_images_per_s"] * single["train_seconds"]))
    bare1 = bare_images_per_s(n, args.image_size, args.batch_size, args.device, heads=1)
    bare9 = bare_images_per_s(n, args.image_size, args.batch_size, args.device, heads=9)
    rows = [
        {"run": "bare fwd+bwd, 1 head", "images_per_s": bare1},
        {"run": "bare fwd+bwd, 9 heads", "images_per_s": bare9},
        {"run": "train.py Cardiomegaly (training)", "images_per_s": single["train_images_per_s"]},
        {"run": "train.py Cardiomegaly (whole epoch)", "images_per_s": n / single["seconds"]},
        {"run": "train.py --multi-head all (training)", "images_per_s": multi["train_images_per_s"]},
    ]
    print(format_table([{**r, "images_per_s": round(r["images_per_s"], 1)} for r in rows], ["run", "images_per_s"]))
    print(f"\ntrain.py training loop / bare: {bare1 / single['train_images_per_s']:.3f}x the time per image "
          f"(whole epoch incl. validation and checkpoints: {bare1 / (n / single['seconds']):.3f}x)")
    print(f"multi-head (9 heads) / single head, train.py: {single['train_images_per_s'] / multi['train_images_per_s']:.3f}x "
          f"the time per image; nine separate models: 9x")
    print(f"images: {n} per epoch, {args.image_size}px, batch {args.batch_size}, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
