"""Train one regression model per pathology (or one shared-backbone model for several).

    python train.py --pathology Cardiomegaly                      # demo data, a few minutes on CPU
    python train.py --pathology all --data-root /data/cs156b --epochs 10
    python train.py --pathology all --data-root /data/cs156b --folds 5 --fold all
    torchrun --nproc_per_node 4 train.py --pathology all --data-root /data/cs156b

For each pathology it writes OUT_DIR/<slug>/ (runs.py: best.pt, last.pt, history.csv, summary.json,
curves.png, val_predictions.csv); with --folds K one such folder per fold, OUT_DIR/<slug>/fold<I>/,
and once all K exist OUT_DIR/<slug>/oof_predictions.csv. Loss: masked MSE on the [-1, 1] label
scale (or masked cross-entropy with --head-type three-class; blank labels never enter it; the
--uncertain policy shapes the training targets only). A WeightedRandomSampler with inverse-frequency
weights, bounded by --sampler-cap, balances the label values; a calibration map fitted on the
validation split returns the outputs to the distribution that the MSE metric is taken on, and its
patient-grouped cross-validated (out-of-sample) score picks best.pt. Validation always scores the
source labels (uncertain = 0), as the leaderboard does.

--resume carries on from last.pt at the exact batch where the run stopped: a SIGTERM or Ctrl-C
saves it at the next step boundary, and --save-every saves it every few minutes, so a hard kill
loses at most that much. A resume that would change the split, the data or the model is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from augment import AUGMENT_PRESETS, ONLINE_AUGMENTS, augment_batch, online_augment
from cache import cached_table, find_augmented
from calibration import CALIBRATIONS, apply_calibration, calibrate_out_of_sample, fit_calibration
from common import Parser, UserError, add_data_flags, add_device_flags, format_table, jsonable, run_cli, write_text
import config
from dataset import (ALL_LABELS, LABEL_CONVENTIONS, UNCERTAIN_POLICIES, XrayDataset, check_pathologies,
                     describe_convention, patient_splits, read_train_csv, resolve_data, sha1, slug, uncertain_targets)
from evaluation import METRIC_KEYS, cv_fallback_notice, mean_defined, pathology_metrics, plot_curves
from model import (HEAD_TYPES, HEAD_VARIANTS, N_STAGES, Checkpoint, build_model, check_arch, loss_terms,
                   model_config, n_stages, param_groups, predict, set_frozen, set_grad_checkpointing)
from runs import (HISTORY_COLUMNS, check_layout, fold_folder, oof_metrics, read_history, write_history,
                  write_predictions)
from runtime import (Runtime, StopSignals, agree, close_loader, join_process_group, on_main, rng_state,
                     seed_everything, set_rng_state, setup_runtime, sync_buffers, to_device)
from sampler import SAMPLER_CAP, EpochSampler, sample_weights, train_loader
from weights import load_pretrained

TABLE_COLUMNS = ["pathology", "view", "fold", "n_train", "n_val", "best_epoch", "val_mse", "val_mse_cv", "val_mse_cal",
                 "const_mse", "val_nmse", "val_auc"]
DEMO_DEFAULTS = {"image_size": 64, "epochs": 3, "weights": "none", "batch_size": 16, "augment": "none"}
# augment standard on real data: better test MSE and AUC for 2 of 3 archs on real X-rays (docs/results.md)
REAL_DEFAULTS = {"image_size": 224, "epochs": 10, "weights": "imagenet", "batch_size": 32, "augment": "standard"}
SAVE_EVERY_MIN = 15.0  # --save-every default: a hard kill (no SIGTERM) loses at most this much training
CHECK_STEPS = 20  # under torchrun, ranks agree on stop / save / a bad loss every this many optimizer steps
# flags a --resume may change: where things are and how the run is executed, never what is trained
RESUME_MAY_CHANGE = {"pathology", "fold", "epochs", "patience", "resume", "out_dir", "cache_dir", "data_root",
                     "train_csv", "workers", "loader_workers", "device", "amp", "compile", "progress", "save_every",
                     "weights"}


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pathology", nargs="+", required=True, metavar="NAME",
                   help=f"one or more of: {', '.join(ALL_LABELS)}; or 'all' (quote names with spaces)")
    g = add_data_flags(p, "--train-csv", "training CSV (default DATA_ROOT/student_labels/train2023.csv, or "
                       "Stanford's CheXpert-v1.0-small/train.csv or CheXpert-v1.0/train.csv under DATA_ROOT)")
    g.add_argument("--loader-workers", type=int, help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    g.add_argument("--view", choices=["all", "frontal", "lateral"], default="all", help="train on the rows of this view only")
    g.add_argument("--uncertain", choices=UNCERTAIN_POLICIES, default="keep",
                   help="uncertain labels (0) as training targets: keep as 0, ignore (mask), ones (-> 1), zeros (-> -1); "
                   "validation always scores them as 0")
    g.add_argument("--label-convention", choices=LABEL_CONVENTIONS, default="auto",
                   help="how the CSV writes labels: cs156b (0 uncertain, -1 negative), chexpert (Stanford's: "
                   "0 negative, -1 uncertain), or auto: detected from the layout")
    g.add_argument("--val-frac", type=float, default=0.2, help="fraction of patients held out for validation")
    g.add_argument("--split-seed", type=int, help="seed of the patient split or folds (default: --seed), so that "
                   "runs with other --seed values share one split and can be blended")
    g.add_argument("--folds", type=int, metavar="K", help="K-fold training: patients split into K groups, each "
                   "validating the model trained on the others (OUT_DIR/<slug>/fold<I>/)")
    g.add_argument("--fold", default="all", metavar="I|all", help="with --folds: train fold I (0-based, e.g. "
                   "$SLURM_ARRAY_TASK_ID) or all K in turn")
    g.add_argument("--augmented", nargs="+", default=[], metavar="NAME",
                   help="add offline-augmented copies built by experiments/ (flip, contrast) as training samples")
    g.add_argument("--augment", choices=list(AUGMENT_PRESETS), metavar="PRESET",
                   help=f"per-sample augmentation of each training batch on the device, one of "
                   f"{', '.join(AUGMENT_PRESETS)} (see augment.augment_batch; default {REAL_DEFAULTS['augment']}, "
                   f"{DEMO_DEFAULTS['augment']} on the demo data)")
    g.add_argument("--online-augment", nargs="+", default=[], choices=ONLINE_AUGMENTS,
                   help="older: flip / contrast x1.5 on a random half of each batch on the device; prefer --augment")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", help="a torchvision backbone (resnet18, resnet50, resnet101, "
                   "densenet121, convnext_tiny, efficientnet_v2_s) or timm/NAME for any timm model")
    g.add_argument("--head-type", choices=HEAD_TYPES, default="regression",
                   help="regression: tanh output, MSE; three-class: softmax over negative/uncertain/positive, "
                   "cross-entropy, predicting p(positive) - p(negative)")
    g.add_argument("--weights", default=None, help="imagenet (torchvision's or timm's), none, or PATH to a state dict "
                   "of --arch, a torchxrayvision DenseNet-121 / ResNet-50 state dict, a timm .safetensors/.pth file or "
                   "a checkpoint (default imagenet; none on the demo data)")
    g.add_argument("--hidden", type=int, default=512, help="hidden units of the MLP head")
    g.add_argument("--dropout", type=float, default=0.2, help="dropout in the MLP head")
    g.add_argument("--head", choices=["auto", *HEAD_VARIANTS], default="auto",
                   help="head variant; auto = 'regularized' (<=128 units, dropout >=0.5) for Fracture, else mlp")
    g.add_argument("--multi-head", action=argparse.BooleanOptionalAction, default=False,
                   help="one shared backbone with a head per pathology, trained in one pass")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="epochs (default 10; 3 on the demo data)")
    g.add_argument("--batch-size", type=int, help="per process and step (default 32; 16 on the demo data)")
    g.add_argument("--accum-steps", type=int, default=1, help="batches per optimizer step (gradient accumulation)")
    g.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise learning-rate decay: each backbone group deeper from the head trains at this "
                   "factor times the next one's rate (1 = off)")
    g.add_argument("--ema", type=float, metavar="DECAY", help="keep an exponential moving average of the weights "
                   "(e.g. 0.999), validated, calibrated and saved in place of the raw weights")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in the backward pass: less memory, about a third more time")
    g.add_argument("--schedule", choices=["cosine", "plateau"], default="cosine",
                   help="cosine decay per step after warm-up, or halve on a validation-loss plateau (no warm-up)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up length, in epochs (default 0.5 with cosine)")
    g.add_argument("--freeze", type=int, help=f"backbone stages frozen at the start (torchvision: 0-{N_STAGES}, stem "
                   "then four stages; timm: its layer groups; default 2 with pretrained weights, 0 with --weights none)")
    g.add_argument("--unfreeze-epoch", type=unfreeze_epoch, default=1, metavar="E|never",
                   help="epoch (0-based) from which every stage trains; never: --freeze holds for the whole run")
    g.add_argument("--sampler", action=argparse.BooleanOptionalAction, default=True,
                   help="WeightedRandomSampler with inverse-frequency weights over the label values")
    g.add_argument("--sampler-cap", type=float, default=SAMPLER_CAP,
                   help="no row is drawn more than this many times as often as a uniform draw would (0: no bound)")
    g.add_argument("--calibration", choices=CALIBRATIONS, default="affine",
                   help="monotone map fitted on the validation split after each epoch, stored in the checkpoint")
    g.add_argument("--patience", type=int, default=3, help="early stopping on validation loss; 0 turns it off")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="carry on from OUT_DIR/<slug>/last.pt up to --epochs, from the batch where it stopped")
    g.add_argument("--save-every", type=float, default=SAVE_EVERY_MIN, metavar="MINUTES",
                   help="also save last.pt every this many minutes within an epoch (0: at epoch ends and signals only)")
    g.add_argument("--seed", type=int, default=0, help="initialisation, sampling, dropout and augmentation")
    p.add_argument("--out-dir", type=Path, default=Path("checkpoints"), help="one folder per model")
    g = add_device_flags(p)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    args = config.parse_args(p, argv)
    explicit_warmup = args.warmup_epochs
    fill_defaults(args)
    for message in bad_values(args, explicit_warmup):
        p.error(message)
    try:
        check_pathologies(args.pathology, ALL_LABELS)  # names only; the CSV's columns are checked later
        args.arch = check_arch(args.arch)
    except UserError as e:
        p.error(str(e))
    return args


def unfreeze_epoch(text: str) -> int | str:
    """--unfreeze-epoch: an epoch >= 0, or 'never'."""
    if text == "never":
        return text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"an epoch >= 0 or never, got {text!r}")
    return int(text)


def fill_defaults(args: argparse.Namespace) -> None:
    for k, v in (DEMO_DEFAULTS if args.data_root is None else REAL_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.freeze is None:
        args.freeze = 0 if args.weights == "none" else 2
    if args.split_seed is None:
        args.split_seed = args.seed
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.5 if args.schedule == "cosine" else 0.0


def bad_values(args: argparse.Namespace, explicit_warmup: float | None = None) -> list[str]:
    checks = [(args.epochs < 1, f"--epochs must be at least 1, got {args.epochs}"),
              (args.image_size < 32, f"--image-size must be at least 32 (every --arch downsamples 32x), got {args.image_size}"),
              (args.batch_size < 1, f"--batch-size must be at least 1, got {args.batch_size}"),
              (args.accum_steps < 1, f"--accum-steps must be at least 1, got {args.accum_steps}"),
              (not args.lr > 0, f"--lr must be positive, got {args.lr}"),
              (not 0 < args.layer_decay <= 1, f"--layer-decay must be in (0, 1], got {args.layer_decay}"),
              (args.ema is not None and not 0 < args.ema < 1, f"--ema must be in (0, 1), e.g. 0.999, got {args.ema}"),
              (args.hidden < 1, f"--hidden must be at least 1, got {args.hidden}"),
              (not 0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
              (not 0 <= args.freeze <= (99 if args.arch.startswith("timm/") else N_STAGES),
               f"--freeze must be between 0 and {N_STAGES}, got {args.freeze}"),
              (args.patience < 0, f"--patience must be >= 0, got {args.patience}"),
              (not args.sampler_cap >= 0, f"--sampler-cap must be >= 0 (0: no bound), got {args.sampler_cap}"),
              (args.warmup_epochs < 0, f"--warmup-epochs must be >= 0, got {args.warmup_epochs}"),
              (args.schedule == "plateau" and bool(explicit_warmup),
               "--warmup-epochs works with --schedule cosine only; plateau starts at --lr (drop --warmup-epochs)"),
              (not args.save_every >= 0, f"--save-every must be >= 0 minutes, got {args.save_every}"),
              (not 0 < args.val_frac < 1, f"--val-frac must be between 0 and 1, got {args.val_frac}"),
              (args.folds is not None and args.folds < 2, f"--folds must be at least 2, got {args.folds}"),
              (args.folds is None and args.fold != "all", "--fold needs --folds K"),
              (args.folds is not None and args.fold != "all" and not (args.fold.isdigit() and int(args.fold) < args.folds),
               f"--fold must be 0..{(args.folds or 1) - 1} or all, got {args.fold}"),
              (args.workers < 1, f"--workers must be at least 1, got {args.workers}"),
              (args.loader_workers is not None and args.loader_workers < 0, "--loader-workers must be >= 0"),
              (args.weights not in ("imagenet", "none") and not Path(args.weights).is_file(),
               f"--weights {args.weights!r} is not imagenet, none or an existing file")]
    return [message for bad, message in checks if bad]


# ---------------------------------------------------------------------------------------------
# One model's data, state and files

@dataclass
class Job:
    """What one model trains and validates on: its pathologies, rows, loaders and split."""
    names: list[str]
    folder: Path               # OUT_DIR/<slug>[/fold<I>]
    label: str                 # for messages
    val_rows: pd.DataFrame     # path, patient, study, view of the validation rows
    train_targets: np.ndarray  # (n_train, K) float32 after the --uncertain policy, NaN = not in the loss
    val_targets: np.ndarray    # (n_val, K) the source labels on the project's scale (uncertain 0), NaN = blank
    train_means: np.ndarray    # (K,) the constant predictor's values
    train_set: XrayDataset
    val_set: XrayDataset
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    split: dict                # seed, val_frac or folds, patient and row hashes: in checkpoints and summary.json

    @property
    def n_train(self) -> int:
        return len(self.train_targets)

    def n_train_of(self, k: int) -> int:
        """Training rows labelled for pathology k."""
        return int((~np.isnan(self.train_targets[:, k])).sum())


@dataclass
class TrainState:
    """Everything that changes while a job trains, and that last.pt saves for --resume."""
    model: torch.nn.Module
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    epoch: int = 0             # complete epochs
    step: int = 0              # batches of epoch `epoch` trained so far (where its loader resumes)
    totals: torch.Tensor | None = None  # (2,) loss sum and labelled entries of epoch `epoch` so far
    train_seconds: float = 0.0  # of epoch `epoch` so far
    stop: dict = field(default_factory=lambda: {"best_val_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0,
                                                "stopped": False})
    history: list[dict] = field(default_factory=list)  # history.csv rows
    best_cal: dict = field(default_factory=dict)       # calibration of best.pt
    net: torch.nn.Module | None = None  # the model as trained (compiled, DDP-wrapped)

    @property
    def validated(self) -> torch.nn.Module:
        """The weights that are validated, calibrated and saved as best.pt: the EMA's with --ema."""
        return self.ema.module if self.ema is not None else self.model


