"""Grad-CAM heatmaps: where in an image a model looks for its pathology.

    python experiments/saliency.py --checkpoint checkpoints/cardiomegaly/best.pt \\
        --images DATA_ROOT/train/pid50512/study1/view1_frontal.jpg ... --out saliency/

For each image and each of the model's pathologies (every head of a --multi-head model, or only
--pathology NAME) it writes OUT/<image>_<pathology>.png: the image as the model sees it (decoded at
the checkpoint's image size and square mode) under a translucent heatmap, titled with the pathology
and the model's calibrated score (the value make_submission.py would write) and its raw output.
A heatmap on tubes, text markers or laterality tags rather than on the anatomy is shortcut learning.
It ends with a table: each heatmap's score and where it peaks. A map that is zero everywhere is
marked empty (in its title and the table): Grad-CAM keeps only what raises the score (the ReLU
below), and a model that scores an image low often finds nothing there that does.

Grad-CAM (Selvaraju et al. 2017): the last feature map A (C, h, w) of the backbone
(XrayNet.feature_map), each channel weighted by the spatial mean of d score / d A, summed, ReLU'd,
upsampled to the image and scaled to [0, 1]; the score is the model's [-1, 1] output (for a
three-class head p(positive) - p(negative)). Coarse by nature: h = w = about the checkpoint's image
size / 32 (7 x 7 at 224 px; a model trained at 32 px has a single cell, so no map to speak of).
It needs a spatial map: every torchvision --arch and timm's convolutional models and Swin have one;
a ViT's features are tokens, and the script says so and stops.
The images are only read; files are written under --out only, which is checked first: a folder
that holds none of them nor the checkpoint, outside the data root the checkpoint was trained on.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __name__ == "__main__":  # `python experiments/saliency.py` from anywhere: find the repo's modules
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cache import ImageError, load_image
from common import DEMO_ROOT, Parser, UserError, add_device_flags, check_outputs, format_table, run_cli
import config
from dataset import slug
from evaluation import new_figure, save_png
from calibration import apply_calibration
from model import load_checkpoint
from runtime import setup_runtime

PNG_SIZE = (520, 470)  # pixels of each heatmap PNG (width, height)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--checkpoint", type=Path, required=True, help="a best.pt (or last.pt) of train.py")
    p.add_argument("--images", type=Path, nargs="+", required=True, metavar="PATH",
                   help="image files (JPEG, PNG, 16-bit PNG/TIFF, DICOM)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the PNGs")
    p.add_argument("--pathology", metavar="NAME", help="only this head of the model (default: every head)")
    p.add_argument("--alpha", type=float, default=0.4, help="opacity of the heatmap over the image")
    add_device_flags(p, amp=False)  # Grad-CAM's gradients in float32
    config.add_config_flag(p)
    args = config.parse_args(p, argv)
    if not 0 <= args.alpha <= 1:
        p.error(f"--alpha must be in [0, 1], got {args.alpha}")
    for path in args.images:  # all of them now, before the checkpoint is loaded and any image decoded
        if not path.is_file():
            p.error(f"--images {path}: {'not a regular file' if path.exists() else 'no such file'}; pass image files")
    return args


def grad_cam(model, images: torch.Tensor, heads: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps of a model (put in eval mode) whose feature_map is spatial (B, C, h, w), not
    tokens (model.has_feature_map). images uint8 (B, 1, S, S) on the model's device;
    heads: output columns. Returns (maps (B, len(heads), S, S) float32 in [0, 1], each scaled by its
    own maximum (all 0 where nothing drives the score up), scores (B, K) float32 in [-1, 1]: the
    model's uncalibrated output, model.score of its raw output)."""
    model.eval()
    with torch.no_grad():
        feats = model.feature_map(images).float()
    if feats.dim() != 4:
        raise ValueError(f"Grad-CAM needs a spatial feature map (B, C, h, w), got shape {tuple(feats.shape)}")
    with torch.enable_grad():
        feats.requires_grad_(True)
        scores = model.score(model.from_feature_map(feats))
        maps = []
        for k in heads:
            # eval mode: samples do not interact, so the gradient of the sum is each sample's own
            (grad,) = torch.autograd.grad(scores[:, k].sum(), feats, retain_graph=True)
            cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * feats).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            peak = cam.flatten(1).max(1).values.clamp(min=1e-12).view(-1, 1, 1)
            maps.append((cam / peak).detach())
    return torch.stack(maps, 1).cpu().numpy(), scores.detach().float().cpu().numpy()


