"""The state of a training run: one type, TrainState, holding everything that changes while a model
trains and all that --resume needs. `training_state()` is what last.pt carries beside the weights
and `restore()` reads it back; they sit side by side. history.csv, curves.png, summary.json and
best.pt are outputs written from this state, never read back to resume.

Positions are global sample counts (all ranks together), never steps of one world size: the
learning-rate schedule is a function of the samples drawn, and the epoch position is the number of
samples of the epoch's draw already trained. A run saved on N processes resumes on M.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from common import UserError, jsonable
from model import Checkpoint, build_model, model_config, n_stages, param_groups, set_grad_checkpointing
from runtime import Runtime, on_main, rng_state, set_rng_state
from weights import load_pretrained


def lr_factor(done: float, total: float, warmup: float, step: float = 0.0) -> float:
    """The cosine schedule, as a function of samples: the factor of --lr for an optimizer step that
    starts after `done` of the run's `total` samples and trains on `step` of them. A linear warm-up
    over the first `warmup` samples (counting this step's, so the first step does not train at 0),
    then half a cosine from 1 to 0 at `total`."""
    if done < warmup:
        return min(1.0, (done + step) / warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (done - warmup) / max(1.0, total - warmup))))


def fresh_best() -> dict:
    """Early stopping and best.pt: the best validation loss so far, its epoch (a fraction with
    --val-per-epoch), validations since it improved, whether the run stopped, best.pt's calibration."""
    return {"val_loss": float("inf"), "epoch": -1, "bad": 0, "stopped": False, "calibration": {}}


@dataclass
class TrainState:
    """One model's training run as it stands; see the module docstring."""
    settings: argparse.Namespace  # the run's settings (its args.yaml): what it trains and how
    model: torch.nn.Module        # the raw weights, on the device
    ema: AveragedModel | None
    optimizer: torch.optim.Optimizer  # each group has base_lr: --lr times its layer-decay scale
    scaler: torch.amp.GradScaler
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None  # --schedule plateau
    epoch: int = 0                # complete epochs
    pos: int = 0                  # samples of epoch `epoch`'s draw trained so far, all ranks together
    since_val: int = 0            # samples trained since the last validation, all ranks (history's samples)
    totals: torch.Tensor | None = None  # (2,) loss sum and labelled entries since the last validation, this rank
    train_seconds: float = 0.0    # since the last validation
    validations: int = 0          # validations so far
    history: list[dict] = field(default_factory=list)  # history.csv's rows, one per validation
    best: dict = field(default_factory=fresh_best)
    top: list[dict] = field(default_factory=list)      # --keep-top: {"val_loss", "epoch", "file"}, best first
    net: torch.nn.Module | None = None  # the model as trained (compiled, DDP-wrapped); not saved

    @property
    def validated(self) -> torch.nn.Module:
        """The weights that are validated, calibrated and saved as best.pt: the EMA's with --ema."""
        return self.ema.module if self.ema is not None else self.model

    def progress(self, epoch_len: int) -> float:
        """Epochs trained, with the fraction of the current one: epoch + pos / epoch_len."""
        return self.epoch + self.pos / epoch_len

    def set_lr(self, done: float, total: float, warmup: float, step: float) -> float:
        """Set every group's rate for the next optimizer step (cosine; --schedule plateau leaves the
        rates to ReduceLROnPlateau); returns the first group's."""
        if self.plateau is None:
            f = lr_factor(done, total, warmup, step)
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * f
        return self.optimizer.param_groups[0]["lr"]

    def training_state(self, totals: list[float] | None) -> dict:
        """What last.pt holds beside the weights (Checkpoint.training_state); restore() reads it back.
        `totals`: the loss sums since the last validation over all ranks (save_last reduces them)."""
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "plateau": None if self.plateau is None else self.plateau.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(), "rng": rng_state(),
                "epoch": self.epoch, "pos": self.pos, "since_val": self.since_val, "totals": totals,
                "train_seconds": self.train_seconds, "validations": self.validations, "history": self.history,
                "best": self.best, "top": self.top}

    def restore(self, ts: dict, rank: int) -> list[str]:
        """Read training_state() back into this freshly built state (the weights already loaded).
        Rank 0 takes the saved loss sums, the others start theirs at zero, so the sums stay global on
        any number of processes. A scaler saved disabled (bf16 or fp32: an empty state) and resumed
        where fp16 needs one starts afresh, and the other way round it is not needed: a resume works
        across precisions. Returns notices for the log. The RNG streams are restored last."""
        notes = []
        self.optimizer.load_state_dict(ts["optimizer"])  # casts the state to each parameter's device
        if ts["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(ts["scaler"])
        elif self.scaler.is_enabled():
            notes.append("saved without fp16 loss scaling: the gradient scaler starts afresh")
        if self.plateau is not None and ts.get("plateau"):
            self.plateau.load_state_dict(ts["plateau"])
        if self.ema is not None:
            self.ema.load_state_dict(ts["ema"])
        self.epoch, self.pos, self.since_val = ts["epoch"], ts["pos"], ts["since_val"]
        self.train_seconds, self.validations = ts["train_seconds"], ts["validations"]
        self.history, self.best, self.top = ts["history"], ts["best"], ts["top"]
        device = next(self.model.parameters()).device
        self.totals = (torch.tensor(ts["totals"], device=device) if ts["totals"] and rank == 0
                       else torch.zeros(2, device=device))
        set_rng_state(ts["rng"], rank)  # last: nothing may draw from the streams before training goes on
        return notes


def build_state(job, args, rt: Runtime, ckpt: Checkpoint | None = None) -> TrainState:
    """A fresh model, optimiser and scaler; or, from last.pt (loaded on the CPU), all of them as
    saved (TrainState.restore), moved to rt.device: the model rebuilt from the file's own config (its
    normalisation kept), the optimizer state moved by load_state_dict, the RNG streams restored last."""
    if ckpt is None:
        model = build_model(model_config(job.names, args.head, args.hidden, args.dropout, args.arch, job.head_type,
                                         args.image_size))
        source = load_pretrained(model, args.weights)
        rt.log(f"{job.label}: {args.arch}, {job.head_type} head(s), weights {source['source']}"
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
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "base_lr": args.lr * g["lr_scale"],
               "lr": args.lr * g["lr_scale"]} for g in param_groups(model, args.weight_decay, args.layer_decay)]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
               if args.schedule == "plateau" else None)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    state = TrainState(args, model, ema, optimizer, scaler, plateau, totals=torch.zeros(2, device=rt.device))
    if ckpt is not None:
        for note in state.restore(ckpt.training_state, rt.rank):
            rt.log(f"{job.label}: {note}")
        old = ckpt.train_config.get("epochs")
        if old != args.epochs and args.schedule == "cosine":
            rt.log(f"{job.label}: --epochs {old} -> {args.epochs}: the cosine schedule now runs over {args.epochs} "
                   f"epochs, from where the run is (epoch {state.progress(job.epoch_len):.2f})")
    return state