def prepare_job(names: list[str], folder: Path, table: pd.DataFrame, is_val: np.ndarray, split: dict,
                sources: list, args, rt: Runtime) -> Job | None:
    """Pick the rows labelled for any of `names` (and --view) on each side of the split and build the
    loaders; None (with one line) when either side is empty. Validation keeps the source labels;
    the --uncertain policy applies to the training targets only."""
    source = table[names].to_numpy(np.float32)
    targets = uncertain_targets(source, args.uncertain).astype(np.float32)
    labelled = ~np.isnan(source).all(1)
    if args.view != "all":
        labelled &= (table["view"] == args.view).to_numpy()
    # a training row needs a target after the policy (--uncertain ignore masks uncertain-only rows)
    tr, va = np.flatnonzero(labelled & ~np.isnan(targets).all(1) & ~is_val), np.flatnonzero(labelled & is_val)
    label = (" + ".join(names) if len(names) <= 3 else f"{len(names)} pathologies") + (
        f" fold {split['fold']}" if "fold" in split else "")
    if len(tr) == 0 or len(va) == 0:
        rt.log(f"skipping {label} (view {args.view}): {len(tr)} training and {len(va)} validation rows are labelled")
        return None
    train_t = targets[tr]
    train_means = np.array([np.nanmean(c) if (~np.isnan(c)).any() else 0.0 for c in train_t.T])
    slots = table["slot"].to_numpy()
    train_set = XrayDataset(sources, slots[tr], train_t)
    val_set = XrayDataset(sources[:1], slots[va], source[va])
    weights = np.tile(sample_weights(train_t, args.sampler_cap), len(sources)) if args.sampler else None
    sampler = EpochSampler(weights, len(train_set), args.batch_size, args.seed, rt.rank, rt.world)
    rows = table.iloc[np.r_[tr, va]]
    split = {**split, "rows_sha1": sha1([*rows["path"], source[np.r_[tr, va]].tobytes().hex(), len(tr)])}
    return Job(names, folder, label, table.iloc[va][["path", "patient", "study", "view"]].reset_index(drop=True),
               train_t, source[va], train_means, train_set, val_set, sampler,
               train_loader(train_set, sampler, args.loader_workers, rt), split)


