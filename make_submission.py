"""Write the EvalAI submission CSV from every checkpoint under a folder, checked before it counts.

    python make_submission.py --fill-missing 0                     # demo data, after train.py
    python make_submission.py --data-root /data/cs156b --out submission.csv
    python make_submission.py --data-root /data/cs156b --test-csv /data/cs156b/student_labels/solution_ids.csv

Every best.pt under --checkpoints (searched recursively) is rebuilt from the file alone. The columns
a checkpoint feeds come from the pathology names stored in it, not from its folder: a per-pathology
model feeds one column, a --multi-head model one column per head.

Routing, per pathology and test image (the view comes from the file name, viewN_frontal.jpg or
viewN_lateral.jpg): the models trained on that view (--view frontal|lateral) are used when there
are any, else the all-view models (--combine prefer-view, the default); --combine average averages
both kinds. Several checkpoints for one pathology and view are an error naming them, unless
--ensemble averages them. An image no model covers gets --fill-missing, or is an error naming the
pathology and view. Each model's raw output (tanh, already on [-1, 1]) goes through its checkpoint's
calibration map and is clipped to [-1, 1]; maps of one image are then averaged.

Speed: each test image is decoded once, into the same uint8 cache train.py uses (one cache per
distinct image size and square mode), and every model that needs a batch runs on that one batch.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from dataset import (PATHOLOGIES, VIEWS, UserError, atomic_write, cached_table, default_workers, flip_images,
                     format_table, read_test_csv, resolve_data, run_cli)
from model import Checkpoint, apply_calibration, load_checkpoint
from train import Runtime, setup_runtime

HEADER = ",".join(["Id", *PATHOLOGIES])
MODEL_VIEWS = ("all", *VIEWS)
TABLE_COLUMNS = ["pathology", "view", "source", "trained_on", "images", "val_mse", "val_mse_cv", "val_mse_cal",
                 "const_mse", "val_auc", "mean", "min", "max"]
FLOAT_FORMAT = "%.6f"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", type=Path, help="dataset root; none: the demo dataset in ./demo_data, made on first use")
    p.add_argument("--test-csv", type=Path, help="'Id, Path' CSV to predict (default DATA_ROOT/student_labels/test_ids.csv)")
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="folder searched recursively for best.pt")
    p.add_argument("--out", type=Path, default=Path("submission.csv"), help="submission CSV to write")
    p.add_argument("--fill-missing", type=float, metavar="VALUE",
                   help="value for a pathology (or view) that no checkpoint covers; without it that is an error")
    p.add_argument("--combine", choices=["prefer-view", "average"], default="prefer-view",
                   help="a view-specific model and an all-view model both cover an image: use the view-specific "
                        "one, or average them")
    p.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=False,
                   help="average several checkpoints of one pathology and view (otherwise an error naming them)")
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="test-time augmentation: flip = average with the horizontally flipped image")
    p.add_argument("--study-fusion", action=argparse.BooleanOptionalAction, default=False,
                   help="average each pathology over the images of one study (pidN/studyM), after routing")
    p.add_argument("--cache-dir", type=Path, default=Path("cache"), help="image cache folder (never under the data root)")
    p.add_argument("--workers", type=int, default=default_workers(), help="processes that decode images into the cache")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="autocast on CUDA (bf16 where supported)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    args = p.parse_args(argv)
    if args.fill_missing is not None and not (math.isfinite(args.fill_missing) and -1 <= args.fill_missing <= 1):
        p.error(f"--fill-missing must be a number in [-1, 1], got {args.fill_missing}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    return args


# ---------------------------------------------------------------------------------------------
# Checkpoints and routing

@dataclass
class Source:
    """One loaded checkpoint: the model (eval mode, on the device) and its Checkpoint."""
    name: str  # path relative to --checkpoints, for messages and the summary table
    model: torch.nn.Module
    ckpt: Checkpoint

    @property
    def pathologies(self) -> list[str]:
        return list(self.ckpt.pathologies)

    @property
    def view(self) -> str:
        return self.ckpt.view

    @property
    def preprocess_key(self) -> tuple[int, str]:
        """Models with the same key read the same cached pixels, so they share each batch."""
        return int(self.ckpt.preprocess["image_size"]), self.ckpt.preprocess["square"]

    def metrics(self, pathology: str) -> dict:
        return (self.ckpt.metrics or {}).get("per_pathology", {}).get(pathology) or {}


def find_checkpoints(folder: Path) -> list[Path]:
    """Every best.pt under folder, sorted; an error when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--checkpoints {folder}: no such directory; train first "
                        f"(python train.py --pathology NAME --out-dir {folder})")
    paths = sorted(p for p in folder.rglob("best.pt") if p.is_file())
    if not paths:
        raise UserError(f"no best.pt under {folder}; train first (python train.py --pathology NAME --out-dir {folder})")
    return paths


