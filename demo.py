"""The synthetic demo dataset: a small CS 156b-layout folder with planted, learnable signals and the
faults real data has, made on first use so that a new user sees the whole pipeline work.

Not real X-rays: good for a smoke test, not for claims (docs/results.md has real-data numbers).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from buildlock import claim_build
from common import DEMO_ROOT
from dataset import PATHOLOGIES


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _line(img, yy, xx, y0, x0, y1, x1, width, value):
    """Add `value` along the segment (y0, x0)-(y1, x1), `width` pixels wide."""
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx), 0, 1)
    d = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
    img += value * (d <= width / 2)


def _demo_image(rng, view: str, signal: dict, h: int = 384, w: int = 320) -> np.ndarray:
    """One synthetic radiograph, uint8 (h, w). signal[name] in [0, 1] is how strongly each finding
    is drawn (1 positive, 0.5 uncertain, 0 absent). Lateral views have their own anatomy and their
    own places for each finding."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w), 0.08, np.float32)
    jx, jy = rng.normal(0, 0.02 * w), rng.normal(0, 0.02 * h)
    s = lambda name: float(signal.get(name, 0.0))
    if view == "frontal":
        img += 0.30 * _ellipse(yy, xx, 0.55 * h + jy, 0.5 * w + jx, 0.45 * h, 0.46 * w)
        for side in (-1, 1):  # lungs
            img -= 0.18 * _ellipse(yy, xx, 0.48 * h + jy, (0.5 + side * 0.2) * w + jx, 0.30 * h, 0.15 * w)
        img += 0.20 * ((np.abs(xx - 0.5 * w - jx) < 0.035 * w) & (yy > 0.1 * h))  # spine
        med = 0.05 + 0.07 * s("Enlarged Cardiomediastinum")
        img += 0.28 * ((np.abs(xx - 0.5 * w - jx) < med * w) & (yy > 0.18 * h) & (yy < 0.5 * h))
        heart = 1.0 + 0.6 * s("Cardiomegaly")
        img += 0.30 * _ellipse(yy, xx, 0.64 * h + jy, 0.55 * w + jx, 0.10 * h * heart, 0.13 * w * heart)
        side = rng.choice([-1, 1])
        lung_x = (0.5 + side * 0.2) * w + jx
        if s("Lung Opacity"):
            cy, cx = rng.uniform(0.35, 0.6) * h, lung_x + rng.normal(0, 0.03 * w)
            img += 0.5 * s("Lung Opacity") * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.09 * w) ** 2)))
        if s("Pneumonia"):
            patch = _ellipse(yy, xx, 0.62 * h + jy, (0.5 - side * 0.2) * w + jx, 0.12 * h, 0.13 * w)
            img += 0.5 * s("Pneumonia") * patch * (rng.random((h, w)) > 0.4)
        if s("Pleural Effusion"):  # bright lung bases with a meniscus
            for sd in (-1, 1):
                cx = (0.5 + sd * 0.2) * w + jx
                base = _ellipse(yy, xx, 0.48 * h + jy, cx, 0.30 * h, 0.15 * w) & (yy > 0.62 * h + 0.05 * h * np.cos((xx - cx) / (0.15 * w) * np.pi / 2))
                img += 0.40 * s("Pleural Effusion") * base
        if s("Pleural Other"):
            img += 0.40 * s("Pleural Other") * ((np.abs(xx - (0.5 + side * 0.345) * w - jx) < 4) & (yy > 0.25 * h) & (yy < 0.65 * h))
        if s("Fracture"):
            cy = rng.uniform(0.3, 0.6) * h
            for k in range(3):
                _line(img, yy, xx, cy + 10 * k, (0.5 + side * 0.38) * w, cy + 10 * k + 12, (0.5 + side * 0.30) * w, 3, 0.5 * s("Fracture"))
        if s("Support Devices"):
            _line(img, yy, xx, 0.0, 0.47 * w + jx, 0.55 * h, 0.52 * w + jx, 4, 0.6 * s("Support Devices"))
            img += 0.5 * s("Support Devices") * _ellipse(yy, xx, 0.22 * h, (0.5 - side * 0.28) * w, 10, 10)
    else:  # lateral: one lung field, spine on the right (posterior), heart anterior (left)
        img += 0.30 * _ellipse(yy, xx, 0.55 * h + jy, 0.5 * w + jx, 0.44 * h, 0.42 * w)
        img -= 0.18 * _ellipse(yy, xx, 0.48 * h + jy, 0.52 * w + jx, 0.32 * h, 0.28 * w)
        img += 0.25 * ((np.abs(xx - 0.80 * w - jx) < 0.05 * w) & (yy > 0.1 * h))
        heart = 1.0 + 0.6 * s("Cardiomegaly")
        img += 0.30 * _ellipse(yy, xx, 0.65 * h + jy, 0.32 * w + jx, 0.11 * h * heart, 0.11 * w * heart)
        med = 0.06 + 0.07 * s("Enlarged Cardiomediastinum")
        img += 0.25 * ((np.abs(xx - 0.45 * w - jx) < med * w) & (yy > 0.15 * h) & (yy < 0.45 * h))
        if s("Lung Opacity"):
            cy, cx = rng.uniform(0.35, 0.6) * h, rng.uniform(0.4, 0.65) * w
            img += 0.5 * s("Lung Opacity") * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.09 * w) ** 2)))
        if s("Pneumonia"):
            patch = _ellipse(yy, xx, 0.60 * h + jy, 0.62 * w + jx, 0.13 * h, 0.13 * w)
            img += 0.5 * s("Pneumonia") * patch * (rng.random((h, w)) > 0.4)
        if s("Pleural Effusion"):  # posterior costophrenic angle
            img += 0.40 * s("Pleural Effusion") * (_ellipse(yy, xx, 0.48 * h + jy, 0.52 * w + jx, 0.32 * h, 0.28 * w) & (yy > 0.68 * h) & (xx > 0.5 * w))
        if s("Pleural Other"):
            img += 0.40 * s("Pleural Other") * ((np.abs(yy - 0.2 * h - jy) < 4) & (xx > 0.3 * w) & (xx < 0.7 * w))
        if s("Fracture"):
            cy = rng.uniform(0.3, 0.6) * h
            for k in range(3):
                _line(img, yy, xx, cy + 10 * k, 0.70 * w, cy + 10 * k + 12, 0.76 * w, 3, 0.5 * s("Fracture"))
        if s("Support Devices"):
            _line(img, yy, xx, 0.0, 0.40 * w + jx, 0.55 * h, 0.45 * w + jx, 4, 0.6 * s("Support Devices"))
    img += rng.normal(0, 0.035, (h, w)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


# (prevalence of positive, uncertain, negative; the rest is blank) per finding in the demo
_DEMO_RATES = {
    "Enlarged Cardiomediastinum": (0.25, 0.10, 0.45), "Cardiomegaly": (0.35, 0.08, 0.45),
    "Lung Opacity": (0.35, 0.08, 0.40), "Pneumonia": (0.20, 0.10, 0.45),
    "Pleural Effusion": (0.35, 0.10, 0.45), "Pleural Other": (0.10, 0.05, 0.60),
    "Fracture": (0.08, 0.03, 0.60), "Support Devices": (0.40, 0.03, 0.45),
}


def _demo_study_labels(rng) -> dict:
    labels = {}
    for name, (p, u, n) in _DEMO_RATES.items():
        r = rng.random()
        labels[name] = 1.0 if r < p else 0.0 if r < p + u else -1.0 if r < p + u + n else np.nan
    positive = any(v == 1.0 for v in labels.values())
    labels["No Finding"] = -1.0 if positive else (1.0 if rng.random() < 0.85 else np.nan)
    return labels


def _demo_signal(rng, labels: dict) -> dict:
    """How strongly each finding is drawn: positive 1, uncertain 0.5, blank (unmentioned) by chance."""
    return {k: 1.0 if v == 1.0 else 0.5 if v == 0.0 else float(rng.random() < 0.15) if np.isnan(v) else 0.0
            for k, v in labels.items() if k != "No Finding"}


def make_demo(root: Path, n_train_patients: int = 250, n_test_patients: int = 40, seed: int = 0,
              progress: bool = True) -> Path:
    """Write a small CS 156b-layout dataset under root and return root.

    root/train/pidN/studyM/viewK_{frontal,lateral}.jpg (320 x 384 JPEGs), root/test/…,
    root/student_labels/train2023.csv, test_ids.csv, solution_ids.csv, and test_labels.csv (the
    test images' true labels, which the real course data does not give, for measuring on unseen
    data). Every finding has a planted, learnable signal; the CSV has blanks, uncertain labels,
    lateral views, 4 stray 'CheXpert-v1.0/' rows, 3 rows whose file is missing and 1 unreadable file."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows, test_rows = [], []
    n_total = n_train_patients + n_test_patients
    with tqdm(total=n_total, desc="making demo dataset", unit="patient", disable=not progress) as bar:
        for p in range(n_total):
            is_test = p >= n_train_patients
            pid = f"pid{(90000 if is_test else 10000) + p * 7}"
            for st in range(1 + int(rng.random() < 0.4)):
                labels = _demo_study_labels(rng)
                views = ["frontal"] + (["lateral"] if rng.random() < 0.35 else [])
                for v_i, view in enumerate(views):
                    rel = f"{'test' if is_test else 'train'}/{pid}/study{st + 1}/view{v_i + 1}_{view}.jpg"
                    img = _demo_image(rng, view, _demo_signal(rng, labels))
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img).save(root / rel, quality=90)
                    (test_rows if is_test else rows).append(
                        {"Path": rel, "Sex": rng.choice(["Male", "Female"]), "Age": int(rng.integers(20, 90)),
                         "Frontal/Lateral": view.capitalize(), "AP/PA": "AP" if view == "frontal" else "",
                         **labels})
            bar.update()
    # the faults the real data has, so every code path runs on the demo
    for k in range(4):
        rows.append({**rows[k], "Path": f"CheXpert-v1.0/train/patient{k:05d}/study1/view1_frontal.jpg"})
    for k in range(3):
        rows.append({**rows[5 + k], "Path": f"train/pid{80000 + k}/study1/view1_frontal.jpg"})
    bad = "train/pid85000/study1/view1_frontal.jpg"
    (root / bad).parent.mkdir(parents=True, exist_ok=True)
    (root / bad).write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    rows.append({**rows[9], "Path": bad})

    labels_dir = root / "student_labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    train = pd.DataFrame(rows)[["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + PATHOLOGIES]
    train.insert(0, "Unnamed: 0", np.arange(len(train)))
    train.insert(0, "Unnamed: 0.1", np.arange(len(train)))
    train.to_csv(labels_dir / "train2023.csv", index=False)
    test = pd.DataFrame(test_rows)
    test.insert(0, "Id", 3 * np.arange(len(test)) + 1001)  # integers, not contiguous
    half = len(test) // 2
    test[["Id", "Path"]][:half].to_csv(labels_dir / "test_ids.csv", index=False)
    test[["Id", "Path"]][half:].to_csv(labels_dir / "solution_ids.csv", index=False)
    test[["Id", "Path"] + PATHOLOGIES].to_csv(labels_dir / "test_labels.csv", index=False)
    (root / "README.txt").write_text("Synthetic demo data made by dataset.py (make_demo). Not real X-rays.\n")
    return root


def ensure_demo(root: Path = DEMO_ROOT, progress: bool = True) -> Path:
    """The demo dataset's root, made on first use (atomically: built beside it, then renamed) by one
    process; others that want it at the same time (torchrun's ranks) wait for it (claim_build)."""
    root = Path(root)
    claim = claim_build(root.with_name(f".{root.name}.lock"), (root / "student_labels" / "train2023.csv").is_file,
                        f"the demo dataset {root}")
    if claim is None:
        return root
    with claim:
        tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
        make_demo(tmp, progress=progress)
        try:
            os.replace(tmp, root)
        except OSError:  # made meanwhile by a process that took over the lock of one that seemed gone
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return root


