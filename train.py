"""Train one regression model per pathology (or one shared-backbone model for several).

    python train.py --pathology Cardiomegaly                      # demo data, a few minutes on CPU
    python train.py --pathology all --data-root /data/cs156b --epochs 10
    python train.py --pathology all --data-root /data/cs156b --folds 5 --fold all
    python train.py --config configs/recommended_gpu.yaml --data-root /data/cs156b
    torchrun --nproc_per_node 4 train.py --pathology all --data-root /data/cs156b

For each pathology it writes OUT_DIR/<slug>/ (runs.py: best.pt, last.pt, history.csv, summary.json,
args.yaml, manifest.json, curves.png, val_predictions.csv, tb/); with --folds K one such folder per
fold, OUT_DIR/<slug>/fold<I>/, and once all K exist OUT_DIR/<slug>/oof_predictions.csv. Loss: masked
MSE on the [-1, 1] label scale (or masked cross-entropy for a three-class head; blank labels never
enter it unless --blank negative; the --uncertain policy shapes the training targets only). A
WeightedRandomSampler with inverse-frequency weights, bounded by --sampler-cap, balances the label
values; a calibration map fitted on the validation split returns the outputs to the distribution
that the MSE metric is taken on, and its patient-grouped cross-validated (out-of-sample) score picks
best.pt. Validation always scores the source labels (uncertain = 0), as the leaderboard does.

The run's state is one type (state.TrainState), saved whole in last.pt: --resume carries on from
last.pt alone, at the sample where the run stopped, on any device, precision and number of
processes. A SIGTERM or Ctrl-C saves it at the next step boundary (the processes agree within a few
seconds), and --save-every saves it every few minutes, so a hard kill loses at most that much. A
resume that would change what is trained is refused, naming each flag that differs.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import config
from augment import AUGMENT_PRESETS, ONLINE_AUGMENTS, augment_batch, online_augment
from cache import cached_table, find_augmented
from calibration import CALIBRATIONS, calibrate_out_of_sample, fit_calibration
from common import (Parser, UserError, add_data_flags, add_device_flags, check_outputs, common_flag_errors, format_table,
                    jsonable, may_change, must_keep, run_cli, test_hook)
from dataset import ALL_LABELS, LABEL_CONVENTIONS, check_pathologies, describe_convention, patient_splits, \
    read_train_csv, resolve_data, sha1, slug
from evaluation import METRIC_KEYS, cv_fallback_notice, mean_defined, pathology_metrics
from jobs import Job, prepare_job
from model import HEAD_TYPES, HEAD_VARIANTS, N_STAGES, check_arch, freeze_limit, loss_terms, predict, set_frozen
from patients import add_patient_col_flag, describe_patients
from policies import add_label_policy_flags
from runs import (TABLE_COLUMNS, check_layout, checkpoint_of, epoch_number, fold_folder, out_of_fold, prepare_folder,
                  table_rows, write_best, write_outputs, write_summary)
from runtime import (Runtime, StopSignals, agree, check_same_table, close_loader, join_process_group, on_main,
                     seed_everything, setup_runtime, sync_buffers, to_device)
from sampler import SAMPLER_CAP
from snapshots import average_weights, recompute_batchnorm, update_top
from state import TrainState, build_state, load_last
from tracking import LOG_KINDS, RunLog, check_kind, file_fingerprint, finish_manifest, start_manifest

DEMO_DEFAULTS = {"image_size": 64, "epochs": 3, "weights": "none", "batch_size": 16, "augment": "none"}
# augment standard on real data: better test MSE and AUC for 2 of 3 archs on real X-rays (docs/results.md)
REAL_DEFAULTS = {"image_size": 224, "epochs": 10, "weights": "imagenet", "batch_size": 32, "augment": "standard"}
SAVE_EVERY_MIN = 15.0  # --save-every default: a hard kill (no SIGTERM) loses at most this much training
# Under torchrun the processes agree on stop / save / a bad loss at the same steps, at least every
# CHECK_SECONDS of wall time (the step count between checks follows the measured step time): a
# SIGTERM is acted on within about this, well inside torchrun's 30 s before SIGKILL.
CHECK_SECONDS = 5.0
SEED_MAX = 2**32 - 1  # numpy's seeds
STEP_DELAY = test_hook("CXR_TEST_STEP_DELAY")


def make_parser() -> Parser:
    """train.py's flags. Each says where it is declared whether a --resume may change it
    (may_change: where files are, how the run executes) or must keep it (must_keep: what is trained)."""
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    may_change(p.add_argument("--pathology", nargs="+", required=True, metavar="NAME",
                              help=f"one or more of: {', '.join(ALL_LABELS)}; or 'all' (quote names with spaces)"))
    config.add_config_flag(p)
    g = add_data_flags(p, "--train-csv", "training CSV (default DATA_ROOT/student_labels/train2023.csv, or "
                       "Stanford's CheXpert-v1.0-small/train.csv or CheXpert-v1.0/train.csv under DATA_ROOT)")
    may_change(g.add_argument("--loader-workers", type=int, help="DataLoader workers (default 0 on CPU, 4 on CUDA)"))
    must_keep(g.add_argument("--view", choices=["all", "frontal", "lateral"], default="all",
                             help="train on the rows of this view only"))
    add_label_policy_flags(g)  # --uncertain, --blank, --lsr-ones, --lsr-zeros
    add_patient_col_flag(g)
    must_keep(g.add_argument("--label-convention", choices=LABEL_CONVENTIONS, default="auto",
                             help="how the CSV writes labels: cs156b (0 uncertain, -1 negative), chexpert (Stanford's: "
                             "0 negative, -1 uncertain), or auto: detected from the layout"))
    must_keep(g.add_argument("--val-frac", type=float, default=0.2, help="fraction of patients held out for validation"))
    must_keep(g.add_argument("--split-seed", type=int, help="seed of the patient split or folds (default: --seed), so "
                             "that runs with other --seed values share one split and can be blended"))
    must_keep(g.add_argument("--folds", type=int, metavar="K", help="K-fold training: patients split into K groups, "
                             "each validating the model trained on the others (OUT_DIR/<slug>/fold<I>/)"))
    may_change(g.add_argument("--fold", default="all", metavar="I|all", help="with --folds: train fold I (0-based, "
                              "e.g. $SLURM_ARRAY_TASK_ID) or all K in turn"))
    must_keep(g.add_argument("--augmented", nargs="+", default=[], metavar="NAME",
                             help="add offline-augmented copies built by experiments/ (flip, contrast) as training "
                             "samples"))
    must_keep(g.add_argument("--augment", choices=list(AUGMENT_PRESETS), metavar="PRESET",
                             help=f"per-sample augmentation of each training batch on the device, one of "
                             f"{', '.join(AUGMENT_PRESETS)} (see augment.augment_batch; default "
                             f"{REAL_DEFAULTS['augment']}, {DEMO_DEFAULTS['augment']} on the demo data)"))
    must_keep(g.add_argument("--online-augment", nargs="+", default=[], choices=ONLINE_AUGMENTS,
                             help="older: flip / contrast x1.5 on a random half of each batch on the device; prefer "
                             "--augment"))
    g = p.add_argument_group("model")
    must_keep(g.add_argument("--arch", default="resnet50", help="a torchvision backbone (resnet18, resnet50, "
                             "resnet101, densenet121, convnext_tiny, efficientnet_v2_s) or timm/NAME for any timm model"))
    must_keep(g.add_argument("--head-type", choices=HEAD_TYPES, default="regression",
                             help="regression: tanh output, MSE; three-class: softmax over negative/uncertain/positive, "
                             "cross-entropy, predicting p(positive) - p(negative)"))
    may_change(g.add_argument("--weights", default=None, help="imagenet (torchvision's or timm's), none, or PATH to a "
                              "state dict of --arch, a torchxrayvision DenseNet-121 / ResNet-50 state dict, a timm "
                              ".safetensors/.pth file or a checkpoint (default imagenet; none on the demo data); "
                              "only read when a run starts"))
    must_keep(g.add_argument("--hidden", type=int, default=512, help="hidden units of the MLP head"))
    must_keep(g.add_argument("--dropout", type=float, default=0.2, help="dropout in the MLP head"))
    must_keep(g.add_argument("--head", choices=["auto", *HEAD_VARIANTS], default="auto",
                             help="head variant; auto = 'regularized' (<=128 units, dropout >=0.5) for Fracture, else "
                             "mlp"))
    must_keep(g.add_argument("--multi-head", action=argparse.BooleanOptionalAction, default=False,
                             help="one shared backbone with a head per pathology, trained in one pass"))
    g = p.add_argument_group("training")
    may_change(g.add_argument("--epochs", type=int, help="epochs (default 10; 3 on the demo data); a --resume with "
                              "more (or fewer) continues the cosine schedule of the new length from where it is"))
    must_keep(g.add_argument("--batch-size", type=int, help="per process and step, at least 2 (default 32; 16 on the "
                             "demo data)"))
    must_keep(g.add_argument("--accum-steps", type=int, default=1, help="batches per optimizer step (gradient "
                             "accumulation)"))
    must_keep(g.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate"))
    must_keep(g.add_argument("--weight-decay", type=float, default=1e-4))
    must_keep(g.add_argument("--layer-decay", type=float, default=1.0,
                             help="layer-wise learning-rate decay: each backbone group deeper from the head trains at "
                             "this factor times the next one's rate (1 = off)"))
    must_keep(g.add_argument("--ema", type=float, metavar="DECAY", help="keep an exponential moving average of the "
                             "weights (e.g. 0.999), validated, calibrated and saved in place of the raw weights"))
    may_change(g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                              help="recompute activations in the backward pass: less memory, about a third more time"))
    must_keep(g.add_argument("--schedule", choices=["cosine", "plateau"], default="cosine",
                             help="cosine decay over the training samples after warm-up, or halve on a "
                             "validation-loss plateau (no warm-up)"))
    must_keep(g.add_argument("--warmup-epochs", type=float, help="linear warm-up length, in epochs (default 0.5 with "
                             "cosine)"))
    must_keep(g.add_argument("--freeze", type=int, help=f"backbone stages frozen at the start (torchvision: "
                             f"0-{N_STAGES}, stem then four stages; timm: its layer groups; default 2 with pretrained "
                             "weights, 0 with --weights none)"))
    must_keep(g.add_argument("--unfreeze-epoch", type=unfreeze_epoch, default=1, metavar="E|never",
                             help="epoch (0-based) from which every stage trains; never: --freeze holds for the whole "
                             "run"))
    must_keep(g.add_argument("--sampler", action=argparse.BooleanOptionalAction, default=True,
                             help="WeightedRandomSampler with inverse-frequency weights over the label values"))
    must_keep(g.add_argument("--sampler-cap", type=float, default=SAMPLER_CAP,
                             help="no row is drawn more than this many times as often as a uniform draw would "
                             "(0: no bound)"))
    must_keep(g.add_argument("--calibration", choices=CALIBRATIONS, default="affine",
                             help="monotone map fitted on the validation split at each validation, stored in the "
                             "checkpoint"))
    may_change(g.add_argument("--patience", type=int, default=3, help="early stopping: validations without improvement "
                              "of the validation loss; 0 turns it off"))
    must_keep(g.add_argument("--keep-top", type=int, default=0, metavar="K",
                             help="keep the K best validated weights in OUT_DIR/<slug>/top/ beside best.pt (0: off)"))
    must_keep(g.add_argument("--average-top", type=int, default=0, metavar="K",
                             help="at the end, average the K best kept weights (K <= --keep-top), recompute their "
                             "BatchNorm statistics on training batches and validate them: best.pt when better"))
    must_keep(g.add_argument("--val-per-epoch", type=int, default=1, metavar="N",
                             help="validate (and save best.pt and last.pt) N times an epoch, evenly spread; history.csv "
                             "gets a row per validation and --patience counts validations"))
    must_keep(g.add_argument("--seed", type=int, default=0, help="initialisation, sampling, dropout and augmentation "
                             f"(0 to {SEED_MAX})"))
    g = p.add_argument_group("runs")
    may_change(g.add_argument("--out-dir", type=Path, default=Path("checkpoints"), help="one folder per model"))
    may_change(g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                              help="carry on from OUT_DIR/<slug>/last.pt up to --epochs, from the sample where it "
                              "stopped (starts afresh, saying so, where there is none)"))
    may_change(g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                              help="start again in a model folder that holds another run, replacing its files"))
    may_change(g.add_argument("--log", "--live-log", dest="log", choices=LOG_KINDS, default="tensorboard",
                              help="live record of the run: TensorBoard events in each model folder's tb/ "
                              "(tensorboard --logdir OUT_DIR), Weights & Biases (needs the wandb package), or none; "
                              "under torchrun spell it --live-log (torchrun takes --log for its own --log-dir)"))
    may_change(g.add_argument("--save-every", type=float, default=SAVE_EVERY_MIN, metavar="MINUTES",
                              help="also save last.pt every this many minutes within an epoch (0: at validations and "
                              "signals only)"))
    g = add_device_flags(p)
    may_change(g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                              help="torch.compile the model"))
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags (a --config file first, the command line over it), defaults filled in and every
    value checked before any data is read: one line and exit 2 for a bad one."""
    p = make_parser()
    args = config.parse_args(p, argv)
    explicit_warmup = args.warmup_epochs
    fill_defaults(args)
    for message in bad_values(args, explicit_warmup):
        p.error(message)
    try:
        check_pathologies(args.pathology, ALL_LABELS)  # names only; the CSV's columns are checked later
        args.arch = check_arch(args.arch)
        limit = freeze_limit(args.arch, args.image_size) if args.freeze else 0  # timm: the model's own stages
        if args.freeze > limit:
            raise UserError(f"--freeze must be between 0 and {limit} for {args.arch} (its stem and stages as timm groups them), "
                            f"got {args.freeze}")
        check_kind(args.log)
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
    """One line for each impossible flag value (or combination), from the flags alone: nothing is read
    but file types (--weights, --cache-dir) and the names of the experiments/ scripts that build
    --augmented copies (experiments/NAME_images.py builds NAME)."""
    copies = sorted(f.name.removesuffix("_images.py") for f in (Path(__file__).parent / "experiments").glob("*_images.py"))
    checks = [(args.epochs < 1, f"--epochs must be at least 1, got {args.epochs}"),
              *((True, m) for m in common_flag_errors(args, min_size=32, why_min=" (every --arch downsamples 32x)")),
              (args.batch_size < 2, f"--batch-size must be at least 2 (BatchNorm cannot train on one image), got "
               f"{args.batch_size}"),
              (args.accum_steps < 1, f"--accum-steps must be at least 1, got {args.accum_steps}"),
              (not 0 < args.lr < math.inf, f"--lr must be positive and finite, got {args.lr}"),
              (not 0 <= args.weight_decay < math.inf, f"--weight-decay must be >= 0, got {args.weight_decay}"),
              (not 0 < args.layer_decay <= 1, f"--layer-decay must be in (0, 1], got {args.layer_decay}"),
              (args.ema is not None and not 0 < args.ema < 1, f"--ema must be in (0, 1), e.g. 0.999, got {args.ema}"),
              (args.hidden < 1, f"--hidden must be at least 1, got {args.hidden}"),
              (not 0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
              (not args.arch.startswith("timm/") and not 0 <= args.freeze <= N_STAGES,
               f"--freeze must be between 0 and {N_STAGES}, got {args.freeze}"),
              (args.freeze < 0, f"--freeze must be >= 0, got {args.freeze}"),
              (args.patience < 0, f"--patience must be >= 0, got {args.patience}"),
              (args.val_per_epoch < 1, f"--val-per-epoch must be at least 1, got {args.val_per_epoch}"),
              (args.keep_top < 0, f"--keep-top must be >= 0, got {args.keep_top}"),
              (args.average_top < 0 or args.average_top == 1,
               f"--average-top must be 0 (off) or at least 2, got {args.average_top}"),
              (args.average_top > args.keep_top, f"--average-top {args.average_top} averages kept weights: it needs "
               f"--keep-top {args.average_top} or more, got --keep-top {args.keep_top}"),
              (not 0 <= args.sampler_cap < math.inf, f"--sampler-cap must be >= 0 (0: no bound), got {args.sampler_cap}"),
              (not 0 <= args.warmup_epochs < math.inf, f"--warmup-epochs must be >= 0, got {args.warmup_epochs}"),
              (args.schedule == "plateau" and bool(explicit_warmup),
               "--warmup-epochs works with --schedule cosine only; plateau starts at --lr (drop --warmup-epochs)"),
              (not 0 <= args.save_every < math.inf, f"--save-every must be >= 0 minutes, got {args.save_every}"),
              (not 0 < args.val_frac < 1, f"--val-frac must be between 0 and 1, got {args.val_frac}"),
              (not 0 <= args.seed <= SEED_MAX, f"--seed must be between 0 and {SEED_MAX}, got {args.seed}"),
              (not 0 <= args.split_seed <= SEED_MAX, f"--split-seed must be between 0 and {SEED_MAX}, got {args.split_seed}"),
              (args.folds is not None and args.folds < 2, f"--folds must be at least 2, got {args.folds}"),
              (args.folds is None and args.fold != "all", "--fold needs --folds K"),
              (args.folds is not None and args.fold != "all" and not (args.fold.isdigit() and int(args.fold) < args.folds),
               f"--fold must be 0..{(args.folds or 1) - 1} or all, got {args.fold}"),
              (args.loader_workers is not None and args.loader_workers < 0,
               f"--loader-workers must be >= 0, got {args.loader_workers}"),
              *((True, f"--augmented {name}: not a copy that experiments/ builds; choose from {', '.join(copies)} "
                 f"(contrast also as contrastF, e.g. contrast1.5)") for name in args.augmented
                if name.rstrip("0123456789.") not in copies),
              (args.resume and args.overwrite, "--resume carries a run on, --overwrite starts it again: give one"),
              (args.weights not in ("imagenet", "none") and not Path(args.weights).is_file(),
               f"--weights {args.weights!r} is not imagenet, none or an existing file")]
    return [message for bad, message in checks if bad]


# ---------------------------------------------------------------------------------------------
# The loop

def train_step(state: TrainState, batches: list, rt: Runtime, show=None) -> torch.Tensor:
    """One optimizer step over `batches` (the --accum-steps micro-batches). Each micro-batch adds its
    summed loss divided by the labelled entries of all of them, so the step is that of one batch
    holding them all; under DDP the gradients are synchronised on the last micro-batch only.
    show(images), when given, sees the first micro-batch as the model does (augmented, uint8).
    Returns the step's (loss sum, labelled entries) on the device (no sync)."""
    s = state.settings
    total = max(1, sum(int(b[2].sum()) for b in batches))  # CPU tensors: no device sync
    step = torch.zeros(2, device=rt.device)
    state.optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches):
        images, targets, mask = to_device(batch[:3], rt)
        if len(batch) == 4:  # soft targets (--uncertain lsr-*): low + spread * U(0, 1), drawn per sample
            spread = batch[3].to(rt.device, non_blocking=True)
            targets = targets + spread * torch.rand_like(targets)
        if s.online_augment:
            images = online_augment(images, s.online_augment)
        images = augment_batch(images, s.augment)  # 'none' returns the batch itself
        if show is not None and i == 0:
            show(images)
        last = i == len(batches) - 1
        with state.net.no_sync() if rt.world > 1 and not last else contextlib.nullcontext():
            with rt.autocast():
                out = state.net(images)
            loss, n = loss_terms(out, targets, mask)
            state.scaler.scale(loss / total).backward()
        step += torch.stack([loss.detach(), n.to(loss.dtype)])  # no .item(): no sync per step
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if STEP_DELAY:
        time.sleep(STEP_DELAY)
    if state.ema is not None:
        state.ema.update_parameters(state.model)
    state.totals += step
    return step