def make_scheduler(optimizer, args, steps_per_epoch: int):
    """Cosine decay per optimizer step after a linear warm-up, or halving on a plateau of the
    validation loss (stepped per epoch, no warm-up)."""
    if args.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch)) if args.warmup_epochs > 0 else 0
    total = max(1, args.epochs * steps_per_epoch)

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def build_state(job: Job, args, rt: Runtime, ckpt: Checkpoint | None = None) -> TrainState:
    """A fresh model, optimiser and schedule; or, from last.pt (loaded on the CPU), all of them as
    saved, moved to rt.device: the model rebuilt from the file's own config (its normalisation
    kept), the optimizer state moved by load_state_dict, the RNG streams restored last."""
    if ckpt is None:
        model = build_model(model_config(job.names, args.head, args.hidden, args.dropout, args.arch, args.head_type,
                                         args.image_size))
        source = load_pretrained(model, args.weights)
        rt.log(f"{job.label}: {args.arch}, {args.head_type} head(s), weights {source['source']}"
               + (f" ({args.weights})" if source["source"] not in ("none", "imagenet") else "")
               + f", input normalised with mean {source['mean']:.4g}, std {source['std']:.4g}")
    else:
        model = ckpt.build("cpu", job.folder / "last.pt").train()
    if args.freeze > n_stages(model):
        raise UserError(f"--freeze {args.freeze}: {args.arch} has {n_stages(model)} stages to freeze")
    if args.grad_checkpointing:
        set_grad_checkpointing(model)
    model.to(rt.device)
    if rt.cuda:
        model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": args.lr * g["lr_scale"]}
              for g in param_groups(model, args.weight_decay, args.layer_decay)]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args, math.ceil(job.sampler.batches_per_epoch / args.accum_steps))
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    state = TrainState(model, ema, optimizer, scheduler, scaler)
    if ckpt is not None:
        restore(state, ckpt, job)
    return state


