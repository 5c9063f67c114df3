"""The network (a torchvision backbone with a one-channel stem and one small MLP head per pathology)
and the checkpoint format. No other file knows the checkpoint format.

Output scale: a 'regression' head ends in tanh, so raw outputs are on the label scale [-1, 1]
already (1 positive, 0 uncertain, -1 negative); a 'three-class' head gives logits over negative /
uncertain / positive, and XrayNet.score turns them into p(positive) - p(negative), on [-1, 1] too.
A calibration map fitted on the validation split (calibration.py) then moves scores to where
the MSE metric wants them, still on [-1, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from torch.utils.data import DataLoader
from tqdm import tqdm

from cache import SQUARE_MODES
from common import UserError, save_torch
from runtime import Runtime, to_device

CHECKPOINT_FORMAT = "cxr-regression"
CHECKPOINT_VERSION = 2  # 2: model_config may name another arch or head type; version 1 files still load
IMAGE_MEAN, IMAGE_STD = 0.449, 0.226  # ImageNet's RGB statistics averaged to one gray channel
N_STAGES = 5  # stem and four stages (strides 4, 8, 16, 32 on ResNets): what --freeze N counts

# --arch: torchvision name -> (family, width of the pooled features, name in messages)
ARCHS = {
    "resnet18": ("resnet", 512, "ResNet-18"),
    "resnet50": ("resnet", 2048, "ResNet-50"),
    "resnet101": ("resnet", 2048, "ResNet-101"),
    "densenet121": ("densenet", 1024, "DenseNet-121"),
    "convnext_tiny": ("convnext", 768, "ConvNeXt-Tiny"),
    "efficientnet_v2_s": ("efficientnet", 1280, "EfficientNetV2-S"),
}
# the ImageNet classifier of each family, replaced by Identity (its tensors dropped from pretrained weights)
CLASSIFIER = {"resnet": "fc", "densenet": "classifier", "convnext": "classifier.2", "efficientnet": "classifier.1"}
# 'three-class': logits over (negative, uncertain, positive), class = label + 1
HEAD_TYPES = ("regression", "three-class")
N_CLASSES = 3
# torchxrayvision's input scale, (2 x/255 - 1) * 1024 in [-1024, 1024], as our (x/255 - mean) / std
XRV_MEAN, XRV_STD = 0.5, 0.5 / 1024
# torchvision's DenseNet ImageNet files still use the old 'norm.1' names for what is now 'norm1'
OLD_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                              r"([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")

# Head variants. 'regularized' (a smaller head, more dropout) is what the original found best for
# Fracture, a rare finding with a faint signal where a wide head over-fits; 'auto' picks it there.
HEAD_VARIANTS = {
    "mlp": lambda hidden, dropout: (hidden, dropout),
    "regularized": lambda hidden, dropout: (min(hidden, 128), max(dropout, 0.5)),
}
AUTO_HEAD = {"Fracture": "regularized"}


def head_config(pathology: str, variant: str, hidden: int, dropout: float) -> dict:
    """The head for one pathology: variant 'auto' picks AUTO_HEAD's choice, else 'mlp'."""
    if variant == "auto":
        variant = AUTO_HEAD.get(pathology, "mlp")
    h, d = HEAD_VARIANTS[variant](hidden, dropout)
    return {"pathology": pathology, "variant": variant, "hidden": int(h), "dropout": float(d)}


