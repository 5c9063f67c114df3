"""Pretrained weights for a model's backbone (train.py --weights): torchvision's ImageNet weights
through torchvision's weights API, timm's pretrained weights for a timm/NAME arch, or a local file
(a torchvision state dict, torchxrayvision's DenseNet-121 / ResNet-50, a timm .safetensors / .pth,
or one of our checkpoints). Each sets the input normalisation its weights expect. Where a download
fails, one line says so and names --weights PATH and --weights none.
"""
from __future__ import annotations

import re
from pathlib import Path

import safetensors.torch
import timm
import torch
import torchvision

from common import UserError
from model import (ARCHS, CHECKPOINT_FORMAT, CLASSIFIER, IMAGE_MEAN, IMAGE_STD, TIMM_PREFIX, XrayNet, arch_label,
                   create_timm)

# torchxrayvision's input scale, (2 x/255 - 1) * 1024 in [-1024, 1024], as our (x/255 - mean) / std
XRV_MEAN, XRV_STD = 0.5, 0.5 / 1024
# torchvision's DenseNet ImageNet files still use the old 'norm.1' names for what is now 'norm1'
OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                              r"([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")




def load_pretrained(model: XrayNet, weights: str) -> dict:
    """Load backbone weights into model and set the input normalisation they expect.

    weights: 'none' (random init, normalisation unchanged), 'imagenet' (torchvision's weights API
    for a torchvision arch; timm's pretrained weights, of the arch's tag, for timm/NAME), or a PATH:
    - torchvision archs: a torchvision state dict of that arch; torchxrayvision's DenseNet-121
      (densenet121-res224-all) or ResNet-50 (resnet50-res512-all) state dict, its classifier and
      op_threshs dropped and its [-1024, 1024] input scale kept (mean XRV_MEAN, std XRV_STD);
    - timm archs: a timm file of that model (.safetensors, or .pth/.bin of a state dict), loaded by
      timm as its pretrained weights would be (stem folded, position embeddings resized);
    - either: one of our checkpoints of that arch (its backbone and normalisation).
    RGB stem filters are summed over colour, which is what a gray image copied to three channels
    would see. Normalisation: ImageNet's averaged to gray, or for timm weights their pretrained_cfg's
    mean and std averaged over RGB. It goes into model.config (so the checkpoint records it).
    Returns {"source": 'none'|'imagenet'|'torchvision'|'torchxrayvision'|'timm'|'checkpoint', "mean", "std"}."""
    if weights == "none":
        return {"source": "none", "mean": float(model.mean), "std": float(model.std)}
    if weights == "imagenet" and model.family == "timm":
        state, source, norm = timm_state(model), "imagenet", timm_normalisation(model)
    elif weights == "imagenet":
        state, source, norm = imagenet_state(model.arch), "imagenet", (IMAGE_MEAN, IMAGE_STD)
    else:
        state, source, norm = read_weights(Path(weights), model)
    load_backbone(model, state, weights)
    model.set_normalisation(*norm)
    return {"source": source, "mean": norm[0], "std": norm[1]}


def imagenet_state(arch: str) -> dict:
    w = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return w.get_state_dict(progress=True)
    except Exception as e:
        raise UserError(f"could not download the ImageNet {ARCHS[arch][2]} weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no network?'}); use --weights PATH with a "
                        f"local copy of {w.url.rsplit('/', 1)[-1]}, or --weights none") from e


def timm_normalisation(model: XrayNet) -> tuple[float, float]:
    """The timm model's pretrained_cfg mean and std, averaged over RGB (as the stem is summed)."""
    cfg = model.backbone.pretrained_cfg
    return round(sum(cfg["mean"]) / len(cfg["mean"]), 6), round(sum(cfg["std"]) / len(cfg["std"]), 6)


