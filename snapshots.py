"""--keep-top and --average-top: the K best validated weights of a run, kept in RUN/top/ beside
best.pt, and their average (as the CheXpert baseline ensembled its best checkpoints and timm averages
its checkpoint history): the weights' mean, BatchNorm statistics recomputed on training batches,
validated like any other weights and kept as best.pt only when they validate better.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import torch

from model import Checkpoint

BN_BATCHES = 100  # training batches that the averaged weights' BatchNorm statistics are recomputed on


def top_name(validation: int) -> str:
    return f"top/validation{validation:04d}.pt"


def update_top(top: list[dict], val_loss: float, epoch, validation: int, k: int) -> tuple[list[dict], bool, list[str]]:
    """The kept list after a validation: entries {"val_loss", "epoch", "file"} (file relative to the
    run folder), best first, at most k. Returns (new list, whether this validation's weights join it
    (to be saved as top_name(validation)), the files that fell out (to be removed))."""
    entry = {"val_loss": float(val_loss), "epoch": epoch, "file": top_name(validation)}
    ranked = sorted([*top, entry], key=lambda e: e["val_loss"])
    kept = ranked[:k]
    return kept, entry in kept, [e["file"] for e in ranked[k:] if e is not entry]


def average_weights(paths: list[Path]) -> Checkpoint:
    """The checkpoint whose weights are the mean of these checkpoints' (floating-point tensors; the
    first file's for counters such as BatchNorm's num_batches_tracked), its other fields the first's.
    The BatchNorm running statistics are means too, until recompute_batchnorm replaces them."""
    ckpts = [Checkpoint.load(p) for p in paths]
    first = ckpts[0]
    mean = {}
    for key, value in first.state_dict.items():
        if value.is_floating_point():
            mean[key] = torch.stack([c.state_dict[key].double() for c in ckpts]).mean(0).to(value.dtype)
        else:
            mean[key] = value.clone()
    return Checkpoint(**{**vars(first), "state_dict": mean})


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, loader, device: torch.device, batches: int = BN_BATCHES) -> None:
    """BatchNorm running statistics of the layers that train, from `batches` training batches (a
    cumulative mean: momentum None, as torch's update_bn does), the weights left as they are. Not
    update_bn itself: it resets every BatchNorm layer, and the stages --freeze keeps in eval would
    then normalise with zeros and ones. loader yields (images, ...) with uint8 images; the run's
    random streams are left untouched (the forward passes draw dropout masks)."""
    was = model.training
    model.train()  # XrayNet keeps frozen stages in eval: their statistics stay as trained
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in itertools.islice(loader, batches if layers else 0):
            model(batch[0].to(device))
    for m, momentum in momenta.items():
        m.momentum = momentum
    model.train(was)