def restore(state: TrainState, ckpt: Checkpoint, job: Job) -> None:
    ts = ckpt.training_state
    state.optimizer.load_state_dict(ts["optimizer"])  # casts the state to each parameter's device
    state.scheduler.load_state_dict(ts["scheduler"])
    state.scaler.load_state_dict(ts["scaler"])
    if state.ema is not None:
        state.ema.load_state_dict(ts["ema"])
    device = next(state.model.parameters()).device
    state.epoch, state.step, state.train_seconds = ckpt.epoch, ts.get("step", 0), ts.get("train_seconds", 0.0)
    state.totals = torch.tensor(ts["totals"], device=device) if ts.get("totals") else None
    state.stop, state.history = ts["early_stopping"], read_history(job.folder / "history.csv", ckpt.epoch)
    if (job.folder / "best.pt").is_file():
        state.best_cal = Checkpoint.load(job.folder / "best.pt").calibration
    set_rng_state(ts["rng"])  # last: nothing may draw from the streams before training goes on


def differences(ckpt: Checkpoint, job: Job, args) -> list[str]:
    """What makes this command another run than the one that wrote last.pt: '--flag saved -> now'."""
    now = jsonable(vars(args))
    out = [f"--{k.replace('_', '-')} {v} -> {now.get(k)}" for k, v in sorted(ckpt.train_config.items())
           if k not in RESUME_MAY_CHANGE and k in now and now[k] != v]
    if ckpt.pathologies != job.names:
        out.append(f"pathologies {ckpt.pathologies} -> {job.names}")
    changed = [k for k in ("val_patients_sha1", "folds_sha1", "rows_sha1") if k in ckpt.split
               and ckpt.split[k] != job.split.get(k)]
    if changed and out:  # flags that move the split: the patients follow from them
        out.append("the validation patients differ" if changed != ["rows_sha1"] else "the training rows differ")
    elif changed:  # the same flags: the data changed (a row removed can move every patient of the split)
        out.append("the training rows, their labels or the split's patients differ (the CSV or its readable images "
                   "changed)")
    return out


