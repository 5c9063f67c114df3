"""The network: a backbone (a torchvision model of ARCHS, or any timm model as `timm/NAME[.TAG]`)
with a one-channel stem and one small MLP head per pathology; its layer groups (--freeze,
--layer-decay), gradient checkpointing, the checkpoint format (no other file knows it) and the one
prediction loop. Pretrained weights: weights.py.

Backbones. A torchvision backbone gets a one-channel first convolution and loses its classifier. A
timm backbone is timm.create_model(NAME, in_chans=1, num_classes=0), with img_size = the image size
for models whose input size is fixed (ViT, Swin): timm folds pretrained RGB stem weights to one
channel itself, and its own pooling and head norm (forward_features, then
forward_head(pre_logits=True)) feed our heads.

Output scale: a 'regression' head ends in tanh, so raw outputs are on the label scale [-1, 1]
already (1 positive, 0 uncertain, -1 negative); a 'three-class' head gives logits over negative /
uncertain / positive, and XrayNet.score turns them into p(positive) - p(negative), on [-1, 1] too.
A calibration map fitted on the validation split (calibration.py) then moves scores to where
the MSE metric wants them, still on [-1, 1].

Public API: check_arch, model_config, build_model, n_stages, set_frozen, param_groups,
set_grad_checkpointing, Checkpoint, load_checkpoint, predict.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from itertools import chain
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.models import group_parameters, split_model_name_tag
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from tqdm import tqdm

from common import SQUARE_MODES
from common import UserError, save_torch
from runtime import Runtime, to_device

CHECKPOINT_FORMAT = "cxr-regression"
CHECKPOINT_VERSION = 3  # 3: model_config records image_size (timm ViTs are built for it); versions 1-2 still load
IMAGE_MEAN, IMAGE_STD = 0.449, 0.226  # ImageNet's RGB statistics averaged to one gray channel
N_STAGES = 5  # torchvision archs: stem and four stages (strides 4, 8, 16, 32 on ResNets), what --freeze N counts
TIMM_PREFIX = "timm/"  # --arch timm/NAME[.TAG]: any model timm.list_models() knows

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


# ---------------------------------------------------------------------------------------------
# Backbones: torchvision's and timm's

def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


def arch_label(arch: str) -> str:
    """The arch's name in messages: 'ResNet-50', 'timm/convnext_atto'."""
    return arch if is_timm(arch) else ARCHS[arch][2]


def check_arch(name: str) -> str:
    """The canonical --arch: a torchvision name of ARCHS, or 'timm/NAME' or 'timm/NAME.TAG' for a
    model timm knows (with a pretrained tag it has). Anything else is a one-line UserError."""
    name = name.strip()
    if not is_timm(name):
        if name in ARCHS:
            return name
        hint = (f"; timm has it: --arch {TIMM_PREFIX}{name}" if timm.is_model(name)
                else f", or {TIMM_PREFIX}NAME for any model timm.list_models() names")
        raise UserError(f"--arch {name}: not a torchvision backbone this code builds "
                        f"(choices: {', '.join(ARCHS)}{hint})")
    model = name[len(TIMM_PREFIX):]
    arch, tag = split_model_name_tag(model)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise UserError(f"--arch {name}: not a model timm {timm.__version__} knows"
                        + (f" (close: {', '.join(close)})" if close else "") + "; see timm.list_models()")
    if tag and model not in timm.list_pretrained(model):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise UserError(f"--arch {name}: timm has no pretrained tag {tag!r} for {arch} "
                        f"(tags: {', '.join(tags) or 'none'})")
    return TIMM_PREFIX + model


def create_timm(arch: str, image_size: int | None, **kwargs) -> nn.Module:
    """timm's model for arch 'timm/NAME[.TAG]': one input channel, no classifier (forward_head with
    pre_logits=True gives the pooled, normed features), built for image_size where its input size is
    fixed (ViT, Swin; others take any size). kwargs go to timm.create_model (pretrained=...)."""
    name = arch[len(TIMM_PREFIX):]
    cfg = timm.models.get_pretrained_cfg(name)
    if image_size and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = int(image_size)
    return timm.create_model(name, in_chans=1, num_classes=0, **kwargs)


