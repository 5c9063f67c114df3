"""Augmentation: per-sample batch augmentation on the training device (train.py --augment,
--online-augment) and the transforms of the offline copies (experiments/flip_images.py,
contrast_images.py).

All of it works on uint8 images (..., S, S) and returns uint8, on whatever device they are.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model import IMAGE_MEAN

ONLINE_AUGMENTS = ("flip", "contrast")


def flip_images(x):
    """Horizontal flip of uint8 (..., S, S)."""
    return x.flip(-1)


def adjust_contrast(x, factor: float):
    """Scale contrast by `factor` around each image's mean, clipped to [0, 255]; uint8 (..., S, S)."""
    f = x.float()
    mean = f.mean(dim=(-2, -1), keepdim=True)
    return ((f - mean) * factor + mean).round_().clamp_(0, 255).to(torch.uint8)


def online_augment(images: torch.Tensor, names: list[str]) -> torch.Tensor:
    """--online-augment: flip / contrast x1.5 on a random half of the batch, uint8 (B, 1, S, S) on the device."""
    for name in names:
        pick = (torch.rand(len(images)) < 0.5).to(images.device).view(-1, 1, 1, 1)
        changed = flip_images(images) if name == "flip" else adjust_contrast(images, 1.5)
        images = torch.where(pick, changed, images)
    return images


# On-the-fly augmentation presets for train.py --augment. Ranges are drawn uniformly, per sample:
#   scale       area of the random crop, as a fraction of the image (then resized to the full S x S)
#   ratio       the crop's width / height, drawn log-uniformly (the crop is clipped to the image)
#   degrees     rotation, counter-clockwise as displayed
#   brightness  multiplies every pixel
#   contrast    scales the distance from the image's mean
#   flip        probability of a horizontal mirror (the heart is on one side: a choice, not a default)
#   erase       probability of one random rectangle filled with the gray of IMAGE_MEAN,
#               whose area (erase_scale, fraction of the image) and width/height (erase_ratio) are drawn
_STANDARD = {"scale": (0.8, 1.0), "ratio": (3 / 4, 4 / 3), "degrees": (-10.0, 10.0),
             "brightness": (0.9, 1.1), "contrast": (0.9, 1.1)}


AUGMENT_PRESETS = {
    "none": {},                                   # the input itself, untouched
    "standard": _STANDARD,                        # crop + rotation + brightness/contrast
    "flip": {**_STANDARD, "flip": 0.5},           # standard + horizontal flip of half the samples
    "strong": {**_STANDARD, "flip": 0.5, "erase": 0.5, "erase_scale": (0.02, 0.2), "erase_ratio": (0.3, 3.3)},
}