def load_last(job: Job, args, rt: Runtime) -> Checkpoint | None:
    """last.pt when --resume finds one (on the CPU, whatever device it came from), after checking
    that this command is the same run; None for a fresh start."""
    path = job.folder / "last.pt"
    if not (args.resume and on_main(rt, path.is_file)):
        return None
    if not path.is_file():
        raise UserError(f"--resume: rank {rt.rank} cannot see {path}, which rank 0 has: put --out-dir on a "
                        f"filesystem that every node shares")
    ckpt = Checkpoint.load(path)
    diff = differences(ckpt, job, args)
    if diff:
        raise UserError(f"--resume: {path} is another run ({'; '.join(diff)}); rerun with its flags, or start "
                        f"afresh in another --out-dir (or delete {job.folder})")
    return ckpt


# ---------------------------------------------------------------------------------------------
# The loop

def train_step(state: TrainState, batches: list, args, rt: Runtime) -> None:
    """One optimizer step over `batches` (the --accum-steps micro-batches). Each micro-batch adds its
    summed loss divided by the labelled entries of all of them, so the step is that of one batch
    holding them all; under DDP the gradients are synchronised on the last micro-batch only."""
    total = max(1, sum(int(mask.sum()) for _, _, mask in batches))  # CPU tensors: no device sync
    state.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        images, targets, mask = to_device(batch, rt)
        if args.online_augment:
            images = online_augment(images, args.online_augment)
        images = augment_batch(images, args.augment)  # 'none' returns the batch itself
        last = i == len(batches) - 1
        with state.net.no_sync() if rt.world > 1 and not last else contextlib.nullcontext():
            with rt.autocast():
                out = state.net(images)
            loss, n = loss_terms(out, targets, mask)
            state.scaler.scale(loss / total).backward()
        state.totals += torch.stack([loss.detach(), n.to(loss.dtype)])  # no .item(): no sync per step
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if args.schedule == "cosine":
        state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(state.model)


def train_one_epoch(state: TrainState, job: Job, args, rt: Runtime, signals: StopSignals) -> bool:
    """Train epoch state.epoch from batch state.step to its end. Returns False when a signal stopped
    it, after saving last.pt at that exact batch. One process looks at the signals after every
    optimizer step; under torchrun the ranks agree every CHECK_STEPS steps (a sync point). At each
    check a non-finite loss is an error, and last.pt is saved when --save-every minutes have passed."""
    state.net.train()
    job.sampler.set_epoch(state.epoch, state.step)
    end, n_steps = job.sampler.batches_per_epoch, 0
    if state.totals is None:
        state.totals = torch.zeros(2, device=rt.device)
    t0, saved = time.time() - state.train_seconds, time.monotonic()
    batches = iter(job.loader)
    with tqdm(total=end, initial=state.step, desc=f"{job.label} epoch {state.epoch + 1}/{args.epochs}", leave=False,
              disable=not rt.progress, dynamic_ncols=True) as bar:
        while state.step < end:
            group = list(itertools.islice(batches, args.accum_steps))
            train_step(state, group, args, rt)
            state.step, n_steps = state.step + len(group), n_steps + 1
            state.train_seconds = time.time() - t0
            bar.update(len(group))
            due = bool(args.save_every) and time.monotonic() - saved > args.save_every * 60
            # ranks must meet at the same steps; one process may look whenever it has a reason
            if n_steps % CHECK_STEPS and state.step < end and (rt.world > 1 or not (due or signals.requested)):
                continue
            stop, save, bad = agree(rt, signals.requested is not None, due, not bool(torch.isfinite(state.totals).all()))
            if bad:
                raise UserError(f"{job.label}: the training loss is not finite in epoch {state.epoch + 1} (batch "
                                f"{state.step}); lower --lr, or try --no-amp. {job.folder / 'last.pt'} keeps the last "
                                f"good state")
            if stop or save:
                save_last(state, job, args, rt, interrupted=stop)
                saved = time.monotonic()
            if stop:
                return False
    return True


