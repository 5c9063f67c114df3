"""Train one regression model per pathology (or one shared-backbone model for several).

    python train.py --pathology Cardiomegaly                      # demo data, a few minutes on CPU
    python train.py --pathology all --data-root /data/cs156b --epochs 10
    torchrun --nproc_per_node 4 train.py --pathology all --data-root /data/cs156b

For each pathology it writes OUT_DIR/<slug>/{best.pt, last.pt, history.csv, summary.json, curves.png,
val_predictions.csv}: curves.png redrawn after every epoch; val_predictions.csv (the best epoch's
raw and calibrated validation predictions, one row per validation image and pathology: see
evaluation.PREDICTION_COLUMNS) for experiments/blend.py. best.pt and summary.json record the split
(seed, val_frac, val_patients_sha1: a hash of the validation patients). Loss:
masked MSE on the [-1, 1] label scale (or masked cross-entropy with --head-type three-class; blank
labels never enter it). A WeightedRandomSampler with inverse-frequency weights, bounded by
--sampler-cap, balances the label values; a calibration map fitted on the validation split
afterwards returns the outputs to the natural distribution that the MSE metric is taken on, and its
cross-validated (out-of-sample) score picks best.pt.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, WeightedRandomSampler
from tqdm import tqdm

from augment import AUGMENT_PRESETS, ONLINE_AUGMENTS, augment_batch, online_augment
from cache import SQUARE_MODES, cached_table, find_augmented
from calibration import CALIBRATIONS, apply_calibration, fit_calibration
from common import UserError, default_workers, format_table, jsonable, run_cli, write_text
from dataset import (ALL_LABELS, LABEL_CONVENTIONS, UNCERTAIN_POLICIES, XrayDataset, check_pathologies,
                     describe_convention, read_train_csv, resolve_data, slug, split_by_patient, uncertain_targets)
from evaluation import PREDICTION_COLUMNS, auc, plot_curves
from model import (ARCHS, HEAD_TYPES, HEAD_VARIANTS, N_STAGES, Checkpoint, build_model, load_pretrained, model_config,
                   set_frozen)
from runtime import (GracefulExit, Runtime, close_loader, ignore_sigterm, join_process_group, rng_state,
                     seed_everything, set_rng_state, setup_runtime, to_device)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_mse", "val_mse_cv", "val_mse_cal", "const_mse", "val_auc", "lr",
                   "seconds",
                   "train_seconds", "train_images_per_s"]
TABLE_COLUMNS = ["pathology", "view", "n_train", "n_val", "best_epoch", "val_mse", "val_mse_cv", "val_mse_cal", "const_mse",
                 "val_auc"]
METRIC_KEYS = ("val_mse", "val_mse_cv", "val_mse_cal", "const_mse", "val_auc")
DEMO_DEFAULTS = {"image_size": 64, "epochs": 3, "weights": "none", "batch_size": 16, "augment": "none"}
# augment standard on real data: better test MSE and AUC for 2 of 3 archs on real X-rays (docs/results.md)
REAL_DEFAULTS = {"image_size": 224, "epochs": 10, "weights": "imagenet", "batch_size": 32, "augment": "standard"}
SAMPLER_CAP = 5.0  # see sample_weights, and docs/results.md for the measurement


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
    g.add_argument("--label-convention", choices=LABEL_CONVENTIONS, default="auto",
                   help="how the CSV writes labels: cs156b (0 uncertain, -1 negative), chexpert (Stanford's: "
                   "0 negative, -1 uncertain), or auto: detected from the layout")
    g.add_argument("--val-frac", type=float, default=0.2, help="fraction of patients held out for validation")
    g.add_argument("--augmented", nargs="+", default=[], metavar="NAME",
                   help="add offline-augmented copies built by experiments/ (flip, contrast) as training samples")
    g.add_argument("--augment", choices=list(AUGMENT_PRESETS), metavar="PRESET",
                   help=f"per-sample augmentation of each training batch on the device, one of "
                   f"{', '.join(AUGMENT_PRESETS)} (see dataset.augment_batch; default {REAL_DEFAULTS['augment']}, "
                   f"{DEMO_DEFAULTS['augment']} on the demo data)")
    g.add_argument("--online-augment", nargs="+", default=[], choices=ONLINE_AUGMENTS,
                   help="older: flip / contrast x1.5 on a random half of each batch on the device; prefer --augment")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=list(ARCHS), default="resnet50", help="torchvision backbone")
    g.add_argument("--head-type", choices=HEAD_TYPES, default="regression",
                   help="regression: tanh output, MSE; three-class: softmax over negative/uncertain/positive, "
                   "cross-entropy, predicting p(positive) - p(negative)")
    g.add_argument("--weights", default=None, help="imagenet, none or PATH to a torchvision state dict of --arch, a "
                   "torchxrayvision DenseNet-121 / ResNet-50 state dict or a checkpoint (default imagenet; none on the demo data)")
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
    g.add_argument("--freeze", type=int, help=f"backbone stages frozen at the start (0-{N_STAGES}: stem, then four stages; "
                   "default 2 with pretrained weights, 0 with --weights none: frozen random filters learn nothing)")
    g.add_argument("--unfreeze-epoch", type=int, default=1, help="epoch (0-based) from which every stage trains")
    g.add_argument("--sampler", action=argparse.BooleanOptionalAction, default=True,
                   help="WeightedRandomSampler with inverse-frequency weights over the label values")
    g.add_argument("--sampler-cap", type=float, default=SAMPLER_CAP,
                   help="no row is drawn more than this many times as often as a uniform draw would (0: no bound)")
    g.add_argument("--calibration", choices=CALIBRATIONS, default="affine",
                   help="monotone map fitted on the validation split after each epoch, stored in the checkpoint")
    g.add_argument("--patience", type=int, default=3, help="early stopping on validation loss; 0 turns it off")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="carry on from OUT_DIR/<slug>/last.pt up to --epochs")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output and device")
    g.add_argument("--out-dir", type=Path, default=Path("checkpoints"))
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                    help="autocast on CUDA: bf16 on compute capability 8.0+, else fp16 with a gradient scaler")
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
              (args.image_size < 32, f"--image-size must be at least 32 (every --arch downsamples 32x), got {args.image_size}"),
              (args.batch_size < 1, f"--batch-size must be at least 1, got {args.batch_size}"),
              (not args.lr > 0, f"--lr must be positive, got {args.lr}"),
              (args.hidden < 1, f"--hidden must be at least 1, got {args.hidden}"),
              (not 0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
              (not 0 <= args.freeze <= N_STAGES, f"--freeze must be between 0 and {N_STAGES}, got {args.freeze}"),
              (args.unfreeze_epoch < 0, f"--unfreeze-epoch must be >= 0, got {args.unfreeze_epoch}"),
              (args.patience < 0, f"--patience must be >= 0, got {args.patience}"),
              (not args.sampler_cap >= 0, f"--sampler-cap must be >= 0 (0: no bound), got {args.sampler_cap}"),
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

# ---------------------------------------------------------------------------------------------
# Loss, sampling, metrics

def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (pred - target)^2 over the entries where mask is True; masked entries get no gradient.
    pred, target (B, K) float; mask (B, K) bool. 0 when nothing is labelled."""
    sq = torch.where(mask, (pred - target) ** 2, torch.zeros_like(pred))
    return sq.sum() / mask.sum().clamp(min=1)


