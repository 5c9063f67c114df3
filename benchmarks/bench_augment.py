"""What on-device augmentation (train.py --augment) costs, on CPU by default.

    python benchmarks/bench_augment.py --work /tmp/bench_augment [--image-size 64] [--batch-size 16] [--pairs 3]

1. per batch: augment.augment_batch for each preset against the model's forward + backward + AdamW
   step on the same uint8 batch (median of --reps timings each).
2. per step, interleaved: the model step alone and 'augment_batch standard + the model step',
   alternating step by step (--step-pairs pairs), so that load from other processes hits both alike;
   the ratio of the medians and the quartiles of the per-pair ratios.
3. per epoch: train.py --pathology Cardiomegaly on the demo data with --augment none and with
   --augment standard, interleaved (none, standard, none, standard, ...) so that other load on the
   machine hits both alike; history.csv's train_seconds (the training loop) of every epoch.
Prints the tables and the ratio standard / none with its spread over the pairs, and the ratio of the
fastest epochs (the least disturbed by other load). No assertions.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from model import masked_mse  # noqa: E402
from augment import AUGMENT_PRESETS, augment_batch
from common import format_table
from demo import ensure_demo  # noqa: E402
from model import build_model, model_config  # noqa: E402


def timed(fn, device: str) -> float:
    """Seconds fn() takes, the device synchronised on both sides."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_ms(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    return 1000 * statistics.median(timed(fn, device) for _ in range(reps))


def per_batch(size: int, batch_size: int, reps: int, device: str) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch_size, 1, size, size), dtype=torch.uint8, device=device)
    model = build_model(model_config(["Cardiomegaly"])).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    y, mask = torch.zeros(batch_size, 1, device=device), torch.ones(batch_size, 1, dtype=torch.bool, device=device)

    def step():
        loss = masked_mse(model(x), y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step_ms = median_ms(step, max(3, reps // 10), device)
    rows = [{"what": "model step (fwd + bwd + AdamW)", "ms_per_batch": step_ms, "vs_step": 1.0}]
    for name in AUGMENT_PRESETS:
        ms = median_ms(lambda: augment_batch(x, name), reps, device)
        rows.append({"what": f"augment_batch {name}", "ms_per_batch": ms, "vs_step": ms / step_ms})
    return rows, step


def interleaved_steps(step, size: int, batch_size: int, pairs: int, device: str) -> tuple[list[float], list[float]]:
    """Seconds of (model step) and (augment_batch standard, then the model step), alternating."""
    x = torch.randint(0, 256, (batch_size, 1, size, size), dtype=torch.uint8, device=device)
    plain, augmented = [], []
    for _ in range(pairs):
        for out, fn in ((plain, lambda: step()), (augmented, lambda: (augment_batch(x, "standard"), step()))):
            out.append(timed(fn, device))
    return plain, augmented


def epoch_seconds(work: Path, root: Path, preset: str, run: int, args) -> list[float]:
    out = work / f"ckpt_{preset}_{run}"
    train.main(["--data-root", str(root), "--cache-dir", str(work / "cache"), "--out-dir", str(out),
                "--pathology", "Cardiomegaly", "--epochs", str(args.epochs), "--patience", "0",
                "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--weights", "none",
                "--workers", "1", "--device", args.device, "--no-progress", "--augment", preset])
    return pd.read_csv(out / "cardiomegaly" / "history.csv")["train_seconds"].tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--pairs", type=int, default=3, help="(none, standard) training runs, interleaved")
    p.add_argument("--reps", type=int, default=50, help="timings per augmentation preset")
    p.add_argument("--step-pairs", type=int, default=40, help="(step, augment + step) pairs, interleaved")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    rows, step = per_batch(args.image_size, args.batch_size, args.reps, args.device)
    print(format_table([{**r, "ms_per_batch": round(r["ms_per_batch"], 2), "vs_step": round(r["vs_step"], 4)}
                        for r in rows], ["what", "ms_per_batch", "vs_step"]), flush=True)
    plain, augmented = interleaved_steps(step, args.image_size, args.batch_size, args.step_pairs, args.device)
    q = statistics.quantiles([a / b for a, b in zip(augmented, plain)], n=4)
    print(f"\nstep, interleaved x{args.step_pairs}: median {1000 * statistics.median(plain):.1f} ms plain, "
          f"{1000 * statistics.median(augmented):.1f} ms with augment_batch standard: ratio of medians "
          f"{statistics.median(augmented) / statistics.median(plain):.3f}, per-pair ratio quartiles "
          f"{q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}", flush=True)

    root = ensure_demo(args.work / "demo_data")
    runs = []
    for i in range(args.pairs):
        for preset in ("none", "standard"):
            for epoch, s in enumerate(epoch_seconds(args.work, root, preset, i, args), 1):
                runs.append({"pair": i + 1, "augment": preset, "epoch": epoch, "train_seconds": s})
    print("\n" + format_table(runs, ["pair", "augment", "epoch", "train_seconds"]))
    df = pd.DataFrame(runs)
    per_pair = df.groupby(["pair", "augment"])["train_seconds"].sum().unstack()
    ratios = (per_pair["standard"] / per_pair["none"]).tolist()
    print(f"\nepoch time, --augment standard / none, per pair: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"mean {statistics.mean(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f} (target <= 1.10)")
    fastest = df.groupby("augment")["train_seconds"].min()
    print(f"train seconds per epoch, mean: none {df[df.augment == 'none'].train_seconds.mean():.2f}, "
          f"standard {df[df.augment == 'standard'].train_seconds.mean():.2f}; fastest epoch: none "
          f"{fastest['none']:.2f}, standard {fastest['standard']:.2f}, ratio {fastest['standard'] / fastest['none']:.3f}")
    print(f"{args.image_size}px, batch {args.batch_size}, {args.epochs} epochs x {args.pairs} pairs, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