def next_validation(state: TrainState, job: Job) -> int:
    """The position (samples into the epoch) of the next validation: --val-per-epoch N spreads N
    over the epoch, the last at its end."""
    n_val = state.settings.val_per_epoch
    k = state.validations - state.epoch * n_val  # validations done in this epoch
    return math.ceil((k + 1) * job.epoch_len / n_val)


def train_until(state: TrainState, job: Job, rt: Runtime, signals: StopSignals) -> bool:
    """Train epoch state.epoch from state.pos to the next validation point (or the epoch's end, which
    sets pos to the epoch's length). Returns False when a signal stopped it, after saving last.pt at
    that step. Checks happen at the same steps on every rank, at least every CHECK_SECONDS: the
    ranks agree on stop / save (--save-every) / a non-finite loss; one process also checks at once
    whenever a signal or a save is due."""
    s, n = state.settings, job.epoch_len
    point = next_validation(state, job)
    chunks = job.sampler.chunks(state.pos)
    todo = [c for c in chunks if c[0] < point]
    if todo:
        state.net.train()
        job.sampler.set_epoch(state.epoch, state.pos)
        batches = iter(job.loader)
        t0, saved, checked = time.time() - state.train_seconds, time.monotonic(), time.monotonic()
        interval, since, steps = 1, 0, []
        with tqdm(total=len(chunks), desc=f"{job.label} epoch {state.epoch + 1}/{s.epochs}", leave=False,
                  disable=not rt.progress, dynamic_ncols=True) as bar:
            for i in range(0, len(todo), s.accum_steps):
                group = todo[i:i + s.accum_steps]
                size = group[-1][1] - group[0][0]
                lr = state.set_lr(state.epoch * n + state.pos, s.epochs * n, s.warmup_epochs * n, size)
                first = rt.main and job.runlog is not None and state.epoch == 0 and state.pos == 0
                step = train_step(state, [next(batches) for _ in group], rt,
                                  show=(lambda im: job.runlog.image_grid("train/first_batch", im, 0)) if first else None)
                state.pos, state.since_val = group[-1][1], state.since_val + size
                state.train_seconds = time.time() - t0
                steps.append((state.epoch * n + state.pos, lr, step))
                bar.update(len(group))
                since += 1
                due = bool(s.save_every) and time.monotonic() - saved > s.save_every * 60
                end = i + s.accum_steps >= len(todo)
                if not (since >= interval or end or (rt.world == 1 and (due or signals.requested))):
                    continue
                per_step = (time.monotonic() - checked) / since
                stop, save, bad, interval = agree(rt, signals.requested is not None, due,
                                                  not bool(torch.isfinite(state.totals).all()),
                                                  proposal=max(1, int(CHECK_SECONDS / max(per_step, 1e-6))))
                checked, since = time.monotonic(), 0
                if rt.main and job.runlog is not None:
                    job.runlog.steps(steps)
                steps = []
                if bad:
                    raise UserError(f"{job.label}: the training loss is not finite in epoch {state.epoch + 1} (sample "
                                    f"{state.pos}); lower --lr, or try --no-amp."
                                    + (f" {job.folder / 'last.pt'} keeps the last state saved"
                                       if (job.folder / "last.pt").is_file() else ""))
                if stop or save:
                    save_last(state, job, rt, interrupted=stop)
                    saved = time.monotonic()
                if stop:
                    return False
    if len(todo) == len(chunks):
        state.pos = n  # the epoch's draw is used up (a last chunk too small for every rank is left out)
    return True