def load_last(job, args, rt: Runtime, parser) -> Checkpoint | None:
    """last.pt when the folder holds a run to carry on (runs.prepare_folder decided; on the CPU,
    whatever device it came from), after checking that this command is the same run (the must-keep
    flags of `parser`, the pathologies, the split); None for a fresh start."""
    path = job.folder / "last.pt"
    if not (args.resume and on_main(rt, path.is_file)):
        return None
    if not path.is_file():
        raise UserError(f"--resume: rank {rt.rank} cannot see {path}, which rank 0 has: put --out-dir on a "
                        f"filesystem that every node shares")
    ckpt = Checkpoint.load(path)
    if ckpt.training_state is None or "pos" not in ckpt.training_state:
        raise UserError(f"--resume: {path} was written by an older version of train.py, whose state cannot be "
                        f"carried on; start again with --overwrite")
    diff = resume_differences(ckpt, job.names, job.split, args, parser)
    if diff:
        raise UserError(f"--resume: {path} is another run ({'; '.join(diff)}); rerun with its flags, or start "
                        f"afresh in another --out-dir (or with --overwrite)")
    return ckpt


def resume_differences(ckpt, names: list[str], split: dict, args, parser) -> list[str]:
    """What makes this command another run than the one that wrote last.pt: '--flag saved -> now'
    for each flag declared must_keep (common.must_keep) whose value differs, then the pathologies and
    the split. A flag marked neither way counts as must-keep."""
    now = jsonable(vars(args))
    out = []
    for action in parser._actions:
        k = action.dest
        if not action.option_strings or getattr(action, "on_resume", "must keep") != "must keep":
            continue
        if k in ckpt.train_config and k in now and now[k] != ckpt.train_config[k]:
            out.append(f"{action.option_strings[0]} {ckpt.train_config[k]} -> {now[k]}")
    if ckpt.pathologies != names:
        out.append(f"pathologies {ckpt.pathologies} -> {names}")
    changed = [k for k in ("val_patients_sha1", "folds_sha1", "rows_sha1") if k in ckpt.split
               and ckpt.split[k] != split.get(k)]
    if changed and out:  # flags that move the split: the patients follow from them
        out.append("the validation patients differ" if changed != ["rows_sha1"] else "the training rows differ")
    elif changed:  # the same flags: the data changed (a row removed can move every patient of the split)
        out.append("the training rows, their labels or the split's patients differ (the CSV or its readable images "
                   "changed)")
    return out