def png_name(path: Path, pathology: str, taken: set) -> str:
    """'pid50512_study1_view1_frontal_cardiomegaly.png': the image's last three path parts, so the
    many 'view1_frontal.jpg' files stay apart; a number is added if the name is taken."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(path.with_suffix("").parts[-3:])).strip("_")
    name, n = f"{stem}_{slug(pathology)}.png", 2
    while name in taken:
        name, n = f"{stem}_{slug(pathology)}_{n}.png", n + 1
    taken.add(name)
    return name


def plot_saliency(image: np.ndarray, cam: np.ndarray, title: str, path: Path, alpha: float = 0.4) -> Path:
    """PNG (PNG_SIZE pixels): image (S, S) uint8 in gray under cam (S, S) in [0, 1], titled."""
    fig = new_figure(PNG_SIZE)
    ax = fig.subplots()
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="bilinear")
    shown = ax.imshow(cam, cmap="jet", vmin=0, vmax=1, alpha=alpha, interpolation="bilinear")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="Grad-CAM (scaled to its maximum)")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    return save_png(fig, path)


def pick_heads(pathologies: list[str], wanted: str | None, checkpoint: Path) -> list[int]:
    if wanted is None:
        return list(range(len(pathologies)))
    by_lower = {p.lower(): k for k, p in enumerate(pathologies)}
    k = by_lower.get(wanted.lower(), by_lower.get(wanted.lower().replace("_", " ")))
    if k is None:
        raise UserError(f"--pathology {wanted}: {checkpoint} predicts {', '.join(pathologies)}")
    return [k]


def read_images(paths: list[Path], size: int, square: str, equalize: str = "none") -> np.ndarray:
    """uint8 (N, S, S), decoded as train.py's cache does; an unreadable file is an error naming it."""
    images = []
    for p in paths:
        try:
            images.append(load_image(p, size, square, equalize))
        except FileNotFoundError as e:
            raise UserError(f"--images {p}: no such file") from e
        except ImageError as e:  # a DICOM without pixel data, a codec not installed, ...
            raise UserError(f"--images {p}: not a readable image ({e})") from e
        except Exception as e:  # not an image, truncated
            raise UserError(f"--images {p}: not a readable image ({type(e).__name__})") from e
    return np.stack(images)


def guard_out(out: Path, checkpoint: Path, images: list[Path], train_config: dict) -> None:
    """common.check_outputs for the --out folder (which it creates: so after the checkpoint's own
    checks, before any image is read): it holds neither the checkpoint nor an image, lies outside
    the data root the checkpoint was trained on (the demo's folder when none was given; none known
    for a checkpoint without a training configuration) and is writable."""
    root = (Path(train_config["data_root"]) if train_config.get("data_root") else DEMO_ROOT) if train_config else None
    inputs = {"--checkpoint": checkpoint, **{f"--images #{i + 1}": path for i, path in enumerate(images)}}
    check_outputs(folders={"--out": out}, inputs=inputs, data_root=root)


def main(argv=None) -> list[dict]:
    """Returns one dict per image and head: image, pathology, raw, score (calibrated), png, cam (S, S),
    empty (the map is zero everywhere)."""
    args = parse_args(argv)
    args.amp = False
    device = setup_runtime(args, distributed=False).device  # --device cuda without one: one line, not a traceback
    model, ckpt = load_checkpoint(args.checkpoint, device)
    if not model.has_feature_map:
        raise UserError(f"--checkpoint {args.checkpoint}: its {model.arch} has no spatial feature map (its features "
                        f"are tokens), which Grad-CAM needs; use a model of a convolutional --arch")
    heads = pick_heads(ckpt.pathologies, args.pathology, args.checkpoint)
    guard_out(args.out, args.checkpoint, args.images, ckpt.train_config)  # before any image is read or written
    size, square = int(ckpt.preprocess["image_size"]), ckpt.preprocess["square"]
    images = read_images(args.images, size, square, ckpt.preprocess.get("equalize", "none"))
    results, taken = [], set()
    for i in tqdm(range(len(images)), desc="grad-cam", unit="img", disable=not args.progress, dynamic_ncols=True):
        x = torch.from_numpy(images[i:i + 1, None]).to(device)
        maps, raw = grad_cam(model, x, heads)
        for j, k in enumerate(heads):
            name, cam = ckpt.pathologies[k], maps[0, j]
            score = float(apply_calibration((ckpt.calibration or {}).get(name), raw[0, k]))
            png = args.out / png_name(args.images[i], name, taken)
            empty = not cam.any()
            where = "/".join(args.images[i].parts[-3:]) + ("  (empty: no region raises this score)" if empty else "")
            plot_saliency(images[i], cam, f"{name}: score {score:+.3f} (raw {raw[0, k]:+.3f})\n{where}", png, args.alpha)
            results.append({"image": args.images[i], "pathology": name, "raw": float(raw[0, k]), "score": score,
                            "png": png, "cam": cam, "empty": empty})
    print_summary(results, args.out)
    return results


def print_summary(results: list[dict], out: Path) -> None:
    """One row per heatmap: the score, and where the map peaks (as fractions of the image's height
    and width from its top left) or 'empty'; then how many were empty, and why that happens."""
    rows = []
    for r in results:
        y, x = np.unravel_index(r["cam"].argmax(), r["cam"].shape)
        peak = "empty" if r["empty"] else f"y {y / r['cam'].shape[0]:.2f}, x {x / r['cam'].shape[1]:.2f}"
        rows.append({"image": "/".join(r["image"].parts[-3:]), "pathology": r["pathology"], "score": r["score"],
                     "raw": r["raw"], "peak": peak, "png": r["png"].name})
    print(format_table(rows, ["image", "pathology", "score", "raw", "peak", "png"]))
    empty = sum(r["empty"] for r in results)
    print(f"wrote {len(results)} heatmaps to {out}" + (
        f"; {empty} are empty: Grad-CAM shows what raises a score, and nothing in those images raises it "
        "(usual where the model scores an image low)" if empty else ""))


if __name__ == "__main__":
    sys.exit(run_cli(main))