def validate(state: TrainState, job: Job, rt: Runtime, model: torch.nn.Module | None = None) -> dict:
    """Validation of the weights best.pt would save (every rank with rank 0's buffers): per-pathology
    metrics with a calibration map fitted on these predictions, their macro means, and the loss
    that picks best.pt and early stopping watches: the out-of-sample (patient-grouped
    cross-validated) MSE of the calibrated outputs over all labelled entries. "pred" holds the raw
    predictions (n_val, K) float32 in [-1, 1] (every rank has them all), "calibrated_oos" (n_val, K)
    float64 each row calibrated by a map fitted without its patient (val_predictions.csv's column).
    `model`: other weights to validate (--average-top's average) instead of state.validated."""
    s, t0 = state.settings, time.time()
    model = state.validated if model is None else model
    sync_buffers(model, rt)
    pred = predict(model, job.val_set, s.batch_size, rt)
    per, cals = {}, {}
    patients = job.val_rows["patient"].to_numpy()
    oos = np.empty(pred.shape, dtype=np.float64)
    for k, name in enumerate(job.names):
        t, prior = job.val_targets[:, k], float(job.train_means[k])
        m = ~np.isnan(t)
        cals[name] = fit_calibration(s.calibration, pred[m, k], t[m], prior=prior, groups=patients[m])
        oos[:, k] = calibrate_out_of_sample(s.calibration, pred[:, k], t, prior=prior, groups=patients)
        per[name] = pathology_metrics(pred[:, k], t, prior, cals[name])
    notice = cv_fallback_notice(job.label, per)  # too few patients: val_mse_cv is the raw MSE, never NaN
    if notice and not state.history:  # once, at a run's first validation
        rt.log(notice)
    n = sum(per[x]["n"] for x in job.names)
    loss = sum(per[x]["val_mse_cv"] * per[x]["n"] for x in job.names if per[x]["n"]) / n if n else float("nan")
    macro = {key: mean_defined([per[x][key] for x in job.names]) for key in METRIC_KEYS}
    return {"val_loss": loss, **macro, "per_pathology": per, "calibration": cals, "pred": pred,
            "calibrated_oos": oos, "val_seconds": time.time() - t0}