def train_loader(dataset: XrayDataset, sampler: Sampler, workers: int | None, rt: Runtime) -> DataLoader:
    """The training loader: whole uint8 batches from the sampler, `workers` processes (None: 4 on
    CUDA, 0 on CPU) that stay up between epochs and ignore SIGTERM, pinned memory on CUDA."""
    workers = workers if workers is not None else (4 if rt.cuda else 0)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=rt.cuda,
                      persistent_workers=workers > 0, worker_init_fn=ignore_sigterm)


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the entries where mask is True; masked entries get no gradient.
    logits (B, K, 3) over (negative, uncertain, positive); target (B, K) in {-1, 0, 1} (anything,
    NaN included, where masked); mask (B, K) bool. 0 when nothing is labelled."""
    cls = torch.where(mask, target, torch.zeros_like(target)).round().clamp(-1, 1).long() + 1
    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), cls.flatten(), reduction="none")
    ce = torch.where(mask, ce.view_as(target), torch.zeros_like(target))
    return ce.sum() / mask.sum().clamp(min=1)


def compute_loss(out: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The training loss of a model's raw outputs: masked MSE for a regression head's (B, K), masked
    cross-entropy for a three-class head's (B, K, 3) logits (the shape says which)."""
    if out.dim() == 3:
        return masked_cross_entropy(out, targets, mask)
    return masked_mse(out.float(), targets, mask)


