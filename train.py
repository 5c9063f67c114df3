"""Train one regression model per pathology (or one shared-backbone model for several).

    python train.py --pathology Cardiomegaly                      # demo data, a few minutes on CPU
    python train.py --pathology all --data-root /data/cs156b --epochs 10
    torchrun --nproc_per_node 4 train.py --pathology all --data-root /data/cs156b

For each pathology it writes OUT_DIR/<slug>/{best.pt, last.pt, history.csv, summary.json}. Loss:
masked MSE on the [-1, 1] label scale (blank labels never enter it). A WeightedRandomSampler with
inverse-frequency weights balances the label values; a calibration map fitted on the validation
split afterwards returns the outputs to the natural distribution that the MSE metric is taken on.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, WeightedRandomSampler
from tqdm import tqdm

from dataset import (AUGMENT_PRESETS, IMAGE_MEAN, IMAGE_STD, SQUARE_MODES, UNCERTAIN_POLICIES, ALL_LABELS, UserError,
                     XrayDataset, adjust_contrast, augment_batch, cached_table, check_pathologies, default_workers,
                     find_augmented, flip_images, format_table, read_train_csv, resolve_data, run_cli, slug,
                     split_by_patient, write_text)
from model import (CALIBRATIONS, HEAD_VARIANTS, N_STAGES, apply_calibration, build_model, fit_calibration,
                   load_pretrained, model_config, read_checkpoint, save_checkpoint, set_frozen)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_mse", "val_mse_cal", "const_mse", "val_auc", "lr", "seconds",
                   "train_seconds", "train_images_per_s"]
TABLE_COLUMNS = ["pathology", "view", "n_train", "n_val", "best_epoch", "val_mse", "val_mse_cal", "const_mse", "val_auc"]
DEMO_DEFAULTS = {"image_size": 64, "epochs": 3, "weights": "none", "batch_size": 16, "augment": "none"}
REAL_DEFAULTS = {"image_size": 224, "epochs": 10, "weights": "imagenet", "batch_size": 32, "augment": "none"}
ONLINE_AUGMENTS = ("flip", "contrast")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pathology", nargs="+", required=True, metavar="NAME",
                   help=f"one or more of: {', '.join(ALL_LABELS)}; or 'all' (quote names with spaces)")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", type=Path, help="dataset root; none: the demo dataset in ./demo_data, made on first use")
    g.add_argument("--train-csv", type=Path, help="training CSV (default DATA_ROOT/student_labels/train2023.csv)")
    g.add_argument("--image-size", type=int, help="side of the square input, px (default 224; 64 on the demo data)")
    g.add_argument("--square", choices=SQUARE_MODES, default="resize", help="how non-square images are made square")
    g.add_argument("--cache-dir", type=Path, default=Path("cache"), help="image cache folder (never under the data root)")
    g.add_argument("--workers", type=int, default=default_workers(), help="processes that build the image cache")
    g.add_argument("--loader-workers", type=int, help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    g.add_argument("--view", choices=["all", "frontal", "lateral"], default="all", help="train on the rows of this view only")
    g.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="keep",
                   help="uncertain labels (0): keep as 0, ignore (mask), ones (-> 1), zeros (-> -1)")
    g.add_argument("--val-frac", type=float, default=0.2, help="fraction of patients held out for validation")
    g.add_argument("--augmented", nargs="+", default=[], metavar="NAME",
                   help="add offline-augmented copies built by experiments/ (flip, contrast) as training samples")
    g.add_argument("--augment", choices=list(AUGMENT_PRESETS), metavar="PRESET",
                   help=f"per-sample augmentation of each training batch on the device, one of "
                   f"{', '.join(AUGMENT_PRESETS)} (see dataset.augment_batch; default {REAL_DEFAULTS['augment']})")
    g.add_argument("--online-augment", nargs="+", default=[], choices=ONLINE_AUGMENTS,
                   help="older: flip / contrast x1.5 on a random half of each batch on the device; prefer --augment")
    g = p.add_argument_group("model")
    g.add_argument("--weights", default=None, help="imagenet, none or PATH to a ResNet-50 state dict "
                   "(default imagenet; none on the demo data)")
    g.add_argument("--hidden", type=int, default=512, help="hidden units of the MLP head")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout in the MLP head")
    g.add_argument("--head", choices=["auto", *HEAD_VARIANTS], default="auto",
                   help="head variant; auto = 'regularized' (<=128 units, dropout >=0.5) for Fracture, else mlp")
    g.add_argument("--multi-head", action=argparse.BooleanOptionalAction, default=False,
                   help="one shared backbone with a head per pathology, trained in one pass")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="epochs (default 10; 3 on the demo data)")
    g.add_argument("--batch-size", type=int, help="per process (default 32; 16 on the demo data, for more steps)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--schedule", choices=["cosine", "plateau"], default="cosine",
                   help="after warm-up: cosine decay per step, or halve on a validation-loss plateau")
    g.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warm-up length, in epochs")
    g.add_argument("--freeze", type=int, help=f"backbone stages frozen at the start (0-{N_STAGES}: stem, layer1..4; "
                   "default 2 with pretrained weights, 0 with --weights none: frozen random filters learn nothing)")
    g.add_argument("--unfreeze-epoch", type=int, default=1, help="epoch (0-based) from which every stage trains")
    g.add_argument("--sampler", action=argparse.BooleanOptionalAction, default=True,
                   help="WeightedRandomSampler with inverse-frequency weights over the label values")
    g.add_argument("--calibration", choices=CALIBRATIONS, default="affine",
                   help="monotone map fitted on the validation split after each epoch, stored in the checkpoint")
    g.add_argument("--patience", type=int, default=3, help="early stopping on validation loss; 0 turns it off")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="carry on from OUT_DIR/<slug>/last.pt up to --epochs")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output and device")
    g.add_argument("--out-dir", type=Path, default=Path("checkpoints"))
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="autocast on CUDA (bf16 where supported)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    args = p.parse_args(argv)

    defaults = DEMO_DEFAULTS if args.data_root is None else REAL_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.freeze is None:
        args.freeze = 0 if args.weights == "none" else 2
    checks = [(args.epochs < 1, f"--epochs must be at least 1, got {args.epochs}"),
              (args.image_size < 32, f"--image-size must be at least 32 (ResNet-50 downsamples 32x), got {args.image_size}"),
              (args.batch_size < 1, f"--batch-size must be at least 1, got {args.batch_size}"),
              (not args.lr > 0, f"--lr must be positive, got {args.lr}"),
              (args.hidden < 1, f"--hidden must be at least 1, got {args.hidden}"),
              (not 0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
              (not 0 <= args.freeze <= N_STAGES, f"--freeze must be between 0 and {N_STAGES}, got {args.freeze}"),
              (args.unfreeze_epoch < 0, f"--unfreeze-epoch must be >= 0, got {args.unfreeze_epoch}"),
              (args.patience < 0, f"--patience must be >= 0, got {args.patience}"),
              (args.warmup_epochs < 0, f"--warmup-epochs must be >= 0, got {args.warmup_epochs}"),
              (not 0 < args.val_frac < 1, f"--val-frac must be between 0 and 1, got {args.val_frac}"),
              (args.workers < 1, f"--workers must be at least 1, got {args.workers}"),
              (args.loader_workers is not None and args.loader_workers < 0, "--loader-workers must be >= 0"),
              (args.weights not in ("imagenet", "none") and not Path(args.weights).is_file(),
               f"--weights {args.weights!r} is not imagenet, none or an existing file")]
    for bad, message in checks:
        if bad:
            p.error(message)
    try:
        check_pathologies(args.pathology, ALL_LABELS)  # names only; the CSV's columns are checked later
    except UserError as e:
        p.error(str(e))
    return args


# ---------------------------------------------------------------------------------------------
# Runtime: device, distributed rank, autocast

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    amp_dtype: torch.dtype | None = None
    progress: bool = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def log(self, *a):
        if self.main:
            print(*a, flush=True)


def setup_runtime(args, distributed: bool = True) -> Runtime:
    """Pick the device; under torchrun (WORLD_SIZE > 1) join the process group: nccl on GPU, gloo
    on CPU. distributed=False (make_submission.py) stays a single process whatever the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible (try --device cpu)")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    amp = None
    if use_cuda and args.amp:
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Runtime(device, rank, world, amp, args.progress and rank == 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------
# Loss, sampling, metrics

def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (pred - target)^2 over the entries where mask is True; masked entries get no gradient.
    pred, target (B, K) float; mask (B, K) bool. 0 when nothing is labelled."""
    sq = torch.where(mask, (pred - target) ** 2, torch.zeros_like(pred))
    return sq.sum() / mask.sum().clamp(min=1)


def sample_weights(targets: np.ndarray) -> np.ndarray:
    """Inverse-frequency row weights over the label values (-1, 0, 1). targets (N, K), NaN = blank.

    For pathology k, a row with value v gets N_k / (L_k * count_k(v)): N_k labelled rows, L_k values
    present. Each present value then carries the same total weight and the mean weight is 1. A row
    labelled for several pathologies (--multi-head) gets the mean of its weights over them."""
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    w = np.zeros_like(targets)
    for k in range(targets.shape[1]):
        col = targets[:, k]
        labelled = ~np.isnan(col)
        values, counts = np.unique(col[labelled], return_counts=True)
        for v, c in zip(values, counts):
            w[col == v, k] = labelled.sum() / (len(values) * c)
    n = (~np.isnan(targets)).sum(1)
    return np.where(n > 0, w.sum(1) / np.maximum(n, 1), 0.0)


class EpochSampler(Sampler):
    """Batches of indices for one rank. Every rank draws the same sample for an epoch (the same
    seeded generator), then keeps every world-th batch: the distributed form of the weighted draw,
    and with one process exactly the WeightedRandomSampler (or RandomSampler) it wraps."""

    def __init__(self, weights: np.ndarray | None, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        base = (RandomSampler(range(self.n), generator=g) if self.weights is None
                else WeightedRandomSampler(self.weights, self.n, replacement=True, generator=g))
        batches = list(BatchSampler(base, self.batch_size, drop_last=False))
        usable = len(batches) // self.world * self.world if len(batches) >= self.world else len(batches)
        return batches[:usable][self.rank::self.world]  # equal batch counts keep DDP ranks in step

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        n_batches = math.ceil(self.n / self.batch_size)
        return (n_batches // self.world if n_batches >= self.world else n_batches) if self.world > 1 else n_batches


def auc(score: np.ndarray, target: np.ndarray) -> float:
    """Area under the ROC curve of positives (1) against negatives (-1); NaN if either is absent."""
    pos, neg = target == 1, target == -1
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    keep = pos | neg
    ranks = pd.Series(score[keep]).rank().to_numpy()  # ties share their mean rank
    return float((ranks[pos[keep]].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pathology_metrics(pred: np.ndarray, target: np.ndarray, train_mean: float, cal: dict | None) -> dict:
    """Metrics on one pathology's labelled validation rows. pred, target (N,), target NaN = blank."""
    m = ~np.isnan(target)
    p, t = pred[m].astype(np.float64), target[m].astype(np.float64)
    if len(t) == 0:
        return {"n": 0, "val_mse": float("nan"), "val_mse_cal": float("nan"), "const_mse": float("nan"), "val_auc": float("nan")}
    return {"n": int(len(t)), "val_mse": float(np.mean((np.clip(p, -1, 1) - t) ** 2)),
            "val_mse_cal": float(np.mean((apply_calibration(cal, p) - t) ** 2)),
            "const_mse": float(np.mean((train_mean - t) ** 2)), "val_auc": auc(p, t)}


# ---------------------------------------------------------------------------------------------
# The loops

def to_device(batch, rt: Runtime):
    """uint8 images go over as uint8 (pinned, non-blocking on CUDA); the model normalises them there."""
    images, targets, mask = (t.to(rt.device, non_blocking=True) for t in batch)
    if rt.cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets, mask


def online_augment(images: torch.Tensor, names: list[str]) -> torch.Tensor:
    """--online-augment: flip / contrast x1.5 on a random half of the batch, uint8 (B, 1, S, S) on the device."""
    for name in names:
        pick = (torch.rand(len(images)) < 0.5).to(images.device).view(-1, 1, 1, 1)
        changed = flip_images(images) if name == "flip" else adjust_contrast(images, 1.5)
        images = torch.where(pick, changed, images)
    return images


def train_one_epoch(net, loader, optimizer, scheduler, scaler, rt: Runtime, augment: list[str], desc: str,
                    preset: str = "none") -> float:
    """One pass over the loader; returns the mean masked MSE over labelled entries (all ranks).
    preset: the --augment preset applied to each uint8 batch on the device before the forward pass."""
    net.train()
    total = torch.zeros(2, device=rt.device)  # sum of squared errors, labelled entries
    for batch in tqdm(loader, desc=desc, leave=False, disable=not rt.progress, dynamic_ncols=True):
        images, targets, mask = to_device(batch, rt)
        if augment:
            images = online_augment(images, augment)
        images = augment_batch(images, preset)  # 'none' returns the batch itself
        with rt.autocast():
            pred = net(images)
        loss = masked_mse(pred.float(), targets, mask)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        total += torch.stack([loss.detach() * mask.sum(), mask.sum()])  # no .item(): no sync per step
    if rt.world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def predict(model, dataset: XrayDataset, batch_size: int, rt: Runtime) -> np.ndarray:
    """Raw predictions (N, K) for every item of dataset, in order. Under torchrun each rank predicts
    every world-th batch and the pieces are gathered, so all ranks return the full array."""
    model.eval()
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    mine = batches[rt.rank::rt.world]
    loader = DataLoader(dataset, batch_size=None, sampler=mine, pin_memory=rt.cuda)
    preds = []
    for batch in tqdm(loader, desc="validating", leave=False, disable=not rt.progress, dynamic_ncols=True):
        images, _, _ = to_device(batch, rt)
        with rt.autocast():
            preds.append(model(images).float().cpu())
    out = torch.cat(preds).numpy() if preds else np.zeros((0, len(model.pathologies)), np.float32)
    if rt.world > 1:
        pieces = [None] * rt.world
        dist.all_gather_object(pieces, ([i for b in mine for i in b], out))
        full = np.zeros((len(dataset), out.shape[1]), np.float32)
        for idx, p in pieces:
            full[idx] = p
        out = full
    return out


def evaluate(model, dataset: XrayDataset, targets: np.ndarray, train_means: np.ndarray, names: list[str],
             calibration: str, batch_size: int, rt: Runtime) -> dict:
    """Validation: per-pathology metrics with a calibration map fitted on these predictions, their
    plain means over pathologies (macro), and the loss that early stopping watches: the MSE over
    all labelled entries of what make_submission.py would write (calibrated, clipped outputs)."""
    pred = predict(model, dataset, batch_size, rt)
    mask = ~np.isnan(targets)
    per, cals = {}, {}
    for k, name in enumerate(names):
        m = mask[:, k]
        cals[name] = fit_calibration(calibration, pred[m, k], targets[m, k], prior=float(train_means[k]))
        per[name] = pathology_metrics(pred[:, k], targets[:, k], float(train_means[k]), cals[name])
    n = sum(per[x]["n"] for x in names)
    loss = sum(per[x]["val_mse_cal"] * per[x]["n"] for x in names if per[x]["n"]) / n if n else float("nan")
    macro = {key: float(np.nanmean([per[x][key] for x in names])) if n else float("nan")
             for key in ("val_mse", "val_mse_cal", "const_mse", "val_auc")}
    return {"val_loss": loss, **macro, "per_pathology": per, "calibration": cals}


# ---------------------------------------------------------------------------------------------
# One training job: one model (one pathology, or several with --multi-head)

def make_scheduler(optimizer, args, steps_per_epoch: int):
    if args.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch)) if args.warmup_epochs > 0 else 0
    total = max(1, args.epochs * steps_per_epoch)

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (Path, torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def write_history(path: Path, rows: list[dict]) -> None:
    def text():
        buf = io.StringIO()
        w = csv.DictWriter(buf, HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    write_text(path, text())


def read_history(path: Path, before_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    df = pd.read_csv(path)
    return [r for r in df.to_dict("records") if r["epoch"] <= before_epoch]


class GracefulExit:
    """SIGTERM (SLURM's warning before a kill, `scancel`) is treated like Ctrl-C: last.pt is saved.
    Signal handlers can only be set from the main thread; elsewhere this does nothing."""

    def __enter__(self):
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        return self

    def _raise(self, signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGTERM, self.old)


def train_job(names: list[str], folder: str, table: pd.DataFrame, is_val: np.ndarray, sources: list, args,
              rt: Runtime) -> dict | None:
    """Train one model for `names` on the rows labelled for any of them; returns its summary."""
    out = args.out_dir / folder
    targets_all = table[names].to_numpy(np.float32)
    labelled = ~np.isnan(targets_all).all(1)
    if args.view != "all":
        labelled &= (table["view"] == args.view).to_numpy()
    tr, va = np.flatnonzero(labelled & ~is_val), np.flatnonzero(labelled & is_val)
    label = " + ".join(names) if len(names) <= 3 else f"{len(names)} pathologies"
    if len(tr) == 0 or len(va) == 0:
        rt.log(f"skipping {label} (view {args.view}): {len(tr)} training and {len(va)} validation rows are labelled")
        return None
    train_t, val_t = targets_all[tr], targets_all[va]
    train_means = np.array([np.nanmean(train_t[:, k]) if (~np.isnan(train_t[:, k])).any() else 0.0
                            for k in range(len(names))])
    train_set = XrayDataset(sources, table["slot"].to_numpy()[tr], train_t)
    val_set = XrayDataset(sources[:1], table["slot"].to_numpy()[va], val_t)
    weights = np.tile(sample_weights(train_t), len(sources)) if args.sampler else None
    sampler = EpochSampler(weights, len(train_set), args.batch_size, args.seed, rt.rank, rt.world)
    n_workers = args.loader_workers if args.loader_workers is not None else (4 if rt.cuda else 0)
    loader = DataLoader(train_set, batch_size=None, sampler=sampler, num_workers=n_workers, pin_memory=rt.cuda,
                        persistent_workers=n_workers > 0)

    model = build_model(model_config(names, args.head, args.hidden, args.dropout))
    resume = out / "last.pt" if args.resume and (out / "last.pt").is_file() else None
    if resume is None:
        load_pretrained(model, args.weights)
    model.to(rt.device)
    if rt.cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args, len(sampler))
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    stop = {"best_val_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0, "stopped": False}
    history, start = [], 0
    if resume is not None:
        ckpt = read_checkpoint(resume, map_location=rt.device)
        if ckpt["pathologies"] != names:
            raise UserError(f"{resume}: holds {ckpt['pathologies']}, not {names}; use another --out-dir or drop --resume")
        model.load_state_dict(ckpt["state_dict"])
        ts = ckpt["training_state"]
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        scaler.load_state_dict(ts["scaler"])
        stop = ts["early_stopping"]
        set_rng_state(ts["rng"])
        start = ckpt["epoch"]
        history = read_history(out / "history.csv", before_epoch=start)
        rt.log(f"resuming {label} from {resume} after {start} epochs")
        if stop["stopped"] or start >= args.epochs:
            rt.log(f"{label}: already finished ({start} epochs{', early-stopped' if stop['stopped'] else ''})")
            return json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None

    meta = {"view": args.view,
            "preprocess": {"image_size": args.image_size, "square": args.square, "mean": IMAGE_MEAN,
                           "std": IMAGE_STD, "uncertain": args.uncertain},
            "train_config": jsonable(vars(args))}
    per_step = scheduler if args.schedule == "cosine" else None
    net = None
    rt.log(f"training {label} (view {args.view}): {len(tr)} train rows x {len(sources)} sources, {len(va)} val rows, "
           f"{len(names)} head(s), {rt.device}" + (f" x{rt.world}" if rt.world > 1 else ""))
    epoch = start
    completed = start

    def save_last(interrupted=False):
        if rt.main:
            save_checkpoint(out / "last.pt", model, {**meta, "epoch": completed, "metrics": history[-1] if history else {},
                                                     "calibration": best_cal, "interrupted": interrupted},
                            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "early_stopping": dict(stop), "rng": rng_state()})

    best_cal = {}
    if resume is not None and (out / "best.pt").is_file():
        best_cal = read_checkpoint(out / "best.pt").get("calibration", {})
    try:
        with GracefulExit():
            for epoch in range(start, args.epochs):
                frozen = args.freeze if epoch < args.unfreeze_epoch else 0
                if net is None or frozen != model.frozen:
                    set_frozen(model, frozen)
                    net = torch.compile(model) if args.compile else model
                    if rt.world > 1:  # DDP registers the trainable parameters when it wraps
                        net = DDP(net, device_ids=[rt.device.index] if rt.cuda else None)
                sampler.set_epoch(epoch)
                t0 = time.time()
                train_loss = train_one_epoch(net, loader, optimizer, per_step, scaler, rt, args.online_augment,
                                             f"{label} epoch {epoch + 1}/{args.epochs}", args.augment)
                train_seconds = time.time() - t0
                val = evaluate(model, val_set, val_t, train_means, names, args.calibration, args.batch_size, rt)
                if args.schedule == "plateau":
                    scheduler.step(val["val_loss"])
                row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                       "seconds": round(time.time() - t0, 2), "train_seconds": round(train_seconds, 2),
                       "train_images_per_s": round(len(train_set) / train_seconds, 1),
                       **{k: v for k, v in val.items() if k in HISTORY_COLUMNS}}
                history.append(row)
                completed = epoch + 1
                if val["val_loss"] < stop["best_val_loss"]:
                    stop.update(best_val_loss=val["val_loss"], best_epoch=epoch + 1, bad_epochs=0)
                    best_cal = val["calibration"]
                    if rt.main:  # written now, from the weights of this epoch: never a live reference
                        save_checkpoint(out / "best.pt", model, {**meta, "epoch": epoch + 1, "calibration": best_cal,
                                                                  "metrics": jsonable({**row, "per_pathology": val["per_pathology"]})})
                else:
                    stop["bad_epochs"] += 1
                stop["stopped"] = bool(args.patience and stop["bad_epochs"] >= args.patience)
                save_last()
                if rt.main:
                    write_history(out / "history.csv", history)
                rt.log(f"{label} epoch {epoch + 1}/{args.epochs}: train {train_loss:.4f}  val {val['val_loss']:.4f}  "
                       f"mse {val['val_mse']:.4f} -> cal {val['val_mse_cal']:.4f} (const {val['const_mse']:.4f})  "
                       f"auc {val['val_auc']:.4f}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
                       + ("  *" if stop["best_epoch"] == epoch + 1 else ""))
                if stop["stopped"]:
                    rt.log(f"{label}: early stop, no improvement for {args.patience} epochs")
                    break
    except KeyboardInterrupt:
        save_last(interrupted=True)
        rt.log(f"\ninterrupted: saved {out / 'last.pt'} after {completed} complete epochs; "
               f"continue with the same command and --resume")
        raise SystemExit(130)

    best = read_checkpoint(out / "best.pt") if rt.main else None
    if rt.world > 1:
        box = [best["metrics"] if best else None]
        dist.broadcast_object_list(box)
        best_metrics = box[0]
    else:
        best_metrics = best["metrics"]
    summary = {"pathology": names[0] if len(names) == 1 else "multi_head", "pathologies": names, "view": args.view,
               "folder": folder, "n_train": int(len(tr)), "n_val": int(len(va)), "n_sources": len(sources),
               "n_stray_rows": table.attrs.get("n_stray", 0), "n_bad_images": table.attrs.get("n_bad_images", 0),
               "best_epoch": stop["best_epoch"], "epochs_run": completed, "early_stopped": stop["stopped"],
               **{k: best_metrics.get(k) for k in ("val_loss", "val_mse", "val_mse_cal", "const_mse", "val_auc")},
               "per_pathology": best_metrics.get("per_pathology", {}), "config": jsonable(vars(args))}
    for k, name in enumerate(names):
        summary["per_pathology"].setdefault(name, {})["n_train"] = int((~np.isnan(train_t[:, k])).sum())
    if rt.main:
        write_text(out / "summary.json", json.dumps(jsonable(summary), indent=2))
    return summary


def table_rows(summary: dict) -> list[dict]:
    """Final-table rows: one per pathology of a job."""
    rows = []
    for name in summary["pathologies"]:
        per = summary["per_pathology"].get(name, {})
        rows.append({"pathology": name, "view": summary["view"], "n_train": per.get("n_train"), "n_val": per.get("n"),
                     "best_epoch": summary["best_epoch"], **{k: per.get(k) for k in TABLE_COLUMNS[5:]}})
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rt = setup_runtime(args)
    seed_everything(args.seed)
    try:
        if rt.main:
            root, csv_path = resolve_data(args.data_root, args.train_csv, "train2023.csv")
        rt.barrier()  # rank 0 makes the demo data first
        root, csv_path = resolve_data(args.data_root, args.train_csv, "train2023.csv")
        if args.data_root is None:
            rt.log(f"no --data-root: using the demo dataset in {root} ({args.image_size}px, {args.epochs} epochs, "
                   f"batch {args.batch_size}, --weights {args.weights}); see README to train on real data")
        table = read_train_csv(csv_path, args.uncertain)
        names = check_pathologies(args.pathology, table.attrs["labels"])
        # rank 0 builds the cache; the others then find it complete
        if rt.main:
            table, cache = cached_table(table, root, args.image_size, args.cache_dir, csv_path.stem, args.square,
                                        args.workers, progress=rt.progress)
        rt.barrier()
        if not rt.main:
            table, cache = cached_table(table, root, args.image_size, args.cache_dir, csv_path.stem, args.square,
                                        args.workers, progress=False)
        sources = [cache] + [find_augmented(cache, a) for a in args.augmented]
        is_val = split_by_patient(table["patient"], args.val_frac, args.seed)
        jobs = ([(names, slug("multi_head", args.view))] if args.multi_head
                else [([n], slug(n, args.view)) for n in names])
        summaries = [s for s in (train_job(n, f, table, is_val, sources, args, rt) for n, f in jobs) if s]
        if not summaries:
            raise UserError(f"nothing to train: no labelled rows for {', '.join(names)} (view {args.view})")
        rows = [r for s in summaries for r in table_rows(s)]
        if len(rows) > 1:
            rows.append({"pathology": "macro mean", **{k: float(np.nanmean([r[k] if r[k] is not None else np.nan for r in rows]))
                                                       for k in TABLE_COLUMNS[5:]}})
        rt.log("\n" + format_table(rows, TABLE_COLUMNS) + f"\n\ncheckpoints in {args.out_dir}/")
        return summaries
    finally:
        if rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_cli(main))