def save_last(state: TrainState, job: Job, rt: Runtime, interrupted: bool = False) -> None:
    """last.pt: the raw weights and state.training_state(), all --resume needs to go on from this
    sample exactly. Every rank calls it at the same step: the loss sums are summed over the ranks."""
    totals = state.totals.clone()
    if rt.world > 1:
        torch.distributed.all_reduce(totals)
    ts = state.training_state(totals.tolist())
    on_main(rt, lambda: checkpoint_of(state.model, state, job, state.history[-1] if state.history else {},
                                      state.best["calibration"], interrupted=interrupted,
                                      training_state=ts).save(job.folder / "last.pt"))


def end_validation(state: TrainState, job: Job, val: dict, rt: Runtime) -> None:
    """Record the validation just made: history row, early stopping, best.pt and val_predictions.csv
    when it improved, history.csv, curves.png, last.pt, the logs. At an epoch's end the next epoch
    starts at position 0."""
    s = state.settings
    if not math.isfinite(val["val_loss"]):
        raise UserError(f"{job.label}: the validation loss is not finite at epoch "
                        f"{state.progress(job.epoch_len):.2f} (the model's outputs are NaN); lower --lr, or try "
                        f"--no-amp")
    totals = state.totals.clone()
    if rt.world > 1:
        torch.distributed.all_reduce(totals)
    if state.plateau is not None:
        state.plateau.step(val["val_loss"])
    row = {"epoch": epoch_number(state.progress(job.epoch_len)), "train_loss": (totals[0] / totals[1].clamp(min=1)).item(),
           "samples": state.since_val, "lr": state.optimizer.param_groups[0]["lr"],
           "seconds": round(state.train_seconds + val["val_seconds"], 2), "train_seconds": round(state.train_seconds, 2),
           "train_images_per_s": round(state.since_val / max(state.train_seconds, 1e-9), 1),
           **{k: v for k, v in val.items() if k in METRIC_KEYS or k == "val_loss"}}
    if state.plateau is None:  # the rate the next step would train at
        n = job.epoch_len
        row["lr"] = state.set_lr(state.epoch * n + state.pos, s.epochs * n, s.warmup_epochs * n, 0)
    state.history.append(row)
    state.validations += 1
    state.since_val, state.train_seconds = 0, 0.0
    state.totals.zero_()
    if state.pos >= job.epoch_len:
        state.epoch, state.pos = state.epoch + 1, 0
    best = state.best
    improved = val["val_loss"] < best["val_loss"]
    if improved:
        per = {name: {**val["per_pathology"][name], "n_train": job.n_train_of(k)} for k, name in enumerate(job.names)}
        best.update(val_loss=val["val_loss"], epoch=row["epoch"], bad=0, calibration=val["calibration"],
                    metrics=jsonable({**row, "per_pathology": per}))
    else:
        best["bad"] += 1
    best["stopped"] = bool(s.patience and best["bad"] >= s.patience)
    keep, drop = False, []
    if s.keep_top:
        state.top, keep, drop = update_top(state.top, val["val_loss"], row["epoch"], state.validations, s.keep_top)
    on_main(rt, lambda: write_outputs(state, job, val, improved, keep, drop))
    save_last(state, job, rt)
    log_validation(state, job, row, val, improved, rt)