def sample_weights(targets: np.ndarray, cap: float = 0.0) -> np.ndarray:
    """Inverse-frequency row weights over the label values (-1, 0, 1), bounded. targets (N, K), NaN = blank.

    For pathology k, a row with value v gets N_k / (L_k * count_k(v)): N_k labelled rows, L_k values
    present. Each present value then carries the same total weight and the mean weight is 1 (a
    uniform draw gives every row 1). A row labelled for several pathologies (--multi-head) gets the
    mean of its weights over them. cap > 0 bounds the over-sampling: no row weighs more than cap
    times uniform (the weights are capped and the rest rescaled to mean 1 again, until both hold),
    so a value that is 0.5% of the rows is drawn about cap times per epoch per row, not 67 times."""
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    w = np.zeros_like(targets)
    for k in range(targets.shape[1]):
        col = targets[:, k]
        labelled = ~np.isnan(col)
        values, counts = np.unique(col[labelled], return_counts=True)
        for v, c in zip(values, counts):
            w[col == v, k] = labelled.sum() / (len(values) * c)
    n = (~np.isnan(targets)).sum(1)
    w = np.where(n > 0, w.sum(1) / np.maximum(n, 1), 0.0)
    if cap > 0 and (n > 0).any():
        cap = max(cap, 1.0)  # below uniform no weighting can stay at mean 1
        for _ in range(100):  # water-filling: converges in a few rounds
            w = np.minimum(w, cap)
            w *= (n > 0).sum() / w.sum()
            if w.max() <= cap * (1 + 1e-9):
                break
    return w


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


def pathology_metrics(pred: np.ndarray, target: np.ndarray, train_mean: float, cal: dict | None) -> dict:
    """Metrics on one pathology's labelled validation rows. pred, target (N,), target NaN = blank.

    val_mse: raw outputs; val_mse_cv: calibrated, out of sample (each row scored by a map fitted on
    the other folds: cal['cv_mse']); val_mse_cal: calibrated by the map fitted on these same rows
    (in-sample, optimistic: for reading, never for choosing); const_mse: the training mean's MSE;
    train_mean: that mean (make_submission.py --labels scores the constant predictor with it)."""
    m = ~np.isnan(target)
    p, t = pred[m].astype(np.float64), target[m].astype(np.float64)
    if len(t) == 0:
        return {"n": 0, **{k: float("nan") for k in METRIC_KEYS}, "train_mean": train_mean}
    raw = float(np.mean((np.clip(p, -1, 1) - t) ** 2))
    return {"n": int(len(t)), "val_mse": raw, "val_mse_cv": float(cal["cv_mse"]) if cal else raw,
            "val_mse_cal": float(np.mean((apply_calibration(cal, p) - t) ** 2)),
            "const_mse": float(np.mean((train_mean - t) ** 2)), "val_auc": auc(p, t), "train_mean": train_mean}