def timm_stem(b: nn.Module) -> str:
    """The name of a timm model's first convolution (its pretrained_cfg's first_conv)."""
    stem = b.pretrained_cfg.get("first_conv")
    if isinstance(stem, (tuple, list)):
        stem = stem[0]
    return stem or next(n for n, m in b.named_modules() if isinstance(m, nn.Conv2d))


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
    """A torchvision backbone's N_STAGES groups that --freeze counts: the stem, then the four stages
    up to the last block (for ResNets stem, layer1..layer4; each later stage opens with its downsampling)."""
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


def forward_steps(family: str, b: nn.Module) -> list:
    """A torchvision backbone's forward up to its last feature map, as steps run in order (what
    gradient checkpointing wraps one by one): the ResNet stem and its four layers, or the children
    of `features` (DenseNet's stem, conv0 to pool0, as one step: its relu0 works in place, and a
    checkpointed step must not change its input)."""
    if family == "resnet":
        return [lambda x: b.maxpool(b.relu(b.bn1(b.conv1(x)))), b.layer1, b.layer2, b.layer3, b.layer4]
    if family == "densenet":
        return [b.features[:4], *list(b.features)[4:]]
    return list(b.features)


def parameter_names(root: nn.Module, module: nn.Module) -> list[str]:
    """Names (relative to root) of the parameters of module, a submodule of root."""
    names = {id(p): n for n, p in root.named_parameters()}
    return [names[id(p)] for p in module.parameters()]


def timm_groups(b: nn.Module, coarse: bool) -> list[list[str]]:
    """A timm model's layer groups, stem first, by its own group_matcher: names of parameters.
    coarse: the stem and each stage (what --freeze counts); fine: the stem and each block (what
    --layer-decay scales). Parameters the matcher leaves out (the norm before the head) join the last
    group, as timm's (99999,) suffix (MATCH_PREV_GROUP) does."""
    matcher = b.group_matcher(coarse=coarse)
    if isinstance(matcher, dict):
        matcher = {**matcher, "_rest": [(r".*", (99999,))]}
    by_id = group_parameters(b, matcher)
    return [list(by_id[i]) for i in sorted(by_id)]


def modules_within(root: nn.Module, names: set[str]) -> list[nn.Module]:
    """root's submodules (root too) that hold parameters, every one of them among names."""
    found = []
    for prefix, m in root.named_modules():
        own = [f"{prefix}.{k}" if prefix else k for k, _ in m.named_parameters()]
        if own and all(n in names for n in own):
            found.append(m)
    return found