def load_sources(paths: list[Path], folder: Path, rt: Runtime) -> list[Source]:
    """Load every checkpoint (errors name the file); channels_last on CUDA."""
    sources = []
    for path in tqdm(paths, desc="loading checkpoints", unit="ckpt", disable=not rt.progress, dynamic_ncols=True):
        model, ckpt = load_checkpoint(path, rt.device)
        if ckpt.view not in MODEL_VIEWS:
            raise UserError(f"{path}: unknown view {ckpt.view!r} (expected one of {', '.join(MODEL_VIEWS)})")
        if rt.cuda:
            model.to(memory_format=torch.channels_last)
        sources.append(Source(path.relative_to(folder).as_posix(), model, ckpt))
    ignored = sorted({n for s in sources for n in s.pathologies if n not in PATHOLOGIES})
    if ignored:
        warnings.warn(f"ignoring {', '.join(ignored)}: not a submission column", stacklevel=2)
    return sources


Routes = dict[str, dict[str, list[tuple[int, int]]]]


def route(sources: list[Source], combine: str, ensemble: bool) -> Routes:
    """routes[pathology][image view] = [(source index, output column), ...]: the models whose
    calibrated outputs are averaged for that pathology on images of that view ([] = not covered).

    Several checkpoints for one (pathology, trained view) are an error naming them unless ensemble."""
    by: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for s, src in enumerate(sources):
        for k, name in enumerate(src.pathologies):
            by.setdefault((name, src.view), []).append((s, k))
    if not ensemble:
        for (name, view), found in by.items():
            if name in PATHOLOGIES and len(found) > 1:
                raise UserError(f"{len(found)} checkpoints for {name} (view {view}): "
                                + ", ".join(sources[s].name for s, _ in found)
                                + "; keep one, or pass --ensemble to average them")
    routes: Routes = {}
    for name in PATHOLOGIES:
        general = by.get((name, "all"), [])
        routes[name] = {}
        for view in VIEWS:
            specific = by.get((name, view), [])
            routes[name][view] = (specific or general) if combine == "prefer-view" else specific + general
    return routes


def check_coverage(routes: Routes, sources: list[Source], test: pd.DataFrame, fill: float | None,
                   study_fusion: bool, folder: Path) -> None:
    """Without --fill-missing, every (pathology, test image) needs a model: errors name what is missing.
    With --study-fusion an image is also covered by a covered image of its own study."""
    if fill is not None:
        return
    absent = [n for n in PATHOLOGIES if not any(routes[n].values())]
    if absent:
        raise UserError(f"no checkpoint under {folder} for {', '.join(absent)}; train "
                        + ("it" if len(absent) == 1 else "them") + ", or pass --fill-missing VALUE to write that value")
    views = test["view"].to_numpy()
    for name in PATHOLOGIES:
        covered = np.isin(views, [v for v in VIEWS if routes[name][v]])
        if study_fusion:
            covered = pd.Series(covered).groupby(test["study"].to_numpy()).transform("any").to_numpy()
        for view in VIEWS:
            rows = ~covered & (views == view)
            if rows.any():
                have = sorted({sources[s].name for v in VIEWS for s, _ in routes[name][v]})
                raise UserError(f"{name}: no checkpoint covers {view} images ({int(rows.sum())} test images, e.g. "
                                f"{test['path'][rows].iloc[0]}); {name} has only {', '.join(have)}. Train one with "
                                f"--view {view} or --view all, or pass --fill-missing VALUE")


def rows_needed(routes: Routes, n_sources: int, views: np.ndarray) -> np.ndarray:
    """need (n_sources, N) bool: the test rows each model must predict."""
    need = np.zeros((n_sources, len(views)), dtype=bool)
    for by_view in routes.values():
        for view, chosen in by_view.items():
            for s, _ in chosen:
                need[s] |= views == view
    return need


# ---------------------------------------------------------------------------------------------
# Inference