def average_top(state: TrainState, job: Job, rt: Runtime) -> None:
    """--average-top K, once training has ended: the mean of the K best kept weights, their
    BatchNorm statistics recomputed on training batches, validated; best.pt when it validates
    better than the best single validation. state.best["averaged"] records the outcome (so a
    resume does not redo it) and summary.json says which weights best.pt holds."""
    s = state.settings
    paths = [job.folder / e["file"] for e in state.top[:s.average_top]]
    if len(paths) < 2:
        state.best["averaged"] = {"k": len(paths), "kept": False, "note": "fewer than 2 validations kept"}
        rt.log(f"{job.label}: --average-top {s.average_top}: only {len(paths)} validation(s) kept, nothing to average")
        return
    model = average_weights(paths).build(rt.device, paths[0])
    if rt.cuda:
        model.to(memory_format=torch.channels_last)
    job.sampler.set_epoch(0)
    recompute_batchnorm(model, job.loader, rt.device)
    val = validate(state, job, rt, model)
    better = val["val_loss"] < state.best["val_loss"]
    state.best["averaged"] = {"k": len(paths), "val_loss": val["val_loss"], "kept": better,
                              "epochs": [e["epoch"] for e in state.top[:len(paths)]]}
    rt.log(f"{job.label}: the average of the {len(paths)} best validations: val {val['val_loss']:.4f} against "
           f"{state.best['val_loss']:.4f}, " + ("kept as best.pt" if better else "best.pt stays the best validation"))
    if better:
        per = {name: {**val["per_pathology"][name], "n_train": job.n_train_of(k)} for k, name in enumerate(job.names)}
        state.best.update(val_loss=val["val_loss"], calibration=val["calibration"], metrics=jsonable(
            {**{k: v for k, v in val.items() if k in METRIC_KEYS or k == "val_loss"}, "epoch": state.best["epoch"],
             "averaged": len(paths), "per_pathology": per}))
        on_main(rt, lambda: write_best(state, job, val, model))
    save_last(state, job, rt)