def one_channel_stem(net: nn.Module) -> str:
    """Replace net's first convolution (RGB in) by one of the same shape taking one channel; its name."""
    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(1, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    replace_module(net, name, new)
    return name


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def backbone_stages(family: str, b: nn.Module) -> list[nn.Module]:
    """The N_STAGES groups that --freeze counts: the stem, then the four stages up to the last block
    (for ResNets stem, layer1..layer4; each later stage opens with its downsampling)."""
    group = nn.ModuleList
    if family == "resnet":
        return [group([b.conv1, b.bn1]), b.layer1, b.layer2, b.layer3, b.layer4]
    f = b.features
    if family == "densenet":
        return [group([f.conv0, f.norm0]), f.denseblock1, group([f.transition1, f.denseblock2]),
                group([f.transition2, f.denseblock3]), group([f.transition3, f.denseblock4, f.norm5])]
    if family == "convnext":  # the LayerNorm after pooling belongs to the last stage
        return [f[0], f[1], group([f[2], f[3]]), group([f[4], f[5]]), group([f[6], f[7], b.classifier[0]])]
    return [group([f[0], f[1]]), f[2], f[3], group([f[4], f[5]]), group([f[6], f[7]])]  # efficientnet


class XrayNet(nn.Module):
    """uint8 (B, 1, S, S) images -> raw outputs: (B, K) in [-1, 1] for a regression head, (B, K, 3)
    logits for a three-class head; score() maps either to (B, K) on [-1, 1], one column per pathology.

    forward = heads(pool(feature_map(x))). Normalisation happens here, on whatever device the model
    is on, so loaders move uint8 (four times fewer bytes than float32) and never wait on arithmetic.
    Pooling, heads and tanh run in float32 even under autocast: bf16 would round outputs near +-1 to
    steps of about 0.004 and tie saturated scores."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.arch = config.get("arch", "resnet50")
        self.head_type = config.get("head_type", "regression")
        if self.arch not in ARCHS or self.head_type not in HEAD_TYPES:
            raise UserError(f"a model this code cannot build: arch {self.arch!r}, head type {self.head_type!r} "
                            f"(known: {', '.join(ARCHS)}; {', '.join(HEAD_TYPES)})")
        self.family, width, _ = ARCHS[self.arch]
        self.pathologies = [h["pathology"] for h in config["heads"]]
        b = torchvision.models.get_model(self.arch, weights=None)
        self.stem = one_channel_stem(b)  # e.g. 'conv1', 'features.conv0', 'features.0.0'
        replace_module(b, CLASSIFIER[self.family], nn.Identity())
        self.backbone = b
        n_out = 1 if self.head_type == "regression" else N_CLASSES
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, h["hidden"]), nn.ReLU(inplace=True), nn.Dropout(h["dropout"]),
                          nn.Linear(h["hidden"], n_out))
            for h in config["heads"])
        self.register_buffer("mean", torch.tensor(float(config.get("mean", IMAGE_MEAN))), persistent=False)
        self.register_buffer("std", torch.tensor(float(config.get("std", IMAGE_STD))), persistent=False)
        self.frozen = 0

    def stages(self) -> list[nn.Module]:
        return backbone_stages(self.family, self.backbone)

    def set_normalisation(self, mean: float, std: float) -> None:
        """Feed uint8 x to the backbone as (x/255 - mean) / std; kept in config, so checkpoints record it."""
        self.config["mean"], self.config["std"] = float(mean), float(std)
        self.mean.fill_(float(mean))
        self.std.fill_(float(std))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1, S, S) (or already normalised float) -> the last convolutional feature map
        (B, C, ~S/32, ~S/32) before pooling: what Grad-CAM hooks."""
        if x.dtype == torch.uint8:
            x = (x.float() / 255.0 - self.mean) / self.std
        b = self.backbone
        if self.family == "resnet":
            x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
            return b.layer4(b.layer3(b.layer2(b.layer1(x))))
        f = b.features(x)
        return F.relu(f) if self.family == "densenet" else f

    def from_feature_map(self, f: torch.Tensor) -> torch.Tensor:
        """Feature map (B, C, h, w) -> raw outputs (see the class), computed in float32 outside autocast."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            pooled = F.adaptive_avg_pool2d(f, 1)
            if self.family == "convnext":
                pooled = self.backbone.classifier[0](pooled)  # its LayerNorm2d
            pooled = torch.flatten(pooled, 1)
            out = torch.stack([h(pooled) for h in self.heads], dim=1)  # (B, K, 1 or 3)
            return torch.tanh(out[..., 0]) if self.head_type == "regression" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_feature_map(self.feature_map(x))

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """Raw outputs -> (B, K) float on [-1, 1]: the regression output itself, or for three-class
        logits the expected label p(positive) - p(negative) (uncertain counting 0)."""
        if self.head_type == "regression":
            return out
        p = torch.softmax(out.float(), dim=-1)
        return p[..., 2] - p[..., 0]

    def train(self, mode: bool = True):
        super().train(mode)
        for stage in self.stages()[:self.frozen]:
            stage.eval()  # frozen stages keep their BatchNorm statistics
        return self


def build_model(config: dict) -> XrayNet:
    return XrayNet(config)


def model_config(pathologies: list[str], head: str = "auto", hidden: int = 512, dropout: float = 0.2,
                 arch: str = "resnet50", head_type: str = "regression", image_size: int | None = None) -> dict:
    """The model's description, stored in checkpoints. A config without 'arch' or 'head_type'
    (older checkpoints) means resnet50 and regression."""
    if arch not in ARCHS or head_type not in HEAD_TYPES:
        raise ValueError(f"unknown arch {arch!r} or head type {head_type!r}")
    return {"arch": arch, "head_type": head_type, "in_channels": 1, "mean": IMAGE_MEAN, "std": IMAGE_STD,
            "heads": [head_config(p, head, hidden, dropout) for p in pathologies]}


def set_frozen(model: XrayNet, n: int) -> None:
    """Freeze the first n of the N_STAGES backbone stages (requires_grad off, BatchNorm in eval)."""
    model.frozen = n
    for i, stage in enumerate(model.stages()):
        for p in stage.parameters():
            p.requires_grad_(i >= n)
    model.train(model.training)


# (interim: wt-timm brings the timm-aware versions of these four)
def check_arch(name: str) -> str:
    if name not in ARCHS:
        raise UserError(f"unknown --arch {name!r} (choose from {', '.join(ARCHS)})")
    return name


def n_stages(model: XrayNet) -> int:
    return N_STAGES


def param_groups(model: XrayNet, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    return [{"params": list(model.parameters()), "weight_decay": weight_decay, "lr_scale": 1.0}]


def set_grad_checkpointing(model: XrayNet, enable: bool = True) -> None:
    raise UserError("--grad-checkpointing is not supported yet")


def load_pretrained(model: XrayNet, weights: str) -> dict:
    """Load backbone weights into model and set the input normalisation they expect.

    weights: 'none' (random init, normalisation unchanged), 'imagenet' (torchvision's weights API
    for model.arch), or a PATH to one of: a torchvision state dict of that arch; torchxrayvision's
    DenseNet-121 (densenet121-res224-all) or ResNet-50 (resnet50-res512-all) state dict, its
    classifier and op_threshs dropped and its [-1024, 1024] input scale kept (mean XRV_MEAN, std
    XRV_STD); one of our checkpoints of that arch (its backbone and normalisation). RGB stem filters
    are summed over colour, which is what a gray image copied to three channels would see.
    The normalisation goes into model.config (so the checkpoint records it). Returns
    {"source": 'none'|'imagenet'|'torchvision'|'torchxrayvision'|'checkpoint', "mean", "std"}."""
    if weights == "none":
        return {"source": "none", "mean": float(model.mean), "std": float(model.std)}
    if weights == "imagenet":
        state, source, norm = imagenet_state(model.arch), "imagenet", (IMAGE_MEAN, IMAGE_STD)
    else:
        state, source, norm = read_weights(Path(weights), model.arch)
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


def read_weights(path: Path, arch: str) -> tuple[dict, str, tuple[float, float]]:
    """(backbone state dict, source, (mean, std)) from a --weights file; see load_pretrained."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"--weights {path}: no such file (use imagenet, none or a path)") from e
    except Exception as e:
        raise UserError(f"--weights {path}: not a loadable state dict ({type(e).__name__}); torchxrayvision's "
                        f"DenseNet release files are pickled models: save their state_dict() first (docs/training.md)") from e
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        cfg = state.get("model_config", {})
        if cfg.get("arch", "resnet50") != arch:
            raise UserError(f"--weights {path}: a checkpoint of a {cfg.get('arch', 'resnet50')} model; "
                            f"use --arch {cfg.get('arch', 'resnet50')}")
        backbone = {k[len("backbone."):]: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
        return backbone, "checkpoint", (cfg.get("mean", IMAGE_MEAN), cfg.get("std", IMAGE_STD))
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
    """Load a torchvision-named state dict into model.backbone (classifier dropped, RGB stem summed)."""
    head = CLASSIFIER[model.family] + "."
    state = {OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items() if not k.startswith(head) and k != "op_threshs"}
    stem = model.stem + ".weight"
    if stem in state and state[stem].ndim == 4 and state[stem].shape[1] == 3:
        state[stem] = state[stem].sum(dim=1, keepdim=True)
    label = ARCHS[model.arch][2]
    expected = (f"expected torchvision's {model.arch} state dict, torchxrayvision's densenet121-res224-all or "
                f"resnet50-res512-all, or one of our checkpoints")
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise UserError(f"--weights {weights}: tensors of the wrong shape for a {label} ({expected}): "
                        f"{str(e).splitlines()[-1].strip()}") from e
    if missing or unexpected:
        raise UserError(f"--weights {weights}: not a {label} backbone ({expected}; {len(missing)} missing and "
                        f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[0]})")


# ---------------------------------------------------------------------------------------------
# Checkpoints: the one place that knows their format

@dataclass
class Checkpoint:
    """One checkpoint file: a model and everything needed to use it without its training run.

    model_config: what build_model needs (arch, heads, normalisation); pathologies: the output
    columns, in order; state_dict: the weights (CPU tensors); preprocess: {image_size, square, mean,
    std, uncertain, label_convention}; view: 'all', 'frontal' or 'lateral'; epoch: complete epochs;
    metrics: that epoch's validation metrics; calibration: pathology -> map (fit_calibration) or
    None; train_config: the training flags; split: {seed, val_frac, val_patients_sha1};
    interrupted: saved on a signal mid-epoch; training_state (last.pt only): optimizer, scheduler,
    scaler, early-stopping and RNG state for --resume."""
    model_config: dict
    pathologies: list[str]
    state_dict: dict
    preprocess: dict
    view: str = "all"
    epoch: int = 0
    metrics: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    train_config: dict = field(default_factory=dict)
    split: dict = field(default_factory=dict)
    interrupted: bool = False
    training_state: dict | None = None

    @classmethod
    def of(cls, model: XrayNet, **values) -> "Checkpoint":
        """A checkpoint of the model's current weights (copied to the CPU: never a live reference)."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return cls(model_config=model.config, pathologies=list(model.pathologies), state_dict=state, **values)

    def save(self, path: Path) -> None:
        """Write atomically, as a plain dict that torch.load(..., weights_only=True) reads."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if data["training_state"] is None:
            del data["training_state"]
        save_torch({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **data}, path)

    @classmethod
    def load(cls, path: Path) -> "Checkpoint":
        """Load and check a checkpoint (weights_only), always onto the CPU whatever device saved it:
        the caller moves to its device what belongs there (a GPU's RNG state must stay a CPU
        ByteTensor). Errors name the file. Files of every earlier version load: fields they lack
        take their defaults (a config without 'arch' is resnet50)."""
        path = Path(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise UserError(f"{path}: no such checkpoint") from e
        except Exception as e:
            raise UserError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}); retrain or "
                            f"restore it") from e
        if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path}: not a checkpoint of this project")
        if data.get("version", 0) > CHECKPOINT_VERSION:
            raise UserError(f"{path}: checkpoint version {data['version']} is newer than this code "
                            f"understands ({CHECKPOINT_VERSION}); update the code")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}")
        pre = data["preprocess"]
        if not (isinstance(pre.get("image_size"), int) and pre["image_size"] >= 8
                and pre.get("square") in SQUARE_MODES and math.isfinite(pre.get("std", float("nan")))):
            raise UserError(f"{path}: made for preprocessing this code does not support: {pre}")
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data and data[f.name] is not None}
        return cls(**values)

    def build(self, device="cpu", path: Path | str = "checkpoint") -> XrayNet:
        """The model it describes with its weights, in eval mode on device."""
        model = build_model(self.model_config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            raise UserError(f"{path}: weights do not match the model it describes ({str(e).splitlines()[0]})") from e
        return model.to(device).eval()


REQUIRED_KEYS = ("model_config", "pathologies", "state_dict", "view", "preprocess", "epoch")


def load_checkpoint(path: Path, device="cpu") -> tuple[XrayNet, Checkpoint]:
    """Rebuild the model from the file alone: (model in eval mode on device, its Checkpoint)."""
    ckpt = Checkpoint.load(path)
    return ckpt.build(device, path), ckpt


@torch.no_grad()
def predict(model: XrayNet, dataset, batch_size: int, rt: Runtime, tta: str = "none", desc: str = "predicting") -> np.ndarray:
    """Scores (N, K) float32 in [-1, 1] (model.score of the raw outputs) for every item of dataset
    (an XrayDataset: uint8 images), in order, in eval mode under rt's autocast. tta 'flip' averages
    with the horizontally flipped image. Under torchrun each rank predicts every world-th batch and
    the pieces are gathered, so every rank returns the full array (training's validation); one
    process predicts everything (make_submission.py)."""
    model.eval()
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    mine = batches[rt.rank::rt.world]
    # its own generator: making the loader's iterator draws a seed, and must not draw it from the
    # global stream that dropout and augmentation use (a resumed run would see other masks)
    loader = DataLoader(dataset, batch_size=None, sampler=mine, pin_memory=rt.cuda, generator=torch.Generator())
    preds = []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not rt.progress, dynamic_ncols=True):
        images = to_device(batch, rt)[0]
        with rt.autocast():
            out = model.score(model(images)).float()
            if tta == "flip":
                out = (out + model.score(model(images.flip(-1))).float()) / 2
        preds.append(out.cpu())  # note: a CPU-GPU sync per batch
    out = torch.cat(preds).numpy() if preds else np.zeros((0, len(model.pathologies)), np.float32)
    if rt.world > 1:
        pieces = [None] * rt.world
        dist.all_gather_object(pieces, ([i for b in mine for i in b], out))
        full = np.zeros((len(dataset), out.shape[1]), np.float32)
        for idx, p in pieces:
            full[idx] = p
        out = full
    return out