class XrayNet(nn.Module):
    """uint8 (B, 1, S, S) images -> raw outputs: (B, K) in [-1, 1] for a regression head, (B, K, 3)
    logits for a three-class head; score() maps either to (B, K) on [-1, 1], one column per pathology.

    forward = from_feature_map(feature_map(x)): the backbone's features, then its pooling (and, for
    timm models, their head norm) and our heads. Normalisation happens here, on whatever device the
    model is on, so loaders move uint8 (four times fewer bytes than float32) and never wait on
    arithmetic. Pooling, heads and tanh run in float32 even under autocast: bf16 would round outputs
    near +-1 to steps of about 0.004 and tie saturated scores."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.arch = check_arch(config.get("arch", "resnet50"))
        self.head_type = config.get("head_type", "regression")
        if self.head_type not in HEAD_TYPES:
            raise UserError(f"a model this code cannot build: head type {self.head_type!r} "
                            f"(known: {', '.join(HEAD_TYPES)})")
        self.pathologies = [h["pathology"] for h in config["heads"]]
        if is_timm(self.arch):
            self.family = "timm"
            try:
                b = create_timm(self.arch, config.get("image_size"), pretrained=False)
            except Exception as e:  # e.g. an image size the model cannot take
                first = (str(e).strip().splitlines() or [""])[0]
                raise UserError(f"--arch {self.arch}: timm cannot build it for image size {config.get('image_size')} "
                                f"({type(e).__name__}: {first})") from e
            self.stem = timm_stem(b)  # e.g. 'conv1.0', 'stem.0', 'patch_embed.proj'
            width = getattr(b, "head_hidden_size", None) or b.num_features
        else:
            self.family, width, _ = ARCHS[self.arch]
            b = torchvision.models.get_model(self.arch, weights=None)
            self.stem = one_channel_stem(b)  # e.g. 'conv1', 'features.conv0', 'features.0.0'
            replace_module(b, CLASSIFIER[self.family], nn.Identity())
        self.backbone = b
        self.nhwc = getattr(b, "output_fmt", "NCHW") == "NHWC"  # Swin's features are (B, h, w, C)
        n_out = 1 if self.head_type == "regression" else N_CLASSES
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, h["hidden"]), nn.ReLU(inplace=True), nn.Dropout(h["dropout"]),
                          nn.Linear(h["hidden"], n_out))
            for h in config["heads"])
        self.register_buffer("mean", torch.tensor(float(config.get("mean", IMAGE_MEAN))), persistent=False)
        self.register_buffer("std", torch.tensor(float(config.get("std", IMAGE_STD))), persistent=False)
        self.frozen = 0  # set_frozen's n
        self.frozen_modules: list[nn.Module] = []  # kept in eval while frozen
        self.grad_checkpointing = False  # torchvision archs; timm models keep their own flag
        self._has_feature_map: bool | None = None

    def groups(self, coarse: bool = True) -> list[list[str]]:
        """The backbone's layer groups, stem first, as names of its parameters (relative to
        self.backbone): for torchvision archs the N_STAGES of backbone_stages; for timm models
        those of timm_groups (coarse: stages, what --freeze counts; fine: blocks, for --layer-decay)."""
        if self.family == "timm":
            return timm_groups(self.backbone, coarse)
        return [parameter_names(self.backbone, s) for s in backbone_stages(self.family, self.backbone)]

    def set_normalisation(self, mean: float, std: float) -> None:
        """Feed uint8 x to the backbone as (x/255 - mean) / std; kept in config, so checkpoints record it."""
        self.config["mean"], self.config["std"] = float(mean), float(std)
        self.mean.fill_(float(mean))
        self.std.fill_(float(std))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1, S, S) (or already normalised float) -> the backbone's last features before
        pooling: a feature map (B, C, ~S/32, ~S/32), what Grad-CAM hooks, for every torchvision arch and
        timm's convolutional models and Swin; tokens (B, N, C) for ViTs (see has_feature_map)."""
        if x.dtype == torch.uint8:
            x = (x.float() / 255.0 - self.mean) / self.std
        if self.family == "timm":
            f = self.backbone.forward_features(x)
            return f.permute(0, 3, 1, 2) if self.nhwc else f
        save_memory = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for step in forward_steps(self.family, self.backbone):
            # recomputed in the backward pass instead of keeping the step's activations
            x = checkpoint(step, x, use_reentrant=False) if save_memory else step(x)
        return F.relu(x) if self.family == "densenet" else x

    def from_feature_map(self, f: torch.Tensor) -> torch.Tensor:
        """feature_map's output -> raw outputs (see the class), computed in float32 outside autocast."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            if self.family == "timm":  # its own pooling and head norm: (B, width)
                pooled = self.backbone.forward_head(f.permute(0, 2, 3, 1) if self.nhwc else f, pre_logits=True)
            else:
                pooled = F.adaptive_avg_pool2d(f, 1)
                if self.family == "convnext":
                    pooled = self.backbone.classifier[0](pooled)  # its LayerNorm2d
                pooled = torch.flatten(pooled, 1)
            out = torch.stack([h(pooled) for h in self.heads], dim=1)  # (B, K, 1 or 3)
            return torch.tanh(out[..., 0]) if self.head_type == "regression" else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_feature_map(self.feature_map(x))

    @property
    def has_feature_map(self) -> bool:
        """Whether feature_map is spatial, (B, C, h, w), which Grad-CAM needs: true for torchvision
        archs and timm's CNNs and Swin, false for ViTs (tokens). Found once, by one small forward."""
        if self._has_feature_map is None:
            if self.family != "timm":
                self._has_feature_map = True
            else:
                size = self.config.get("image_size") or self.backbone.pretrained_cfg.get("input_size", (1, 224))[-1]
                mode = self.training
                self.eval()
                with torch.no_grad():
                    x = torch.zeros(1, 1, size, size, dtype=torch.uint8, device=self.mean.device)
                    self._has_feature_map = self.feature_map(x).dim() == 4
                self.train(mode)
        return self._has_feature_map

    def score(self, out: torch.Tensor) -> torch.Tensor:
        """Raw outputs -> (B, K) float on [-1, 1]: the regression output itself, or for three-class
        logits the expected label p(positive) - p(negative) (uncertain counting 0)."""
        if self.head_type == "regression":
            return out
        p = torch.softmax(out.float(), dim=-1)
        return p[..., 2] - p[..., 0]

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules:
            m.eval()  # frozen groups keep their BatchNorm statistics
        return self