def log_validation(state: TrainState, job: Job, row: dict, val: dict, improved: bool, rt: Runtime) -> None:
    """One console line, and the validation's numbers per pathology in TensorBoard."""
    s = state.settings
    rt.log(f"{job.label} epoch {row['epoch']}/{s.epochs}: train {row['train_loss']:.4f}  val {val['val_loss']:.4f}  "
           f"mse {val['val_mse']:.4f} -> cal {val['val_mse_cv']:.4f} out of sample, {val['val_mse_cal']:.4f} in "
           f"(const {val['const_mse']:.4f})  auc {val['val_auc']:.4f}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
           + ("  *" if improved else ""))
    if state.best["stopped"]:
        rt.log(f"{job.label}: early stop, no improvement for {s.patience} validations")
    if rt.main and job.runlog is not None:
        job.runlog.validation(state.epoch * job.epoch_len + state.pos, row, val["per_pathology"])


def prepare_epoch(state: TrainState, rt: Runtime) -> None:
    """Freeze the stages this epoch keeps frozen; (re)wrap the model when that changes, since DDP
    registers the trainable parameters when it wraps."""
    s = state.settings
    frozen = s.freeze if s.unfreeze_epoch == "never" or state.epoch < s.unfreeze_epoch else 0
    if state.net is None or frozen != state.model.frozen:
        set_frozen(state.model, frozen)
        state.net = torch.compile(state.model) if s.compile else state.model
        if rt.world > 1:
            state.net = DDP(state.net, device_ids=[rt.device.index] if rt.cuda else None)