@torch.no_grad()
def predict(sources: list[Source], caches: dict, slots: dict, need: np.ndarray, batch_size: int, rt: Runtime,
            tta: str = "none") -> list[np.ndarray]:
    """Raw outputs per source, (N, K_s) float32 in [-1, 1], NaN on rows a source does not serve.

    Test rows are read once per preprocessing key, batch by batch (uint8 (B, 1, S, S) from the
    cache); every model with that key that needs any of the batch's rows runs on them."""
    n = need.shape[1]
    raw = [np.full((n, len(s.pathologies)), np.nan, dtype=np.float32) for s in sources]
    groups = {key: [s for s, src in enumerate(sources) if src.preprocess_key == key and need[s].any()] for key in caches}
    total = sum(int(need[g].any(0).sum()) for g in groups.values() if g)
    with tqdm(total=total, desc="predicting", unit="img", disable=not rt.progress, dynamic_ncols=True) as bar:
        for key, members in groups.items():
            if not members:
                continue
            rows = np.flatnonzero(need[members].any(0))
            for i in range(0, len(rows), batch_size):
                batch = rows[i:i + batch_size]
                images = caches[key].get(slots[key][batch]).to(rt.device, non_blocking=True)
                if rt.cuda:
                    images = images.contiguous(memory_format=torch.channels_last)
                for s in members:
                    sel = need[s][batch]
                    if not sel.any():
                        continue
                    x = images if sel.all() else images[torch.from_numpy(sel).to(rt.device)]
                    with rt.autocast():
                        model = sources[s].model
                        out = model.score(model(x)).float()
                        if tta == "flip":
                            out = (out + model.score(model(flip_images(x))).float()) / 2
                    raw[s][batch[sel]] = out.cpu().numpy()  # note: a CPU-GPU sync per model and batch
                bar.update(len(batch))
    return raw


def assemble(sources: list[Source], raw: list[np.ndarray], routes: Routes, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values (N, P) float64 in [-1, 1], covered (N, P) bool), P = len(PATHOLOGIES). Each routed
    model's output goes through its calibration map (clipped to [-1, 1]); then they are averaged."""
    values = np.full((len(views), len(PATHOLOGIES)), np.nan)
    for j, name in enumerate(PATHOLOGIES):
        for view, chosen in routes[name].items():
            rows = views == view
            if chosen and rows.any():
                cal = [apply_calibration((sources[s].ckpt.calibration or {}).get(name), raw[s][rows, k])
                       for s, k in chosen]
                values[rows, j] = np.mean(cal, axis=0)
    return values, ~np.isnan(values)


def fuse_studies(values: np.ndarray, studies: np.ndarray) -> np.ndarray:
    """Average each column over the images of one study; NaN (uncovered) entries do not count, and
    get the study's mean when another view of the study has one. values (N, P), NaN = uncovered."""
    return pd.DataFrame(values).groupby(studies).transform("mean").to_numpy()


# ---------------------------------------------------------------------------------------------
# The checked CSV

def check_submission(path: Path, ids) -> None:
    """The CSV at path is a valid submission for these test Ids: exact header, every Id once and no
    other (any order), every value finite and in [-1, 1]. Raises UserError saying what is wrong."""
    with open(path) as f:
        header = f.readline().rstrip("\r\n")
    if header != HEADER:
        raise UserError(f"{path}: header is {header!r}, expected {HEADER!r}")
    df = pd.read_csv(path)
    got = pd.to_numeric(df["Id"], errors="coerce")
    if got.isna().any() or got.duplicated().any():
        raise UserError(f"{path}: Ids are not unique integers")
    want = set(int(i) for i in ids)
    extra, missing = set(got.astype(np.int64)) - want, want - set(got.astype(np.int64))
    if extra or missing:
        raise UserError(f"{path}: {len(missing)} test Ids missing (e.g. {sorted(missing)[:3]}) and "
                        f"{len(extra)} extra (e.g. {sorted(extra)[:3]})")
    v = df[PATHOLOGIES].to_numpy(np.float64)
    bad = ~np.isfinite(v) | (v < -1) | (v > 1)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise UserError(f"{path}: {int(bad.sum())} values not finite in [-1, 1], e.g. Id {df['Id'][r]}, "
                        f"{PATHOLOGIES[c]} = {v[r, c]}")


def write_submission(path: Path, submission: pd.DataFrame, ids) -> None:
    """Write to a temporary name, check that file, then rename: a failed run leaves no CSV."""
    def write(tmp: Path):
        submission.to_csv(tmp, index=False, float_format=FLOAT_FORMAT)
        check_submission(tmp, ids)
    atomic_write(path, write)