def build_model(config: dict) -> XrayNet:
    """The model a model_config (or a checkpoint's) describes, with random weights."""
    return XrayNet(config)


def model_config(pathologies: list[str], head: str = "auto", hidden: int = 512, dropout: float = 0.2,
                 arch: str = "resnet50", head_type: str = "regression", image_size: int | None = None) -> dict:
    """The model's description, stored in checkpoints. arch: see check_arch (a one-line UserError
    for an unknown one). image_size: the training image size, which timm models of a fixed input size
    (ViT, Swin) are built for; torchvision models ignore it. A config without 'arch', 'head_type' or
    'image_size' (older checkpoints) means resnet50, regression, none."""
    arch = check_arch(arch)
    if head_type not in HEAD_TYPES:
        raise ValueError(f"unknown head type {head_type!r}")
    return {"arch": arch, "head_type": head_type, "image_size": None if image_size is None else int(image_size),
            "in_channels": 1, "mean": IMAGE_MEAN, "std": IMAGE_STD,
            "heads": [head_config(p, head, hidden, dropout) for p in pathologies]}


# ---------------------------------------------------------------------------------------------
# Training controls: --freeze, --layer-decay, --grad-checkpointing

def n_stages(model: XrayNet) -> int:
    """How many layer groups --freeze counts: N_STAGES (5) for torchvision archs, the number of
    timm's coarse groups (stem and stages) for timm models."""
    return len(model.groups())


def freeze_limit(arch: str, image_size: int | None = None) -> int:
    """The largest --freeze an arch takes, before any data is read: N_STAGES for torchvision archs;
    for timm models, n_stages of the model built on the meta device (no memory, no weights)."""
    if not is_timm(arch):
        return N_STAGES
    with torch.device("meta"):
        return n_stages(build_model(model_config(["x"], arch=arch, image_size=image_size)))


def set_frozen(model: XrayNet, n: int) -> None:
    """Freeze the first n of the n_stages(model) groups, stem first: requires_grad off, and every
    backbone module whose parameters are all frozen kept in eval (BatchNorm keeps its statistics).
    n = 0 trains everything; n = n_stages(model) only the heads."""
    groups = model.groups()
    if not 0 <= n <= len(groups):
        raise ValueError(f"--freeze {n}: {model.arch} has {len(groups)} groups")
    frozen = set(chain.from_iterable(groups[:n]))
    for name, p in model.backbone.named_parameters():
        p.requires_grad_(name not in frozen)
    model.frozen = n
    model.frozen_modules = modules_within(model.backbone, frozen) if n else []
    model.train(model.training)