def finished(state: TrainState) -> bool:
    return state.best["stopped"] or state.epoch >= state.settings.epochs


def train_job(names: list[str], folder: Path, data: dict, is_val: np.ndarray, split: dict, args, rt: Runtime
              ) -> dict | None:
    """Train one model for `names` on the rows labelled for any of them; returns its summary. The
    loop, as in pytorch/examples' imagenet: train to the next validation, validate, save, stop early.
    args.yaml and manifest.json are written at the start, manifest.json completed at the end with
    the reason the run ended."""
    job = prepare_job(names, folder, data["table"], is_val, split, data["sources"], args, rt)
    if job is None:
        return None
    ckpt = load_last(job, args, rt, make_parser())
    state = build_state(job, args, rt, ckpt)
    if finished(state) and not (args.average_top and "averaged" not in state.best):
        rt.log(f"{job.label}: already finished ({state.epoch} epochs{', early-stopped' if state.best['stopped'] else ''})")
        return write_summary(state, job, data, rt)
    fold = split.get("fold")
    on_main(rt, lambda: config.write_args_yaml(job.folder / "args.yaml", args, make_parser(), pathology=job.names,
                                               fold="all" if fold is None else str(fold)))
    manifest = on_main(rt, lambda: start_manifest(job.folder, resumed=ckpt is not None, device=rt.device,
                                                  world_size=rt.world, **data["manifest"]))
    # a resumed run hides what the killed one logged after last.pt was saved: one value per step
    job.runlog = RunLog(job.folder, args.log, enabled=rt.main, name=job.label,
                        purge_step=state.epoch * job.epoch_len + state.pos + 1 if ckpt else None)
    reason = "error"
    try:
        rt.log(f"{'resuming' if ckpt else 'training'} {job.label} (view {args.view}): {job.n_train} train rows x "
               f"{len(data['sources'])} sources, {len(job.val_targets)} val rows, {len(names)} head(s), {rt.device}"
               + (f" x{rt.world}" if rt.world > 1 else "")
               + (f", from epoch {state.epoch + 1} sample {state.pos}" if ckpt else ""))
        with StopSignals(announce=rt.main) as signals:
            while not finished(state):
                prepare_epoch(state, rt)
                if not train_until(state, job, rt, signals):
                    reason = signal_name(signals.requested)
                    rt.log(f"saved {job.folder / 'last.pt'} at epoch {state.epoch + 1}, sample {state.pos}; "
                           f"continue with the same command and --resume")
                    raise SystemExit(130)
                end_validation(state, job, validate(state, job, rt), rt)
                # a signal during the validation: the ranks agree here too (one may have it, another not)
                if agree(rt, signals.requested is not None)[0] and not finished(state):
                    reason = signal_name(signals.requested)
                    rt.log(f"saved {job.folder / 'last.pt'} at epoch {epoch_number(state.progress(job.epoch_len))}; "
                           f"continue with the same command and --resume")
                    raise SystemExit(130)
            if args.average_top and "averaged" not in state.best:
                average_top(state, job, rt)
        reason = "early stop" if state.best["stopped"] else "finished"
        summary = write_summary(state, job, data, rt)
        job.runlog.hparams(config.settings(args, make_parser()),
                           {f"best/{k}": summary.get(k) for k in ("val_loss", *METRIC_KEYS, "best_epoch")},
                           step=state.epoch * job.epoch_len + state.pos)
        return summary
    except UserError as e:
        reason = f"error: {e}"
        raise
    except KeyboardInterrupt:
        reason = "SIGINT"
        raise
    except SystemExit:
        raise
    except BaseException as e:
        reason = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise
    finally:
        close_loader(job.loader)
        job.runlog.close()
        if rt.main and manifest is not None:  # no collective here: another rank may have failed
            with contextlib.suppress(Exception):  # never hide the error that ended the run
                finish_manifest(job.folder, manifest, reason)