def validate(state: TrainState, job: Job, args, rt: Runtime) -> dict:
    """Validation of the weights best.pt would save (every rank with rank 0's buffers): per-pathology
    metrics with a calibration map fitted on these predictions, their macro means, and the loss
    that picks best.pt and early stopping watches: the out-of-sample (patient-grouped
    cross-validated) MSE of the calibrated outputs over all labelled entries. "pred" holds the raw
    predictions (n_val, K) float32 in [-1, 1] (every rank has them all), "calibrated_oos" (n_val, K)
    float64 each row calibrated by a map fitted without its patient (val_predictions.csv's column)."""
    model = state.validated
    sync_buffers(model, rt)
    pred = predict(model, job.val_set, args.batch_size, rt)
    per, cals = {}, {}
    patients = job.val_rows["patient"].to_numpy()
    oos = np.empty(pred.shape, dtype=np.float64)  # calibrated_oos: each row by a map fitted without its patient
    for k, name in enumerate(job.names):
        t = job.val_targets[:, k]
        m = ~np.isnan(t)
        cals[name] = fit_calibration(args.calibration, pred[m, k], t[m], prior=float(job.train_means[k]),
                                     groups=patients[m])
        oos[:, k] = calibrate_out_of_sample(args.calibration, pred[:, k], t, prior=float(job.train_means[k]),
                                            groups=patients)
        per[name] = pathology_metrics(pred[:, k], t, float(job.train_means[k]), cals[name])
    notice = cv_fallback_notice(job.label, per)  # too few patients: val_mse_cv is the raw MSE, never NaN
    if notice and not state.history:  # once, at a run's first validation
        rt.log(notice)
    n = sum(per[x]["n"] for x in job.names)
    loss = sum(per[x]["val_mse_cv"] * per[x]["n"] for x in job.names if per[x]["n"]) / n if n else float("nan")
    macro = {key: mean_defined([per[x][key] for x in job.names]) for key in METRIC_KEYS}
    return {"val_loss": loss, **macro, "per_pathology": per, "calibration": cals, "pred": pred, "calibrated_oos": oos}


def checkpoint_of(model, state: TrainState, job: Job, args, metrics: dict, **values) -> Checkpoint:
    return Checkpoint.of(model, view=args.view, epoch=state.epoch, metrics=metrics, calibration=state.best_cal,
                         preprocess={"image_size": args.image_size, "square": args.square,
                                     "mean": model.config["mean"], "std": model.config["std"],
                                     "uncertain": args.uncertain, "label_convention": args.label_convention},
                         train_config=jsonable(vars(args)), split=job.split, **values)


def save_last(state: TrainState, job: Job, args, rt: Runtime, interrupted: bool = False) -> None:
    """last.pt: the raw weights after state.epoch epochs and state.step batches, and everything
    --resume needs to go on from that batch exactly."""
    def write():
        ts = {"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
              "scaler": state.scaler.state_dict(), "early_stopping": dict(state.stop), "rng": rng_state(),
              "step": state.step, "totals": None if state.totals is None else state.totals.tolist(),
              "train_seconds": state.train_seconds, "ema": None if state.ema is None else state.ema.state_dict()}
        checkpoint_of(state.model, state, job, args, state.history[-1] if state.history else {},
                      interrupted=interrupted, training_state=ts).save(job.folder / "last.pt")
    on_main(rt, write)