# ---------------------------------------------------------------------------------------------
# The loops

def train_one_epoch(net, loader, optimizer, scheduler, scaler, rt: Runtime, augment: list[str], desc: str,
                    preset: str = "none") -> float:
    """One pass over the loader; returns the mean loss (compute_loss) over labelled entries (all ranks).
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
        loss = compute_loss(pred, targets, mask)
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
            preds.append(model.score(model(images)).float().cpu())
    out = torch.cat(preds).numpy() if preds else np.zeros((0, len(model.pathologies)), np.float32)
    if rt.world > 1:
        pieces = [None] * rt.world
        dist.all_gather_object(pieces, ([i for b in mine for i in b], out))
        full = np.zeros((len(dataset), out.shape[1]), np.float32)
        for idx, p in pieces:
            full[idx] = p
        out = full
    return out


def mean_defined(values) -> float:
    """Mean of the values that are defined (not None or NaN); NaN when none is (a pathology without
    both classes has no AUC), without numpy's empty-slice warning."""
    ok = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(ok) / len(ok) if ok else float("nan")


def evaluate(model, dataset: XrayDataset, targets: np.ndarray, train_means: np.ndarray, names: list[str],
             calibration: str, batch_size: int, rt: Runtime) -> dict:
    """Validation: per-pathology metrics with a calibration map fitted on these predictions, their
    plain means over pathologies (macro), and the loss that picks best.pt and early stopping
    watches: the out-of-sample (cross-validated) MSE of the calibrated outputs, the kind of values
    make_submission.py writes, over all labelled entries. "pred" holds the raw predictions (N, K)
    float32 in [-1, 1], in the dataset's order (every rank has them all)."""
    pred = predict(model, dataset, batch_size, rt)
    mask = ~np.isnan(targets)
    per, cals = {}, {}
    for k, name in enumerate(names):
        m = mask[:, k]
        cals[name] = fit_calibration(calibration, pred[m, k], targets[m, k], prior=float(train_means[k]))
        per[name] = pathology_metrics(pred[:, k], targets[:, k], float(train_means[k]), cals[name])
    n = sum(per[x]["n"] for x in names)
    loss = sum(per[x]["val_mse_cv"] * per[x]["n"] for x in names if per[x]["n"]) / n if n else float("nan")
    macro = {key: mean_defined([per[x][key] for x in names]) for key in METRIC_KEYS}
    return {"val_loss": loss, **macro, "per_pathology": per, "calibration": cals, "pred": pred}


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


def write_val_predictions(path: Path, job: Job, pred: np.ndarray, calibration: dict) -> None:
    """val_predictions.csv (evaluation.PREDICTION_COLUMNS), long format: one row per validation image
    and pathology of the model; target on the project's scale, blank = unlabelled; raw the model's
    output (pred (n_val, K) float32 in [-1, 1]); calibrated = apply_calibration(map, raw). Floats are
    written in full, so the calibrated value can be recomputed from the raw one exactly."""
    frames = [job.val_rows.assign(pathology=name, target=job.val_targets[:, k].astype(np.float64),
                                  raw=pred[:, k].astype(np.float64),
                                  calibrated=apply_calibration((calibration or {}).get(name), pred[:, k]))
              for k, name in enumerate(job.names)]
    write_text(path, pd.concat(frames).to_csv(index=False, columns=PREDICTION_COLUMNS, lineterminator="\n"))


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


@dataclass
class Job:
    """What one model trains and validates on: its pathologies, rows and loaders."""
    names: list[str]
    folder: Path          # OUT_DIR/<slug>
    label: str            # for messages
    n_train: int
    n_val: int
    train_targets: np.ndarray  # (n_train, K) float32, NaN = blank
    val_targets: np.ndarray    # (n_val, K)
    train_means: np.ndarray    # (K,) the constant predictor's values
    train_set: XrayDataset
    val_set: XrayDataset
    sampler: EpochSampler
    loader: DataLoader
    val_rows: pd.DataFrame     # (n_val rows) path, patient, study, view: val_predictions.csv's first columns
    split: dict                # {seed, val_frac, val_patients_sha1}, in checkpoints and summary.json

    def n_train_of(self, k: int) -> int:
        """Training rows labelled for pathology k."""
        return int((~np.isnan(self.train_targets[:, k])).sum())