def timm_state(model: XrayNet, path: Path | None = None) -> dict:
    """The backbone state dict of a fresh timm model given its pretrained weights by timm: downloaded
    (path None) or read from a local file. timm folds the RGB stem to one channel (in_chans=1) and
    adapts them to the model (e.g. a ViT's position embeddings to the image size)."""
    cfg, size = model.backbone.pretrained_cfg, model.config.get("image_size")
    if path is None:
        where = (f"model.safetensors from https://huggingface.co/{cfg['hf_hub_id']}" if cfg.get("hf_hub_id")
                 else (cfg.get("url") or "").rsplit("/", 1)[-1])
        if not where:
            raise UserError(f"timm has no pretrained weights for {model.arch}; use --weights PATH or --weights none")
        try:
            return create_timm(model.arch, size, pretrained=True).state_dict()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "no network?"
            raise UserError(f"could not download the pretrained {model.arch} weights ({type(e).__name__}: {first}); "
                            f"use --weights PATH with a local copy of {where}, or --weights none") from e
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as e:
        raise UserError(f"--weights {path}: not a loadable timm state dict ({type(e).__name__}); a file that "
                        f"pickles more than tensors must be saved as its state_dict() first") from e
    classifier = cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if k.rpartition(".")[0] not in classifier}
    try:  # passed as a state dict, with no classifier named, timm loads it strictly: a wrong file fails
        fresh = create_timm(model.arch, size, pretrained=True,
                            pretrained_cfg_overlay={"state_dict": state, "classifier": None})
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else type(e).__name__
        raise UserError(f"--weights {path}: not timm's {model.arch[len(TIMM_PREFIX):]} weights "
                        f"({detail[:150]}{'...' if len(detail) > 150 else ''})") from e
    return fresh.state_dict()


def read_weights(path: Path, model: XrayNet) -> tuple[dict, str, tuple[float, float]]:
    """(backbone state dict, source, (mean, std)) from a --weights file; see load_pretrained."""
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file (use imagenet, none or a path)")
    try:
        state = (safetensors.torch.load_file(path) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:
        state = None  # a timm file: timm_state reads it again and names the problem
        if model.family != "timm":
            raise UserError(f"--weights {path}: not a loadable state dict ({type(e).__name__}); torchxrayvision's "
                            f"DenseNet release files are pickled models: save their state_dict() first (docs/training.md)") from e
    arch = model.arch
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        cfg = state.get("model_config", {})
        if cfg.get("arch", "resnet50") != arch:
            raise UserError(f"--weights {path}: a checkpoint of a {cfg.get('arch', 'resnet50')} model; "
                            f"use --arch {cfg.get('arch', 'resnet50')}")
        backbone = {k[len("backbone."):]: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
        return backbone, "checkpoint", (cfg.get("mean", IMAGE_MEAN), cfg.get("std", IMAGE_STD))
    if model.family == "timm":
        return timm_state(model, path), "timm", timm_normalisation(model)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path}: not a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("model.") or k == "op_threshs" for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}  # xrv.models.ResNet wraps torchvision's
        state.setdefault("op_threshs", torch.zeros(0))  # a marker: only torchxrayvision writes this layout
    one_channel = [k for k in ("conv1.weight", "features.conv0.weight") if k in state and state[k].ndim == 4
                   and state[k].shape[1] == 1]
    if "op_threshs" not in state and not one_channel:
        return state, "torchvision", (IMAGE_MEAN, IMAGE_STD)
    xrv_arch = "densenet121" if "features.conv0.weight" in state else (
        "resnet101" if "layer3.22.conv1.weight" in state else "resnet50")
    if xrv_arch != arch:
        raise UserError(f"--weights {path}: torchxrayvision {ARCHS[xrv_arch][2]} weights; use --arch {xrv_arch}")
    return state, "torchxrayvision", (XRV_MEAN, XRV_STD)


def load_backbone(model: XrayNet, state: dict, weights: str) -> None:
    """Load a state dict into model.backbone: a timm model's as it is (timm adapted it already); a
    torchvision-named one with its classifier dropped and its RGB stem summed."""
    if model.family == "timm":
        expected = f"expected timm's {model.arch[len(TIMM_PREFIX):]} weights or one of our checkpoints of that arch"
    else:
        head = CLASSIFIER[model.family] + "."
        state = {OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items() if not k.startswith(head) and k != "op_threshs"}
        stem = model.stem + ".weight"
        if stem in state and state[stem].ndim == 4 and state[stem].shape[1] == 3:
            state[stem] = state[stem].sum(dim=1, keepdim=True)
        expected = (f"expected torchvision's {model.arch} state dict, torchxrayvision's densenet121-res224-all or "
                    f"resnet50-res512-all, or one of our checkpoints")
    label = arch_label(model.arch)
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"--weights {weights}: tensors of the wrong shape for a {label} ({expected}): "
                        f"{str(e).splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise UserError(f"--weights {weights}: not a {label} backbone ({expected}; {len(missing)} missing and "
                        f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]})")