def end_epoch(state: TrainState, job: Job, val: dict, args, rt: Runtime) -> None:
    """Record the epoch just trained and validated: history row, early-stopping state, best.pt and
    val_predictions.csv when it improved, last.pt, history.csv, curves.png, one log line."""
    if not math.isfinite(val["val_loss"]):
        raise UserError(f"{job.label}: the validation loss is not finite after epoch {state.epoch + 1}; lower --lr, "
                        f"or try --no-amp. {job.folder / 'last.pt'} keeps the last good state")
    if rt.world > 1:
        torch.distributed.all_reduce(state.totals)
    loss = (state.totals[0] / state.totals[1].clamp(min=1)).item()
    if args.schedule == "plateau":
        state.scheduler.step(val["val_loss"])
    row = {"epoch": state.epoch + 1, "train_loss": loss, "lr": state.optimizer.param_groups[0]["lr"],
           "seconds": round(state.train_seconds + val["val_seconds"], 2), "train_seconds": round(state.train_seconds, 2),
           "train_images_per_s": round(len(job.train_set) / max(state.train_seconds, 1e-9), 1),
           **{k: v for k, v in val.items() if k in HISTORY_COLUMNS}}
    state.history.append(row)
    state.epoch, state.step, state.totals, state.train_seconds = state.epoch + 1, 0, None, 0.0
    stop = state.stop
    improved = val["val_loss"] < stop["best_val_loss"]
    if improved:
        stop.update(best_val_loss=val["val_loss"], best_epoch=state.epoch, bad_epochs=0)
        state.best_cal = val["calibration"]
    else:
        stop["bad_epochs"] += 1
    stop["stopped"] = bool(args.patience and stop["bad_epochs"] >= args.patience)

    def write():  # best first, from this epoch's weights (never a live reference); history before last.pt
        if improved:
            per = {name: {**val["per_pathology"][name], "n_train": job.n_train_of(k)} for k, name in enumerate(job.names)}
            checkpoint_of(state.validated, state, job, args, jsonable({**row, "per_pathology": per})).save(
                job.folder / "best.pt")
            cal = np.stack([apply_calibration(val["calibration"].get(n), val["pred"][:, k])
                            for k, n in enumerate(job.names)], 1)
            write_predictions(job.folder / "val_predictions.csv", job.val_rows, job.names, job.val_targets,
                              val["pred"], cal, val["calibrated_oos"])
        write_history(job.folder / "history.csv", state.history)
        plot_curves(state.history, job.folder / "curves.png", f"{job.label} (view {args.view})")  # about 0.2 s
    on_main(rt, write)
    save_last(state, job, args, rt)
    rt.log(f"{job.label} epoch {state.epoch}/{args.epochs}: train {loss:.4f}  val {val['val_loss']:.4f}  "
           f"mse {val['val_mse']:.4f} -> cal {val['val_mse_cv']:.4f} out of sample, {val['val_mse_cal']:.4f} in "
           f"(const {val['const_mse']:.4f})  auc {val['val_auc']:.4f}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
           + ("  *" if improved else ""))
    if stop["stopped"]:
        rt.log(f"{job.label}: early stop, no improvement for {args.patience} epochs")


def prepare_epoch(state: TrainState, epoch: int, args, rt: Runtime) -> None:
    """Freeze the stages this epoch keeps frozen; (re)wrap the model when that changes, since DDP
    registers the trainable parameters when it wraps."""
    frozen = args.freeze if args.unfreeze_epoch == "never" or epoch < args.unfreeze_epoch else 0
    if state.net is None or frozen != state.model.frozen:
        set_frozen(state.model, frozen)
        state.net = torch.compile(state.model) if args.compile else state.model
        if rt.world > 1:
            state.net = DDP(state.net, device_ids=[rt.device.index] if rt.cuda else None)


def train_job(names: list[str], folder: Path, table: pd.DataFrame, is_val: np.ndarray, split: dict, sources: list,
              args, rt: Runtime) -> dict | None:
    """Train one model for `names` on the rows labelled for any of them; returns its summary. The
    loop, as in pytorch/examples' imagenet: train an epoch, validate, save, stop early."""
    job = prepare_job(names, folder, table, is_val, split, sources, args, rt)
    if job is None:
        return None
    ckpt = load_last(job, args, rt)
    state = build_state(job, args, rt, ckpt)
    try:
        if state.stop["stopped"] or state.epoch >= args.epochs:
            rt.log(f"{job.label}: already finished ({state.epoch} epochs{', early-stopped' if state.stop['stopped'] else ''})")
            return write_summary(state, job, table, len(sources), args, rt)
        rt.log(f"{'resuming' if ckpt else 'training'} {job.label} (view {args.view}): {job.n_train} train rows x "
               f"{len(sources)} sources, {len(job.val_targets)} val rows, {len(names)} head(s), {rt.device}"
               + (f" x{rt.world}" if rt.world > 1 else "") + (f", from epoch {state.epoch + 1} batch {state.step}"
                                                             if ckpt else ""))
        with StopSignals() as signals:
            while state.epoch < args.epochs and not state.stop["stopped"]:
                prepare_epoch(state, state.epoch, args, rt)
                if not train_one_epoch(state, job, args, rt, signals):
                    rt.log(f"saved {job.folder / 'last.pt'} at epoch {state.epoch + 1}, batch {state.step}; "
                           f"continue with the same command and --resume")
                    raise SystemExit(130)
                t0 = time.time()
                val = validate(state, job, args, rt)
                end_epoch(state, job, {**val, "val_seconds": time.time() - t0}, args, rt)
                if signals.requested:
                    rt.log(f"saved {job.folder / 'last.pt'} after epoch {state.epoch}; continue with --resume")
                    raise SystemExit(130)
    finally:
        close_loader(job.loader)
    return write_summary(state, job, table, len(sources), args, rt)


def write_summary(state: TrainState, job: Job, table: pd.DataFrame, n_sources: int, args, rt: Runtime) -> dict:
    """summary.json: sizes, the best epoch's metrics per pathology, the split and the configuration;
    every rank returns it."""
    best = on_main(rt, lambda: Checkpoint.load(job.folder / "best.pt").metrics)
    summary = {"pathology": job.names[0] if len(job.names) == 1 else "multi_head", "pathologies": job.names,
               "view": args.view, "folder": job.folder.name, "n_train": job.n_train, "n_val": len(job.val_targets),
               "n_sources": n_sources, "n_stray_rows": table.attrs.get("n_stray", 0),
               "n_bad_images": table.attrs.get("n_bad_images", 0), "best_epoch": state.stop["best_epoch"],
               "epochs_run": state.epoch, "early_stopped": state.stop["stopped"],
               **{k: best.get(k) for k in ("val_loss", *METRIC_KEYS)},
               "per_pathology": best.get("per_pathology", {}), "split": job.split, "config": jsonable(vars(args))}
    for k, name in enumerate(job.names):
        summary["per_pathology"].setdefault(name, {})["n_train"] = job.n_train_of(k)
    on_main(rt, lambda: write_text(job.folder / "summary.json", json.dumps(jsonable(summary), indent=2)))
    return summary