def param_groups(model: XrayNet, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer parameter groups [{"params", "weight_decay", "lr_scale"}] over every parameter (frozen
    ones too), each in exactly one group. layer_decay 1: one group, lr_scale 1 (plain AdamW). Below 1,
    layer-wise decay: the heads get lr_scale 1, the deepest backbone group layer_decay, ... the stem
    layer_decay ** L, over L = the 5 stages of a torchvision arch or timm's fine groups (stem, each
    block). Groups come heads first, so param_groups[0]'s lr is the base rate."""
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if layer_decay == 1:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay, "lr_scale": 1.0}]
    layers = model.groups(coarse=False)
    depth = {f"backbone.{name}": len(layers) - i for i, names in enumerate(layers) for name in names}
    by_depth: dict[int, list] = {}
    for name, p in model.named_parameters():  # heads: depth 0
        by_depth.setdefault(depth.get(name, 0), []).append(p)
    return [{"params": by_depth[d], "weight_decay": weight_decay, "lr_scale": layer_decay ** d}
            for d in sorted(by_depth)]


def set_grad_checkpointing(model: XrayNet, enable: bool = True) -> None:
    """Recompute backbone activations in the backward pass instead of storing them (less memory,
    about a third more compute): timm's own set_grad_checkpointing, or for torchvision archs each
    forward step (stem, stages) checkpointed in feature_map while training."""
    if model.family == "timm":
        try:
            model.backbone.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError, AttributeError) as e:
            raise UserError(f"--grad-checkpointing: timm implements none for {model.arch}; drop the flag or use "
                            f"another --arch") from e
    model.grad_checkpointing = enable


# ---------------------------------------------------------------------------------------------
# The training loss of each head type

def loss_terms(out: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the loss over labelled entries, their count) of a model's raw outputs: squared error
    for a regression head's (B, K), cross-entropy for a three-class head's (B, K, 3) logits over
    (negative, uncertain, positive). targets (B, K) in [-1, 1] (anything where masked); mask (B, K)
    bool. Masked entries add nothing and get no gradient."""
    if out.dim() == 3:
        cls = torch.where(mask, targets, torch.zeros_like(targets)).round().clamp(-1, 1).long() + 1
        per = torch.nn.functional.cross_entropy(out.float().flatten(0, 1), cls.flatten(), reduction="none")
        per = per.view_as(targets)
    else:
        per = (out.float() - targets) ** 2
    return torch.where(mask, per, torch.zeros_like(per)).sum(), mask.sum()


def compute_loss(out: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean training loss over labelled entries (0 when nothing is labelled); see loss_terms."""
    total, n = loss_terms(out, targets, mask)
    return total / n.clamp(min=1)


masked_mse = masked_cross_entropy = compute_loss  # the shape of the outputs says which


# ---------------------------------------------------------------------------------------------
# Checkpoints: the one place that knows their format

@dataclass
class Checkpoint:
    """One checkpoint file: a model and everything needed to use it without its training run.

    model_config: what build_model needs (arch, heads, normalisation); pathologies: the output
    columns, in order; state_dict: the weights (CPU tensors); preprocess: {image_size, square,
    equalize, mean, std, uncertain and blank (pathology -> policy), label_convention}; view: 'all',
    'frontal' or 'lateral'; epoch: epochs trained when it was saved (2, or 1.25 within an epoch with
    --val-per-epoch); metrics: that validation's metrics; calibration: pathology -> map
    (fit_calibration) or None; train_config: the training flags; split: {seed, val_frac or folds and
    fold, val_patients_sha1 or folds_sha1, rows_sha1}; interrupted: saved on a signal mid-epoch;
    training_state (last.pt only): state.TrainState.training_state(), all --resume needs."""
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
