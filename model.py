"""The network (ResNet-50 with a one-channel stem and one small MLP regression head per pathology),
its calibration maps, and the checkpoint format. No other file knows the checkpoint format.

Output scale: each head ends in tanh, so raw outputs are on the label scale [-1, 1] already
(1 positive, 0 uncertain, -1 negative). A calibration map fitted on the validation split (see
fit_calibration) then moves them to where the MSE metric wants them, still on [-1, 1].
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision

from dataset import IMAGE_MEAN, IMAGE_STD, SQUARE_MODES, UserError, save_torch

CHECKPOINT_FORMAT = "cxr-regression"
CHECKPOINT_VERSION = 1
N_STAGES = 5  # stem, layer1, layer2, layer3, layer4: what --freeze N counts

# Head variants. 'regularized' (a smaller head, more dropout) is what the original found best for
# Fracture, a rare finding with a faint signal where a wide head over-fits; 'auto' picks it there.
HEAD_VARIANTS = {
    "mlp": lambda hidden, dropout: (hidden, dropout),
    "regularized": lambda hidden, dropout: (min(hidden, 128), max(dropout, 0.5)),
}
AUTO_HEAD = {"Fracture": "regularized"}
CALIBRATIONS = ("affine", "isotonic", "none")


def head_config(pathology: str, variant: str, hidden: int, dropout: float) -> dict:
    """The head for one pathology: variant 'auto' picks AUTO_HEAD's choice, else 'mlp'."""
    if variant == "auto":
        variant = AUTO_HEAD.get(pathology, "mlp")
    h, d = HEAD_VARIANTS[variant](hidden, dropout)
    return {"pathology": pathology, "variant": variant, "hidden": int(h), "dropout": float(d)}