def summary_rows(sources: list[Source], routes: Routes, values: np.ndarray, covered: np.ndarray,
                 views: np.ndarray, fill: float | None) -> list[dict]:
    """One row per pathology, image view and source (a checkpoint, study fusion, or the fill value):
    how many test images it covered, the checkpoint's validation metrics, and the final values'
    mean/min/max over that pathology's images of that view."""
    rows = []
    for j, name in enumerate(PATHOLOGIES):
        if not covered[:, j].any():  # no model at all: one row, not one per view
            rows.append({"pathology": name, "view": "all", "source": f"--fill-missing {fill:g}",
                         "images": len(views), "mean": float(fill), "min": float(fill), "max": float(fill)})
            continue
        for view in VIEWS:
            here = views == view
            if not here.any():
                continue
            stats = {"mean": float(values[here, j].mean()), "min": float(values[here, j].min()),
                     "max": float(values[here, j].max())}
            n_model = int(here.sum()) if routes[name][view] else 0
            for s, _ in routes[name][view]:
                m = sources[s].metrics(name)
                rows.append({"pathology": name, "view": view, "source": sources[s].name, "trained_on": sources[s].view,
                             "images": n_model, **{k: m.get(k) for k in TABLE_COLUMNS[5:10]}, **stats})
            n_fused = int((covered[here, j]).sum()) - n_model
            if n_fused:
                rows.append({"pathology": name, "view": view, "source": "study fusion", "images": n_fused, **stats})
            n_filled = int((~covered[here, j]).sum())
            if n_filled:
                rows.append({"pathology": name, "view": view, "source": f"--fill-missing {fill:g}",
                             "images": n_filled, **stats})
    return rows


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    """Returns {"out", "submission" (DataFrame), "rows" (summary table), "n_images", "seconds"}."""
    args = parse_args(argv)
    t0 = time.time()
    paths = find_checkpoints(args.checkpoints)
    root, csv_path = resolve_data(args.data_root, args.test_csv, "test_ids.csv")
    test = read_test_csv(csv_path)
    if len(test) == 0:
        raise UserError(f"{csv_path}: no test rows")
    rt = setup_runtime(args, distributed=False)
    sources = load_sources(paths, args.checkpoints, rt)
    routes = route(sources, args.combine, args.ensemble)
    check_coverage(routes, sources, test, args.fill_missing, args.study_fusion, args.checkpoints)
    views = test["view"].to_numpy()
    need = rows_needed(routes, len(sources), views)

    # decode every test image once per preprocessing key; a missing or unreadable one is an error
    t_decode = time.time()
    caches, slots = {}, {}
    for size, square in sorted({src.preprocess_key for s, src in enumerate(sources) if need[s].any()}):
        table, cache = cached_table(test, root, size, args.cache_dir, csv_path.stem, square, args.workers,
                                    on_bad="error", progress=args.progress)
        caches[(size, square)], slots[(size, square)] = cache, table["slot"].to_numpy()
    t_predict = time.time()
    raw = predict(sources, caches, slots, need, args.batch_size, rt, args.tta)
    t_done = time.time()

    values, covered = assemble(sources, raw, routes, views)
    if args.study_fusion:
        values = fuse_studies(values, test["study"].to_numpy())
        covered = ~np.isnan(values)
    if (~covered).any():
        if args.fill_missing is None:  # check_coverage makes this unreachable; never write NaN
            raise UserError("some test images are covered by no checkpoint; pass --fill-missing VALUE")
        values = np.where(covered, values, args.fill_missing)
    submission = pd.DataFrame(np.clip(values, -1.0, 1.0), columns=PATHOLOGIES)
    submission.insert(0, "Id", test["Id"].to_numpy())
    write_submission(args.out, submission, test["Id"])

    rows = summary_rows(sources, routes, values, covered, views, args.fill_missing)
    n_run = int(need.sum())
    print("\n" + format_table(rows, TABLE_COLUMNS))
    print(f"\nwrote {args.out}: {len(submission)} rows from {csv_path} ({int((views == 'frontal').sum())} frontal, "
          f"{int((views == 'lateral').sum())} lateral), checked; {len(sources)} checkpoint(s), {n_run} model-image "
          f"predictions in {t_done - t_predict:.1f}s on {rt.device}"
          + (f" ({n_run / (t_done - t_predict):.0f}/s)" if t_done > t_predict else "")
          + f", cache {t_predict - t_decode:.1f}s, total {time.time() - t0:.1f}s")
    return {"out": args.out, "submission": submission, "rows": rows, "n_images": len(test),
            "seconds": {"decode": t_predict - t_decode, "predict": t_done - t_predict, "total": time.time() - t0}}


if __name__ == "__main__":
    sys.exit(run_cli(main))