_AUGMENT_KEYS = {"scale", "ratio", "degrees", "brightness", "contrast", "flip", "erase", "erase_scale", "erase_ratio"}
def augment_batch(images, preset: str | dict, generator=None):
    """Random per-sample augmentation of uint8 (B, 1, S, S) images on their own device (CPU or CUDA).

    preset: a name in AUGMENT_PRESETS or a dict of the same keys (see the comment above it):
      none      the input itself, no work
      standard  random resized crop (area 0.8-1.0, width/height 3/4-4/3), rotation (+-10 degrees),
                brightness x0.9-1.1, contrast x0.9-1.1
      flip      standard + horizontal flip of half the samples (the heart is on one side: opt in)
      strong    flip + random erasing of half the samples (2-20% of the image, IMAGE_MEAN gray)
    Returns uint8 (B, 1, S, S) on the same device; 'none' (or {}) returns `images` itself. Every
    sample draws its own crop, angle, flip, brightness, contrast and erased rectangle, from the
    `generator` when given (reproducible; on any device), else from torch's default RNG of the
    images' device (seeded by torch.manual_seed, saved in last.pt for --resume).
    Crop, rotation and flip are one affine map per sample, applied in a single bilinear
    grid_sample (outside the image reads 0, black); brightness and contrast act on that float
    result; one rounding to uint8 at the end. Batched ops only: no per-sample Python loop."""
    p = AUGMENT_PRESETS[preset] if isinstance(preset, str) else preset
    unknown = set(p) - _AUGMENT_KEYS
    if unknown:
        raise ValueError(f"unknown augmentation parameter(s): {', '.join(sorted(unknown))}")
    if not p:
        return images
    # every random number of the batch in one draw, on the images' device unless the generator lives
    # elsewhere: no host-device copy, so no sync point per training step on CUDA
    u = torch.rand(len(images), 13, generator=generator,
                   device=images.device if generator is None else generator.device).to(images.device)

    def draw(key, col, default, log=False):
        lo, hi = p.get(key, (default, default))
        if log:
            return lo * torch.exp(math.log(hi / lo) * u[:, col])  # log-uniform: r as likely as 1/r
        return lo + (hi - lo) * u[:, col]
    x = images.float()
    if any(k in p for k in ("scale", "ratio", "degrees", "flip")):
        x = _affine(x, draw("scale", 0, 1.0), draw("ratio", 1, 1.0, log=True), draw("degrees", 2, 0.0) * (math.pi / 180),
                    u[:, 3:5], u[:, 5] < p.get("flip", 0.0))
    if "brightness" in p or "contrast" in p:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * draw("contrast", 7, 1.0).view(-1, 1, 1, 1) + mean) * draw("brightness", 6, 1.0).view(-1, 1, 1, 1)
    if p.get("erase", 0.0) > 0:
        x = _erase(x, u[:, 8] < p["erase"], draw("erase_scale", 9, 0.1), draw("erase_ratio", 10, 1.0, log=True), u[:, 11:13])
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _affine(x, scale, ratio, angle, shift, flip):
    """One grid_sample for crop + rotation + flip. x (B, 1, S, S) float; the rest (B,) per sample,
    shift (B, 2) in [0, 1). The output's normalized coordinates p (x right, y down, [-1, 1]) read
    the input at centre + R(angle) @ diag(+-w, h) @ p: w, h are the crop's side fractions, and
    the centre keeps the unrotated crop inside the image."""
    w = (scale * ratio).sqrt().clamp(max=1.0)
    h = (scale / ratio).sqrt().clamp(max=1.0)
    cx, cy = (2 * shift[:, 0] - 1) * (1 - w), (2 * shift[:, 1] - 1) * (1 - h)
    cos, sin = angle.cos(), angle.sin()
    sx = torch.where(flip, -w, w)
    # [[cos, -sin], [sin, cos]] turns the content counter-clockwise on screen (y points down)
    theta = torch.stack([torch.stack([cos * sx, -sin * h, cx], 1), torch.stack([sin * sx, cos * h, cy], 1)], 1)
    # align_corners=False: -1 and 1 are the outer edges of the image, so the identity map is exact
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _erase(x, on, area, ratio, pos):
    """Fill one rectangle per selected sample with the gray of IMAGE_MEAN. x (B, 1, S, S) float;
    on (B,) bool; area (fraction of the image), ratio (width / height) (B,); pos (B, 2) in [0, 1)."""
    s = x.shape[-1]
    h = ((area / ratio).sqrt() * s).round().clamp(1, s)
    w = ((area * ratio).sqrt() * s).round().clamp(1, s)
    top, left = ((s - h) * pos[:, 0]).floor(), ((s - w) * pos[:, 1]).floor()
    idx = torch.arange(s, device=x.device, dtype=x.dtype)
    rows = (idx >= top[:, None]) & (idx < (top + h)[:, None])
    cols = (idx >= left[:, None]) & (idx < (left + w)[:, None])
    mask = rows[:, :, None] & cols[:, None, :] & on[:, None, None]
    return x.masked_fill(mask[:, None], round(IMAGE_MEAN * 255))