class XrayNet(nn.Module):
    """uint8 (B, 1, S, S) images -> (B, K) predictions in [-1, 1], one column per pathology.

    Normalisation happens here, on whatever device the model is on, so loaders move uint8 (four
    times fewer bytes than float32) and never wait on arithmetic."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.pathologies = [h["pathology"] for h in config["heads"]]
        r = torchvision.models.resnet50(weights=None)
        r.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        r.fc = nn.Identity()
        self.backbone = r
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(2048, h["hidden"]), nn.ReLU(inplace=True), nn.Dropout(h["dropout"]),
                          nn.Linear(h["hidden"], 1))
            for h in config["heads"])
        self.register_buffer("mean", torch.tensor(float(config.get("mean", IMAGE_MEAN))), persistent=False)
        self.register_buffer("std", torch.tensor(float(config.get("std", IMAGE_STD))), persistent=False)
        self.frozen = 0

    def stages(self) -> list[nn.Module]:
        r = self.backbone
        return [nn.ModuleList([r.conv1, r.bn1]), r.layer1, r.layer2, r.layer3, r.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = (x.float() / 255.0 - self.mean) / self.std
        f = self.backbone(x)
        return torch.tanh(torch.cat([h(f) for h in self.heads], dim=1))

    def train(self, mode: bool = True):
        super().train(mode)
        for stage in self.stages()[:self.frozen]:
            stage.eval()  # frozen stages keep their BatchNorm statistics
        return self


def build_model(config: dict) -> XrayNet:
    return XrayNet(config)


def model_config(pathologies: list[str], head: str = "auto", hidden: int = 512, dropout: float = 0.2) -> dict:
    return {"arch": "resnet50", "in_channels": 1, "mean": IMAGE_MEAN, "std": IMAGE_STD,
            "heads": [head_config(p, head, hidden, dropout) for p in pathologies]}


def set_frozen(model: XrayNet, n: int) -> None:
    """Freeze the first n of the N_STAGES backbone stages (requires_grad off, BatchNorm in eval)."""
    model.frozen = n
    for i, stage in enumerate(model.stages()):
        for p in stage.parameters():
            p.requires_grad_(i >= n)
    model.train(model.training)


def load_pretrained(model: XrayNet, weights: str) -> None:
    """Load backbone weights: 'none' (random init), 'imagenet' (torchvision's weights API) or a
    PATH to a torchvision ResNet-50 state dict or one of our checkpoints. RGB conv1 filters are
    summed over colour, which is what a gray image copied to three channels would see."""
    if weights == "none":
        return
    if weights == "imagenet":
        w = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
        try:
            state = w.get_state_dict(progress=True)
        except Exception as e:
            raise UserError(f"could not download the ImageNet ResNet-50 weights ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no network?'}); use --weights PATH with a "
                            f"local copy of {w.url.rsplit('/', 1)[-1]}, or --weights none") from e
    else:
        path = Path(weights)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as e:
            raise UserError(f"--weights {path}: no such file (use imagenet, none or a path)") from e
        except Exception as e:
            raise UserError(f"--weights {path}: not a loadable state dict ({type(e).__name__})") from e
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            state = {k[len("backbone."):]: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if state.get("conv1.weight") is not None and state["conv1.weight"].shape[1] == 3:
        state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"--weights {weights}: not a ResNet-50 backbone (missing {len(missing)} and "
                        f"unexpected {len(unexpected)} tensors, e.g. {(missing + unexpected)[0]})")


# ---------------------------------------------------------------------------------------------
# Calibration: a monotone map from raw output to the label scale, fitted on the validation split

SHRINK_ROWS = 5        # affine: slope shrunk by n / (n + 5), toward the constant (validation mean)
ISOTONIC_ROWS = 200    # isotonic: weight n / (n + 200) on the step fit, the rest on the affine map
MIN_SLOPE = 1e-6       # strictly increasing, so the ranking (and AUC) never changes
CV_FOLDS = 5           # the over-fitting guard's cross-validation


def pav(t: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing sequence closest to t in (weighted) least squares."""
    t = np.asarray(t, dtype=np.float64)
    w = np.ones_like(t) if w is None else np.asarray(w, dtype=np.float64)
    values, weights, counts = [], [], []
    for ti, wi in zip(t, w):
        values.append(ti), weights.append(wi), counts.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            v, wt, c = values.pop(), weights.pop(), counts.pop()
            values[-1] = (values[-1] * weights[-1] + v * wt) / (weights[-1] + wt)
            weights[-1] += wt
            counts[-1] += c
    return np.repeat(values, counts)


def _fit_map(kind: str, y: np.ndarray, t: np.ndarray) -> dict:
    """The map itself (see fit_calibration), fitted on all of (y, t)."""
    n = len(y)
    vy = y.var()
    a = ((y - y.mean()) * (t - t.mean())).mean() / vy if vy > 1e-12 else 0.0
    a = max(a * n / (n + SHRINK_ROWS), MIN_SLOPE)
    cal = {"kind": "affine", "a": float(a), "b": float(t.mean() - a * y.mean()), "n": n}
    if kind == "isotonic":
        order = np.argsort(y, kind="stable")
        fitted = pav(t[order])
        edges = np.flatnonzero(np.diff(fitted))
        right = np.append(y[order][edges], np.inf)  # block j covers y <= right[j]
        cal.update(kind="isotonic", right=[float(v) for v in right[:-1]],
                   values=[float(v) for v in np.append(fitted[edges], fitted[-1])],
                   w=float(n / (n + ISOTONIC_ROWS)))
    return cal


def _choose(kind: str, y: np.ndarray, t: np.ndarray, prior: float) -> str:
    """'map', 'identity' or 'constant': the lowest squared error in CV_FOLDS-fold cross-validation
    on (y, t), the map being refitted on each fold's complement (ties go to the simpler choice)."""
    fold = np.random.default_rng(0).permutation(len(y)) % CV_FOLDS
    se = {"constant": 0.0, "identity": 0.0, "map": 0.0}
    for f in range(CV_FOLDS):
        fit, held = fold != f, fold == f
        if fit.sum() < 2 or not held.any():
            continue
        se["map"] += ((apply_calibration(_fit_map(kind, y[fit], t[fit]), y[held]) - t[held]) ** 2).sum()
        se["identity"] += ((np.clip(y[held], -1, 1) - t[held]) ** 2).sum()
        se["constant"] += ((prior - t[held]) ** 2).sum()
    return min(se, key=lambda k: (se[k], ["constant", "identity", "map"].index(k)))


def fit_calibration(kind: str, y: np.ndarray, t: np.ndarray, prior: float | None = None) -> dict | None:
    """Fit a map raw output y -> target t on labelled validation rows (y, t: (n,), finite).

    affine: t ~ a*y + b by least squares, the slope shrunk by n/(n+SHRINK_ROWS) toward 0 (b
      recentred): negligible at the thousands of rows a real validation split has, a pull toward
      the constant on tiny ones. The slope is kept >= MIN_SLOPE.
    isotonic: PAV step fit blended with that affine map, weight n/(n+ISOTONIC_ROWS) on the step fit.
    The guard against over-fitting: given `prior` (the training mean, the constant predictor the
    metric compares with), CV_FOLDS-fold cross-validation on these rows picks the best of the
    fitted map, the raw output (identity) and the constant prior (slope MIN_SLOPE); 'chosen' says
    which. So a model with no real signal falls back to the constant, and a well-calibrated one is
    left alone. Every map is strictly increasing. Returns None for 'none' or fewer than 2 rows."""
    y, t = np.asarray(y, np.float64), np.asarray(t, np.float64)
    if kind == "none" or len(y) < 2:
        return None
    if kind not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {kind!r}")
    chosen = "map" if prior is None else _choose(kind, y, t, prior)
    if chosen == "constant":
        return {"kind": "affine", "a": MIN_SLOPE, "b": float(prior - MIN_SLOPE * y.mean()), "n": len(y), "chosen": chosen}
    if chosen == "identity":
        return {"kind": "affine", "a": 1.0, "b": 0.0, "n": len(y), "chosen": chosen}
    return {**_fit_map(kind, y, t), "chosen": chosen}


def apply_calibration(cal: dict | None, y) -> np.ndarray:
    """Map raw outputs y (any shape) through cal and clip to [-1, 1]."""
    y = np.asarray(y, np.float64)
    if cal is None:
        return np.clip(y, -1.0, 1.0)
    out = cal["a"] * y + cal["b"]
    if cal["kind"] == "isotonic":
        step = np.asarray(cal["values"])[np.searchsorted(np.asarray(cal["right"]), y, side="left")]
        out = cal["w"] * step + (1.0 - cal["w"]) * out
    return np.clip(out, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Checkpoints: the one place that knows their format

def save_checkpoint(path: Path, model: XrayNet, meta: dict, training_state: dict | None = None) -> None:
    """Write a self-describing checkpoint atomically.

    meta: {"view", "preprocess": {"image_size", "square", "mean", "std", "uncertain", "label_convention"}, "epoch",
    "metrics", "train_config", "calibration": {pathology: map or None}}. training_state (last.pt
    only): optimizer, scheduler, scaler, early-stopping and RNG state for --resume."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_config": model.config,
            "pathologies": list(model.pathologies), "state_dict": state, **meta}
    if training_state is not None:
        ckpt["training_state"] = training_state
    save_torch(ckpt, path)


REQUIRED_KEYS = ("model_config", "pathologies", "state_dict", "view", "preprocess", "epoch")


def read_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load and check a checkpoint's dict (weights_only). Errors name the file."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"{path}: no such checkpoint") from e
    except Exception as e:
        raise UserError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}); retrain or "
                        f"restore it") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this project")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {ckpt['version']} is newer than this code "
                        f"understands ({CHECKPOINT_VERSION}); update the code")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    pre = ckpt.get("preprocess", {})
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if not (isinstance(pre.get("image_size"), int) and pre["image_size"] >= 8
            and pre.get("square") in SQUARE_MODES and math.isfinite(pre.get("std", float("nan")))):
        raise UserError(f"{path}: made for preprocessing this code does not support: {pre}")
    return ckpt


def load_checkpoint(path: Path, device="cpu") -> tuple[XrayNet, dict]:
    """Rebuild the model from the file alone: (model in eval mode on device, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    model = build_model(ckpt["model_config"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match the model it describes ({str(e).splitlines()[0]})") from e
    return model.to(device).eval(), ckpt