@dataclass
class TrainState:
    """Everything that changes while a job trains, and that last.pt saves for --resume."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    stop: dict              # best_val_loss, best_epoch, bad_epochs, stopped
    history: list[dict]     # history.csv rows
    completed: int = 0      # complete epochs
    best_cal: dict = field(default_factory=dict)  # calibration of best.pt
    net: torch.nn.Module | None = None  # the model as trained (compiled, DDP-wrapped)


def split_record(patients: pd.Series, is_val: np.ndarray, args) -> dict:
    """The split as checkpoints and summary.json record it: seed, val_frac and the sha1 of the sorted
    validation patient ids of the whole split (one line each), so every model trained on one split,
    whatever its pathologies or view, has the same hash (experiments/blend.py checks it)."""
    ids = sorted(str(p) for p in pd.unique(patients[is_val]))
    return {"seed": args.seed, "val_frac": args.val_frac,
            "val_patients_sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest()}


def prepare_job(names: list[str], folder: str, table: pd.DataFrame, is_val: np.ndarray, sources: list, args,
                rt: Runtime) -> Job | None:
    """Pick the rows labelled for any of `names` (and --view) on each side of the split and build
    the loaders; None (with one line) when either side is empty."""
    targets_all = table[names].to_numpy(np.float32)  # source labels: validation scores against these
    train_all = uncertain_targets(targets_all, args.uncertain)  # --uncertain shapes training targets only
    labelled = ~np.isnan(targets_all).all(1)
    if args.view != "all":
        labelled &= (table["view"] == args.view).to_numpy()
    tr, va = np.flatnonzero(labelled & ~np.isnan(train_all).all(1) & ~is_val), np.flatnonzero(labelled & is_val)
    label = " + ".join(names) if len(names) <= 3 else f"{len(names)} pathologies"
    if len(tr) == 0 or len(va) == 0:
        rt.log(f"skipping {label} (view {args.view}): {len(tr)} training and {len(va)} validation rows are labelled")
        return None
    train_t, val_t = train_all[tr], targets_all[va]
    train_means = np.array([np.nanmean(train_t[:, k]) if (~np.isnan(train_t[:, k])).any() else 0.0
                            for k in range(len(names))])
    train_set = XrayDataset(sources, table["slot"].to_numpy()[tr], train_t)
    val_set = XrayDataset(sources[:1], table["slot"].to_numpy()[va], val_t)
    weights = np.tile(sample_weights(train_t, args.sampler_cap), len(sources)) if args.sampler else None
    sampler = EpochSampler(weights, len(train_set), args.batch_size, args.seed, rt.rank, rt.world)
    loader = train_loader(train_set, sampler, args.loader_workers, rt)
    return Job(names, args.out_dir / folder, label, len(tr), len(va), train_t, val_t, train_means, train_set,
               val_set, sampler, loader, val_rows=table.iloc[va][["path", "patient", "study", "view"]].reset_index(drop=True),
               split=split_record(table["patient"], is_val, args))


def build_state(job: Job, args, rt: Runtime) -> TrainState:
    """A fresh model, optimiser and schedule; or, with --resume and a last.pt, all of them as saved
    (the model rebuilt from the checkpoint's own config, so its input normalisation is kept)."""
    resume = job.folder / "last.pt" if args.resume and (job.folder / "last.pt").is_file() else None
    ckpt = Checkpoint.load(resume, map_location=rt.device) if resume else None
    if ckpt is not None and ckpt.pathologies != job.names:
        raise UserError(f"{resume}: holds {ckpt.pathologies}, not {job.names}; use another --out-dir or drop --resume")
    if ckpt is None:
        model = build_model(model_config(job.names, args.head, args.hidden, args.dropout, args.arch, args.head_type))
        source = load_pretrained(model, args.weights)
        rt.log(f"{job.label}: {args.arch}, {args.head_type} head(s), weights {source['source']}"
               + (f" ({args.weights})" if source["source"] not in ("none", "imagenet") else "")
               + f", input normalised with mean {source['mean']:.4g}, std {source['std']:.4g}")
    else:
        model = ckpt.build(rt.device, resume).train()
    model.to(rt.device)
    if rt.cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args, len(job.sampler))
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    state = TrainState(model, optimizer, scheduler, scaler,
                       {"best_val_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0, "stopped": False}, [])
    if ckpt is None:
        return state
    ts = ckpt.training_state
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    scaler.load_state_dict(ts["scaler"])
    set_rng_state(ts["rng"])
    state.stop, state.completed = ts["early_stopping"], ckpt.epoch
    state.history = read_history(job.folder / "history.csv", before_epoch=ckpt.epoch)
    if (job.folder / "best.pt").is_file():
        state.best_cal = Checkpoint.load(job.folder / "best.pt").calibration
    rt.log(f"resuming {job.label} from {resume} after {ckpt.epoch} epochs")
    return state


def checkpoint_of(state: TrainState, args, epoch: int, metrics: dict, **values) -> Checkpoint:
    return Checkpoint.of(state.model, view=args.view, epoch=epoch, metrics=metrics, calibration=state.best_cal,
                         preprocess={"image_size": args.image_size, "square": args.square,
                                     "mean": state.model.config["mean"], "std": state.model.config["std"],
                                     "uncertain": args.uncertain,
                                     "label_convention": args.label_convention},
                         train_config=jsonable(vars(args)), **values)


def save_last(job: Job, state: TrainState, args, rt: Runtime, interrupted: bool = False) -> None:
    """last.pt: the weights after state.completed epochs and everything --resume needs."""
    if rt.main:
        training_state = {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                          "scaler": state.scaler.state_dict(), "early_stopping": dict(state.stop), "rng": rng_state()}
        checkpoint_of(state, args, state.completed, state.history[-1] if state.history else {}, split=job.split,
                      interrupted=interrupted, training_state=training_state).save(job.folder / "last.pt")


def prepare_epoch(state: TrainState, job: Job, epoch: int, args, rt: Runtime) -> None:
    """Freeze the stages this epoch keeps frozen; (re)wrap the model when that changes, since DDP
    registers the trainable parameters when it wraps."""
    frozen = args.freeze if epoch < args.unfreeze_epoch else 0
    if state.net is None or frozen != state.model.frozen:
        set_frozen(state.model, frozen)
        state.net = torch.compile(state.model) if args.compile else state.model
        if rt.world > 1:
            state.net = DDP(state.net, device_ids=[rt.device.index] if rt.cuda else None)
    job.sampler.set_epoch(epoch)


def end_epoch(state: TrainState, job: Job, epoch: int, train_loss: float, train_seconds: float, seconds: float,
              val: dict, args, rt: Runtime) -> None:
    """Record the epoch: history row, early-stopping state, best.pt and val_predictions.csv when it
    improved, last.pt, history.csv, curves.png, log line."""
    if args.schedule == "plateau":
        state.scheduler.step(val["val_loss"])
    row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": state.optimizer.param_groups[0]["lr"],
           "seconds": round(seconds, 2), "train_seconds": round(train_seconds, 2),
           "train_images_per_s": round(len(job.train_set) / train_seconds, 1),
           **{k: v for k, v in val.items() if k in HISTORY_COLUMNS}}
    state.history.append(row)
    state.completed = epoch + 1
    stop = state.stop
    if val["val_loss"] < stop["best_val_loss"]:
        stop.update(best_val_loss=val["val_loss"], best_epoch=epoch + 1, bad_epochs=0)
        state.best_cal = val["calibration"]
        if rt.main:  # written now, from the weights of this epoch: never a live reference
            per = {name: {**val["per_pathology"][name], "n_train": job.n_train_of(k)}
                   for k, name in enumerate(job.names)}
            checkpoint_of(state, args, epoch + 1, jsonable({**row, "per_pathology": per}), split=job.split
                          ).save(job.folder / "best.pt")
            write_val_predictions(job.folder / "val_predictions.csv", job, val["pred"], val["calibration"])
    else:
        stop["bad_epochs"] += 1
    stop["stopped"] = bool(args.patience and stop["bad_epochs"] >= args.patience)
    if rt.main:  # history first: a kill between the two leaves rows that resume drops, never a gap
        write_history(job.folder / "history.csv", state.history)
        plot_curves(state.history, job.folder / "curves.png", f"{job.label} (view {args.view})")  # about 0.2 s
    save_last(job, state, args, rt)
    rt.log(f"{job.label} epoch {epoch + 1}/{args.epochs}: train {train_loss:.4f}  val {val['val_loss']:.4f}  "
           f"mse {val['val_mse']:.4f} -> cal {val['val_mse_cv']:.4f} out of sample, {val['val_mse_cal']:.4f} in "
           f"(const {val['const_mse']:.4f})  "
           f"auc {val['val_auc']:.4f}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
           + ("  *" if stop["best_epoch"] == epoch + 1 else ""))
    if stop["stopped"]:
        rt.log(f"{job.label}: early stop, no improvement for {args.patience} epochs")


def run_epochs(state: TrainState, job: Job, args, rt: Runtime) -> None:
    """Train from state.completed up to --epochs (or an early stop). Ctrl-C or SIGTERM saves last.pt
    (after the epochs completed so far) and exits 130."""
    try:
        with GracefulExit():
            for epoch in range(state.completed, args.epochs):
                prepare_epoch(state, job, epoch, args, rt)
                t0 = time.time()
                train_loss = train_one_epoch(state.net, job.loader, state.optimizer,
                                             state.scheduler if args.schedule == "cosine" else None, state.scaler,
                                             rt, args.online_augment, f"{job.label} epoch {epoch + 1}/{args.epochs}",
                                             args.augment)
                train_seconds = time.time() - t0
                val = evaluate(state.model, job.val_set, job.val_targets, job.train_means, job.names,
                               args.calibration, args.batch_size, rt)
                end_epoch(state, job, epoch, train_loss, train_seconds, time.time() - t0, val, args, rt)
                if state.stop["stopped"]:
                    break
    except KeyboardInterrupt:
        save_last(job, state, args, rt, interrupted=True)
        rt.log(f"\ninterrupted: saved {job.folder / 'last.pt'} after {state.completed} complete epochs; "
               f"continue with the same command and --resume")
        raise SystemExit(130)


def write_summary(state: TrainState, job: Job, table: pd.DataFrame, n_sources: int, args, rt: Runtime) -> dict:
    """summary.json: sizes, the best epoch's metrics per pathology and the configuration; every rank returns it."""
    best = Checkpoint.load(job.folder / "best.pt").metrics if rt.main else None
    if rt.world > 1:
        box = [best]
        dist.broadcast_object_list(box)
        best = box[0]
    summary = {"pathology": job.names[0] if len(job.names) == 1 else "multi_head", "pathologies": job.names,
               "view": args.view, "folder": job.folder.name, "n_train": job.n_train, "n_val": job.n_val,
               "n_sources": n_sources, "n_stray_rows": table.attrs.get("n_stray", 0),
               "n_bad_images": table.attrs.get("n_bad_images", 0), "best_epoch": state.stop["best_epoch"],
               "epochs_run": state.completed, "early_stopped": state.stop["stopped"],
               **{k: best.get(k) for k in ("val_loss", *METRIC_KEYS)},
               "per_pathology": best.get("per_pathology", {}), "split": job.split, "config": jsonable(vars(args))}
    for k, name in enumerate(job.names):
        summary["per_pathology"].setdefault(name, {})["n_train"] = job.n_train_of(k)
    if rt.main:
        write_text(job.folder / "summary.json", json.dumps(jsonable(summary), indent=2))
    return summary


def train_job(names: list[str], folder: str, table: pd.DataFrame, is_val: np.ndarray, sources: list, args,
              rt: Runtime) -> dict | None:
    """Train one model for `names` on the rows labelled for any of them; returns its summary."""
    job = prepare_job(names, folder, table, is_val, sources, args, rt)
    if job is None:
        return None
    state = build_state(job, args, rt)
    if state.completed and (state.stop["stopped"] or state.completed >= args.epochs):
        rt.log(f"{job.label}: already finished ({state.completed} epochs"
               f"{', early-stopped' if state.stop['stopped'] else ''})")
        summary = job.folder / "summary.json"
        return json.loads(summary.read_text()) if summary.is_file() else None
    rt.log(f"training {job.label} (view {args.view}): {job.n_train} train rows x {len(sources)} sources, "
           f"{job.n_val} val rows, {len(names)} head(s), {rt.device}" + (f" x{rt.world}" if rt.world > 1 else ""))
    try:
        run_epochs(state, job, args, rt)
    finally:
        close_loader(job.loader)
    return write_summary(state, job, table, len(sources), args, rt)


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
    rt = setup_runtime(args, join=False)
    try:
        # Under torchrun every process gets its data ready on its own, before the process group: the
        # first one to need the demo data or the cache makes it (with progress), the others wait on
        # the files, never in a collective whose timeout a long cache build would outlast.
        root, csv_path = resolve_data(args.data_root, args.train_csv, "train2023.csv")
        if args.data_root is None:
            rt.log(f"no --data-root: using the demo dataset in {root} ({args.image_size}px, {args.epochs} epochs, "
                   f"batch {args.batch_size}, --weights {args.weights}); see README to train on real data")
        table = read_train_csv(csv_path, convention=args.label_convention)
        args.label_convention = table.attrs["label_convention"]  # what was used, in summary.json and checkpoints
        rt.log(describe_convention(args.label_convention, table.attrs["label_convention_how"]))
        names = check_pathologies(args.pathology, table.attrs["labels"])
        table, cache = cached_table(table, root, args.image_size, args.cache_dir, csv_path.stem, args.square,
                                    args.workers, progress=args.progress)
        join_process_group(rt)
        sources = [cache] + [find_augmented(cache, a) for a in args.augmented]
        is_val = split_by_patient(table["patient"], args.val_frac, args.seed)
        # One stream per rank (dropout, on-the-fly augmentation); rank 0's is a single process's. The
        # split and the sampler draw from their own seeded generators, the same on every rank, and
        # DDP gives every rank rank 0's initial weights.
        seed_everything(args.seed + rt.rank)
        jobs = ([(names, slug("multi_head", args.view))] if args.multi_head
                else [([n], slug(n, args.view)) for n in names])
        summaries = [s for s in (train_job(n, f, table, is_val, sources, args, rt) for n, f in jobs) if s]
        if not summaries:
            raise UserError(f"nothing to train: no labelled rows for {', '.join(names)} (view {args.view})")
        rows = [r for s in summaries for r in table_rows(s)]
        if len(rows) > 1:
            rows.append({"pathology": "macro mean", **{k: mean_defined([r[k] for r in rows])
                                                       for k in TABLE_COLUMNS[5:]}})
        rt.log("\n" + format_table(rows, TABLE_COLUMNS) + f"\n\ncheckpoints in {args.out_dir}/")
        return summaries
    finally:
        if rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_cli(main))