# ---------------------------------------------------------------------------------------------
# Splits, folds and the whole run

def load_data(args, rt: Runtime) -> tuple[pd.DataFrame, list]:
    """The training table (with cache slots) and its image sources (the cache, then --augmented
    copies). Under torchrun every process gets its data ready on its own, before the process group:
    the first to need the demo data or the cache makes it, the others wait on the files, never in a
    collective whose timeout a long cache build would outlast."""
    root, csv_path = resolve_data(args.data_root, args.train_csv, "train2023.csv", log=rt.log)
    if args.data_root is None:
        rt.log(f"no --data-root: using the demo dataset in {root} ({args.image_size}px, {args.epochs} epochs, "
               f"batch {args.batch_size}, --weights {args.weights}); see README to train on real data")
    table = read_train_csv(csv_path, convention=args.label_convention)
    args.label_convention = table.attrs["label_convention"]  # what was used, in summary.json and checkpoints
    rt.log(describe_convention(args.label_convention, table.attrs["label_convention_how"]))
    table, cache = cached_table(table, root, args.image_size, args.cache_dir, csv_path.stem, args.square,
                                args.workers, progress=args.progress)
    return table, [cache] + [find_augmented(cache, a) for a in args.augmented]


def out_of_fold(folder: Path, job_names: list[str], table: pd.DataFrame, args, rt: Runtime) -> list[dict]:
    """Once all K folds of a model are trained: oof_predictions.csv (on rank 0) and a table row per
    pathology of the out-of-fold calibrated MSE and AUC over every row, with patient-grouped 95%
    intervals ([] until then)."""
    labelled = ~np.isnan(table[job_names].to_numpy(np.float32)).all(1)
    if args.view != "all":
        labelled &= (table["view"] == args.view).to_numpy()
    per = on_main(rt, lambda: oof_metrics(folder, args.folds, job_names, table["path"][labelled])) or {}
    return [{"pathology": name, "view": args.view, "fold": "oof", "n_val": m["n"], "val_nmse": m["nmse"],
             "val_mse_cv": f"{m['mse']:.4f} ({m['mse_ci'][0]:.3f}-{m['mse_ci'][1]:.3f})",
             "val_auc": f"{m['auc']:.4f} ({m['auc_ci'][0]:.3f}-{m['auc_ci'][1]:.3f})"} for name, m in per.items()]


def table_rows(summary: dict, fold) -> list[dict]:
    """Final-table rows: one per pathology of a job."""
    rows = []
    for name in summary["pathologies"]:
        per = summary["per_pathology"].get(name, {})
        rows.append({"pathology": name, "view": summary["view"], "fold": "-" if fold is None else fold,
                     "n_train": per.get("n_train"), "n_val": per.get("n"), "best_epoch": summary["best_epoch"],
                     **{k: per.get(k) for k in TABLE_COLUMNS[6:]}})
    return rows


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rt = setup_runtime(args, join=False)
    try:
        table, sources = load_data(args, rt)
        names = check_pathologies(args.pathology, table.attrs["labels"])
        join_process_group(rt)
        # One stream per rank (dropout, augmentation); rank 0's is a single process's. The split and
        # the sampler draw from their own seeded generators, the same on every rank, and DDP gives
        # every rank rank 0's initial weights.
        seed_everything(args.seed + rt.rank)
        jobs = [(names, slug("multi_head", args.view))] if args.multi_head else [([n], slug(n, args.view)) for n in names]
        summaries, rows = [], []
        for job_names, name in jobs:
            on_main(rt, lambda: check_layout(args.out_dir / name, args.folds is not None))
            for fold, is_val, split in patient_splits(table["patient"], args.split_seed, args.val_frac, args.folds,
                                                      args.fold):
                folder = args.out_dir / name if fold is None else fold_folder(args.out_dir / name, fold)
                s = train_job(job_names, folder, table, is_val, split, sources, args, rt)
                if s:
                    summaries.append(s)
                    rows += table_rows(s, fold)
            if args.folds:
                rows += out_of_fold(args.out_dir / name, job_names, table, args, rt)
        if not summaries:
            raise UserError(f"nothing to train: no labelled rows for {', '.join(names)} (view {args.view})")
        numeric = [r for r in rows if r["fold"] != "oof"]
        if len(numeric) > 1:
            rows.append({"pathology": "macro mean", **{k: mean_defined([r.get(k) for r in numeric])
                                                       for k in TABLE_COLUMNS[6:]}})
        rt.log("\n" + format_table(rows, TABLE_COLUMNS) + f"\n\ncheckpoints in {args.out_dir}/")
        return summaries
    finally:
        if rt.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_cli(main))