def signal_name(signum: int | None) -> str:
    """The manifest's exit reason for a stop: this process's signal, or SIGTERM when another rank got
    it (the ranks stop together; SLURM signals them all)."""
    import signal
    return signal.Signals(signum).name if signum else "SIGTERM"


# ---------------------------------------------------------------------------------------------
# Data, splits, folds and the whole run

def read_table(args, rt: Runtime) -> tuple[pd.DataFrame, Path, Path]:
    """The training CSV read (labels on the project's scale), its data root and path."""
    root, csv_path = resolve_data(args.data_root, args.train_csv, "train2023.csv", log=rt.log)
    if args.data_root is None:
        rt.log(f"no --data-root: using the demo dataset in {root} ({args.image_size}px, {args.epochs} epochs, "
               f"batch {args.batch_size}, --weights {args.weights}); see README to train on real data")
    check_outputs(folders={"--out-dir": args.out_dir}, data_root=root,
                  inputs={"--train-csv": csv_path, "--weights": None if args.weights in ("imagenet", "none")
                          else Path(args.weights)}, probe=rt.main)  # only the writing process creates it
    table = read_train_csv(csv_path, convention=args.label_convention, patient_col=args.patient_col)
    args.label_convention = table.attrs["label_convention"]  # what was used, in summary.json and checkpoints
    rt.log(describe_convention(args.label_convention, table.attrs["label_convention_how"]))
    rt.log(describe_patients(table))
    return table, root, csv_path


def load_images(table: pd.DataFrame, root: Path, csv_path: Path, args) -> tuple[pd.DataFrame, list]:
    """The training table with cache slots, and its image sources (the cache, then --augmented copies).
    Under torchrun every process gets its data ready on its own, before the process group: the
    first to need the cache makes it, the others wait on the files, never in a collective whose
    timeout a long cache build would outlast."""
    table, cache = cached_table(table, root, args.image_size, args.cache_dir, csv_path.stem, args.square,
                                args.workers, progress=args.progress, equalize=args.equalize)
    return table, [cache] + [find_augmented(cache, a) for a in args.augmented]


def model_folders(names: list[str], args) -> list[tuple[list[str], Path, list[Path]]]:
    """(pathologies, model folder, the folders this command trains in) for each model."""
    jobs = [(names, slug("multi_head", args.view))] if args.multi_head else [([n], slug(n, args.view)) for n in names]
    out = []
    for job_names, name in jobs:
        folder = args.out_dir / name
        folds = [] if args.folds is None else range(args.folds) if args.fold == "all" else [int(args.fold)]
        out.append((job_names, folder, [fold_folder(folder, i) for i in folds] or [folder]))
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rt = setup_runtime(args, join=False)
    try:
        table, root, csv_path = read_table(args, rt)
        names = check_pathologies(args.pathology, table.attrs["labels"])
        models = model_folders(names, args)
        for _, folder, folders in models:  # before any image is read: a run is never erased by accident
            check_layout(folder, args.folds is not None)  # every rank checks: no process group yet
            for f in folders:
                prepare_folder(f, args.resume, args.overwrite, rt.log, remove=rt.main)
        table, sources = load_images(table, root, csv_path, args)
        join_process_group(rt)
        check_same_table(rt, table["path"].tolist(), sha1([*table["path"], table[names].to_numpy().tobytes().hex()]))
        # One stream per rank (dropout, augmentation); rank 0's is a single process's. The split and
        # the sampler draw from their own seeded generators, the same on every rank, and DDP gives
        # every rank rank 0's initial weights.
        seed_everything(args.seed + rt.rank)
        data = {"table": table, "sources": sources,
                "manifest": on_main(rt, lambda: {"data_root": str(root), "train_csv": file_fingerprint(csv_path),
                                                 "cache_key": sources[0].folder.name})}
        summaries, rows = [], []
        for job_names, folder, _ in models:
            for fold, is_val, split in patient_splits(table["patient"], args.split_seed, args.val_frac, args.folds,
                                                      args.fold):
                s = train_job(job_names, folder if fold is None else fold_folder(folder, fold), data, is_val, split,
                              args, rt)
                if s:
                    summaries.append(s)
                    rows += table_rows(s, fold)
            if args.folds:
                rows += out_of_fold(folder, job_names, table, args, rt)
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
