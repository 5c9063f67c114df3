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
pathology and view. Each model's raw output (on [-1, 1] already: tanh, or p(positive) -
p(negative) for a three-class head) goes through its checkpoint's calibration map and is clipped to
[-1, 1]; maps of one image are then averaged.

K folds (train.py --folds K): the best.pt of <slug>/fold0/ .. fold<K-1>/ (one folds_sha1) are one
model, shown as `<slug>/fold* (K models)`, no --ensemble needed: its output is the mean of its K
folds' calibrated outputs, each fold through its own map (fitted on its own validation rows). A
fold without best.pt is an error naming it: finish it, or move the K-fold folder away.

Speed: each test image is decoded once, into the uint8 cache train.py uses; each model reads the
rows it serves from there and predicts them with model.predict, training's validation loop.

Scoring (--labels FILE: an 'Id' + label-columns CSV for the test CSV's Ids, or a labelled CSV in a
training layout whose own images are predicted, Ids 0..N-1): the written CSV, read back exactly as
submitted, is scored per pathology with patient-grouped bootstrap intervals into metrics.json and
metrics.csv beside --out; --plots DIR adds a ROC curve and a reliability diagram per pathology.
    python make_submission.py --data-root DIR --labels heldout.csv --out eval/sub.csv --plots eval/plots

Blend (experiments/blend.py): with --blend blend.json and --checkpoints PARENT (the folder holding
the runs), each pathology the blend covers is predicted by exactly its members, PARENT/<member>/best.pt
(a K-fold member: the mean of its folds' raw outputs), combined by calibration.apply_blend (learned
weights, study fusion and calibration). A member that changed since the blend was fitted (its
best.pt's epoch or validation loss, or its validation predictions: blendfile.py) is refused. Other
pathologies are routed as above over all checkpoints under PARENT.

Every file written (--out, metrics.json/.csv beside it, --plots) is checked before any work: never
an input (a CSV, a checkpoint, the blend), never under the data root, writable. Reference:
docs/submission.md, docs/evaluation.md.
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

from cache import cached_table
from blendfile import load_blend, predictions_file
from common import (DEMO_ROOT, Parser, UserError, add_data_flags, add_device_flags, atomic_write, check_common_flags,
                    check_outputs, format_table, run_cli)
import config
from patients import add_patient_col_flag
from dataset import (LABEL_CONVENTIONS, PATHOLOGIES, VIEWS, XrayDataset, choose_convention, describe_convention,
                     parse_ids, parse_label_column, read_csv_text, read_header, read_test_csv, read_train_csv,
                     resolve_data)
from calibration import apply_blend, apply_calibration, fuse_studies
from evaluation import METRIC_COLUMNS, evaluate, metrics_rows, plot_evaluation, write_metrics
from model import Checkpoint, load_checkpoint, predict
from runs import FOLD_NAME
from runtime import Runtime, setup_runtime
from tracking import submission_manifest, submission_manifest_path

HEADER = ",".join(["Id", *PATHOLOGIES])
MODEL_VIEWS = ("all", *VIEWS)
TABLE_COLUMNS = ["pathology", "view", "source", "trained_on", "images", "val_mse", "val_mse_cv", "val_mse_cal",
                 "const_mse", "val_auc", "mean", "min", "max"]
# None: pandas writes each float64 as its shortest repr (0.1, -0.899999999, 0.0), which reads back as the
# same float64. Fewer digits would merge values that a map with a tiny slope (the guard's constant
# choice) keeps apart by ~1e-9, and the AUC scored from the file would not be the model's.
FLOAT_FORMAT = None


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_flags(p, "--test-csv", "'Id, Path' CSV to predict (default DATA_ROOT/student_labels/test_ids.csv)",
                   image=False)  # each checkpoint says the size and square mode it was trained at
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"),
                   help="folder searched recursively for best.pt (the fold<I>/best.pt of a K-fold model: one model)")
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
    p.add_argument("--blend", type=Path, metavar="FILE",
                   help="blend.json (experiments/blend.py): its pathologies are predicted by their members, "
                        "--checkpoints PARENT/<member>/best.pt, with the learned weights, study fusion and calibration")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="score the written CSV: an 'Id' + label-columns CSV for the test CSV's Ids, or a labelled CSV "
                        "with 'Path' in a training layout whose images are then predicted; writes metrics.json and "
                        "metrics.csv beside --out")
    add_patient_col_flag(p)  # a --labels CSV in a training layout: its patients, for the intervals
    p.add_argument("--label-convention", choices=LABEL_CONVENTIONS, default="auto",
                   help="how --labels writes labels: cs156b (0 uncertain, -1 negative), chexpert (Stanford's: "
                        "0 negative, -1 uncertain), or auto: detected from the layout")
    p.add_argument("--plots", type=Path, metavar="DIR", help="with --labels: a ROC curve and a reliability diagram "
                   "per pathology, as PNGs in DIR")
    p.add_argument("--batch-size", type=int, default=64)
    add_device_flags(p)
    config.add_config_flag(p)
    args = config.parse_args(p, argv)
    if args.fill_missing is not None and not (math.isfinite(args.fill_missing) and -1 <= args.fill_missing <= 1):
        p.error(f"--fill-missing must be a number in [-1, 1], got {args.fill_missing}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    check_common_flags(p, args)  # --workers, --cache-dir
    if args.plots is not None and args.labels is None:
        p.error("--plots needs --labels: the plots compare predictions with labels")
    if args.blend is not None and not args.blend.is_file():  # now, not once the CSV and checkpoints are read
        p.error(f"--blend {args.blend}: no such file; pass the blend.json that experiments/blend.py wrote")
    return args


# ---------------------------------------------------------------------------------------------
# Checkpoints and routing

@dataclass
class Source:
    """One model: a loaded checkpoint, or a K-fold model (the K best.pt of one <slug>/fold<I>/, one
    folds_sha1), whose K folds are each predicted and then averaged. models and ckpts are in fold
    order, eval mode, on the device."""
    name: str  # for messages and the summary table: 'a/cardiomegaly/best.pt', 'a/cardiomegaly/fold* (5 models)'
    folder: str  # the model folder relative to --checkpoints: 'a/cardiomegaly', a blend member's name
    models: list[torch.nn.Module]
    ckpts: list[Checkpoint]

    @property
    def ckpt(self) -> Checkpoint:
        """The first checkpoint: its pathologies, view and preprocessing are every fold's (group_folds checks)."""
        return self.ckpts[0]

    @property
    def kfold(self) -> bool:
        return len(self.ckpts) > 1

    @property
    def pathologies(self) -> list[str]:
        return list(self.ckpt.pathologies)

    @property
    def view(self) -> str:
        return self.ckpt.view

    @property
    def preprocess_key(self) -> tuple[int, str, str]:
        """Models with the same key (size, square, equalize) read the same cached pixels."""
        pre = self.ckpt.preprocess
        return int(pre["image_size"]), pre["square"], pre.get("equalize", "none")

    def metrics(self, pathology: str) -> dict:
        """The checkpoint's validation metrics of one pathology; a K-fold model's are the mean over
        its folds (n, the validation rows, their sum), numbers that all its folds record."""
        per = [(c.metrics or {}).get("per_pathology", {}).get(pathology) or {} for c in self.ckpts]
        if len(per) == 1:
            return per[0]
        keys = [k for k in per[0] if all(isinstance(m.get(k), (int, float)) for m in per)]
        return {k: (sum if k == "n" else np.mean)([m[k] for m in per]) for k in keys}


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


def warn_unfinished(paths: list[Path]) -> None:
    """One warning naming the model folders whose best.pt has no summary.json beside it: runs still
    training or stopped before their end, whose best epoch so far is used (never silently)."""
    folders = [str(p.parent) for p in paths if not (p.parent / "summary.json").is_file()]
    if folders:
        warnings.warn(f"{len(folders)} model folder(s) with best.pt but no summary.json (a run still training or "
                      f"stopped before its end): {', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''}; their "
                      f"best epoch so far is used: finish them (train.py ... --resume), or move them out of "
                      f"--checkpoints", stacklevel=2)


def guard_outputs(args, paths: list[Path]) -> None:
    """common.check_outputs for every file this run writes, before any work: --out, metrics.json and
    metrics.csv beside it (with --labels), --plots. None may be an input (--test-csv, --labels,
    --blend, a checkpoint, with --blend the runs' validation predictions), lie under the data root
    (the demo's folder without --data-root; the training CSV lies there too) or be unwritable."""
    files = {"--out": args.out, "the manifest beside --out": submission_manifest_path(args.out)}
    if args.labels is not None:
        files.update({f"{name} beside --out": args.out.with_name(name) for name in ("metrics.json", "metrics.csv")})
    inputs = {"--test-csv": args.test_csv, "--labels": args.labels, "--blend": args.blend}
    for path, rel in ((p, p.relative_to(args.checkpoints)) for p in paths):
        inputs[f"--checkpoints ({rel.as_posix()})"] = path
        fold = FOLD_NAME.fullmatch(path.parent.name)  # a K-fold model's predictions are its parent's
        pred = predictions_file(path.parent.parent if fold else path.parent, bool(fold))
        if args.blend is not None and pred.is_file():
            inputs[f"--checkpoints ({(rel.parent.parent if fold else rel.parent).as_posix()}/{pred.name})"] = pred
    root = args.data_root if args.data_root is not None else DEMO_ROOT  # what resolve_data will read
    check_outputs(files=files, folders={"--plots": args.plots}, inputs=inputs, data_root=root)


def load_sources(paths: list[Path], folder: Path, rt: Runtime) -> list[Source]:
    """Load every checkpoint (errors name the file; channels_last on CUDA) and gather the folds of
    each K-fold model into one Source (group_folds)."""
    loaded = []
    for path in tqdm(paths, desc="loading checkpoints", unit="ckpt", disable=not rt.progress, dynamic_ncols=True):
        model, ckpt = load_checkpoint(path, rt.device)
        if ckpt.view not in MODEL_VIEWS:
            raise UserError(f"{path}: unknown view {ckpt.view!r} (expected one of {', '.join(MODEL_VIEWS)})")
        if rt.cuda:
            model.to(memory_format=torch.channels_last)
        loaded.append((path, model, ckpt))
    sources = group_folds(loaded, folder)
    ignored = sorted({n for s in sources for n in s.pathologies if n not in PATHOLOGIES})
    if ignored:
        warnings.warn(f"ignoring {', '.join(ignored)}: not a submission column", stacklevel=2)
    return sources


def group_folds(loaded: list[tuple[Path, torch.nn.Module, Checkpoint]], folder: Path) -> list[Source]:
    """One Source per checkpoint, except the folds of a K-fold model: X/fold<I>/best.pt whose
    checkpoint records fold I of K (split.folds, split.fold, train.py --folds K) form one Source,
    'X/fold* (K models)', folder X. Errors name the file or the folder: a fold with other folds
    (folds_sha1), pathologies, view or preprocessing than fold 0's, or a fold 0..K-1 without best.pt."""
    sources, kfold = [], {}  # sources: (position of its first file in `loaded`, Source)
    for i, (path, model, ckpt) in enumerate(loaded):
        rel = Path(path).relative_to(folder)
        split = ckpt.split or {}
        fold = FOLD_NAME.fullmatch(rel.parent.name)
        if fold and split.get("folds") and split.get("fold") is not None:
            if int(split["fold"]) != int(fold.group(1)):
                raise UserError(f"{path}: trained as fold {split['fold']} of {split['folds']}, but kept in "
                                f"{rel.parent.name}/")
            kfold.setdefault(rel.parent.parent, []).append((i, path, model, ckpt))
        else:
            sources.append((i, Source(rel.as_posix(), rel.parent.as_posix(), [model], [ckpt])))

    def folds_of(c: Checkpoint) -> tuple:
        return c.split.get("folds"), c.split.get("folds_sha1")

    def model_of(c: Checkpoint) -> tuple:
        return c.pathologies, c.view, c.preprocess["image_size"], c.preprocess["square"], c.preprocess.get("equalize")
    for x, folds in kfold.items():
        position, first_path, _, first = folds[0]
        for _, path, _, ckpt in folds[1:]:
            if folds_of(ckpt) != folds_of(first):
                raise UserError(f"{path}: its folds ({ckpt.split.get('folds')} folds, hash "
                                f"{str(ckpt.split.get('folds_sha1'))[:8]}) are not those of {first_path} "
                                f"({first.split.get('folds')} folds, hash {str(first.split.get('folds_sha1'))[:8]}): "
                                f"retrain it with the same --split-seed, --folds and data, or move it out of "
                                f"--checkpoints")
            if model_of(ckpt) != model_of(first):
                raise UserError(f"{path}: predicts {ckpt.pathologies} (view {ckpt.view}, {ckpt.preprocess}) unlike "
                                f"{first_path} ({first.pathologies}, view {first.view}, {first.preprocess}): the folds "
                                f"of one K-fold model are one model trained on other rows")
        k = int(first.split["folds"])
        by_fold = {int(c.split["fold"]): (m, c) for _, _, m, c in folds}
        missing = [i for i in range(k) if i not in by_fold]
        if missing:
            raise UserError(f"{folder / x}: a K-fold model of {k} folds without "
                            + ", ".join(f"fold{i}/best.pt" for i in missing)
                            + f" (no {folder / x / f'fold{missing[0]}' / 'best.pt'}): finish training it (train.py "
                            f"--folds {k} --fold {missing[0]} --resume), or move {folder / x} out of --checkpoints")
        name = "fold*" if x == Path(".") else f"{x.as_posix()}/fold*"
        sources.append((position, Source(f"{name} ({k} models)", x.as_posix(), [by_fold[i][0] for i in range(k)],
                                         [by_fold[i][1] for i in range(k)])))
    return [src for _, src in sorted(sources, key=lambda e: e[0])]


Routes = dict[str, dict[str, list[tuple[int, int]]]]


def route(sources: list[Source], combine: str, ensemble: bool, blends: dict | None = None) -> Routes:
    """routes[pathology][image view] = [(source index, output column), ...]: the models whose
    calibrated outputs are averaged for that pathology on images of that view ([] = not covered).
    A blended pathology (blends: name -> Blend) is routed to exactly its members that serve the view.

    Several checkpoints for one (pathology, trained view) are an error naming them unless ensemble."""
    blends = blends or {}
    by: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for s, src in enumerate(sources):
        for k, name in enumerate(src.pathologies):
            by.setdefault((name, src.view), []).append((s, k))
    if not ensemble:
        for (name, view), found in by.items():
            if name in PATHOLOGIES and name not in blends and len(found) > 1:
                raise UserError(f"{len(found)} checkpoints for {name} (view {view}): "
                                + ", ".join(sources[s].name for s, _ in found)
                                + "; keep one, or pass --ensemble to average them")
    routes: Routes = {}
    for name in PATHOLOGIES:
        if name in blends:
            routes[name] = {view: [(s, k) for s, k in blends[name].members if sources[s].view in (view, "all")]
                            for view in VIEWS}
            continue
        general = by.get((name, "all"), [])
        routes[name] = {}
        for view in VIEWS:
            specific = by.get((name, view), [])
            routes[name][view] = (specific or general) if combine == "prefer-view" else specific + general
    return routes


def check_coverage(routes: Routes, sources: list[Source], test: pd.DataFrame, fill: float | None,
                   fused: set[str], folder: Path) -> None:
    """Without --fill-missing, every (pathology, test image) needs a model: errors name what is missing.
    For the pathologies in `fused` (study fusion) an image is also covered by a covered image of its own study."""
    if fill is not None:
        return
    absent = [n for n in PATHOLOGIES if not any(routes[n].values())]
    if absent:
        raise UserError(f"no checkpoint under {folder} for {', '.join(absent)}; train "
                        + ("it" if len(absent) == 1 else "them") + ", or pass --fill-missing VALUE to write that value")
    views = test["view"].to_numpy()
    for name in PATHOLOGIES:
        covered = np.isin(views, [v for v in VIEWS if routes[name][v]])
        if name in fused:
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
# What is predicted: the test CSV, or the images of a labelled CSV; and the labels to score against

def read_inputs(args) -> tuple[Path, Path, pd.DataFrame, pd.DataFrame | None, bool]:
    """(data root, the CSV whose images are predicted, its rows (Id, path, patient, study, view),
    the labels by Id (None without --labels), whether those rows come from --labels itself)."""
    if args.labels is not None and is_training_layout(args.labels):
        if args.test_csv is not None:
            raise UserError(f"--labels {args.labels} is a labelled CSV with 'Path': its own images are predicted; "
                            f"drop --test-csv, or give --labels an 'Id' + label-columns CSV for the test CSV")
        root, csv_path = resolve_data(args.data_root, args.labels, "")
        table = read_train_csv(csv_path, convention=args.label_convention, patient_col=args.patient_col)
        print(f"--labels {csv_path}: "
              + describe_convention(table.attrs["label_convention"], table.attrs["label_convention_how"]))
        test = table[["path", "patient", "study", "view"]].copy()
        test.insert(0, "Id", np.arange(len(test), dtype=np.int64))
        names = [n for n in PATHOLOGIES if n in table.attrs["labels"]]
        return root, csv_path, test, table[names].astype(np.float64).set_axis(test["Id"].to_numpy()), True
    root, csv_path = resolve_data(args.data_root, args.test_csv, "test_ids.csv")
    test = read_test_csv(csv_path)
    if args.labels is None:
        return root, csv_path, test, None, False
    targets = read_id_labels(args.labels, args.label_convention)
    extra = targets.index.difference(test["Id"])
    if len(extra):
        raise UserError(f"--labels {args.labels}: {len(extra)} Ids are not in {csv_path} (e.g. "
                        f"{', '.join(str(i) for i in extra[:5])}); pass --test-csv the CSV those Ids come from")
    return root, csv_path, test, targets, False


def is_training_layout(path: Path) -> bool:
    """A labelled CSV like train2023.csv or Stanford's valid.csv ('Path' and 'AP/PA' columns)."""
    return {"Path", "AP/PA"} <= set(read_header(path, "--labels "))


def read_id_labels(path: Path, convention: str) -> pd.DataFrame:
    """An 'Id' + label-columns CSV (other columns ignored) -> float64 labels indexed by Id, one column
    per submission column it has, mapped from its convention onto the project's scale (1 positive,
    0 uncertain, -1 negative, NaN blank). Errors name the line and column of a bad value or Id (parse_ids)."""
    header = read_header(path, "--labels ")
    names = [n for n in PATHOLOGIES if n in header]
    if "Id" not in header or not names:
        raise UserError(f"--labels {path}: needs an 'Id' column and label columns named like the submission's "
                        f"({', '.join(PATHOLOGIES)}), or 'Path' and 'AP/PA' columns (a training layout); "
                        f"has: {', '.join(header)}")
    raw = read_csv_text(path, "--labels ")
    ids = parse_ids(raw["Id"], f"--labels {path}")
    convention, how = choose_convention(convention, header, raw["Path"] if "Path" in header else [])
    print(f"--labels {path}: {describe_convention(convention, how)}")
    line = pd.Series(raw.index + 2, index=raw.index)  # header is line 1
    out = {col: parse_label_column(raw, col, convention, f"--labels {path}", line) for col in names}
    return pd.DataFrame(out, index=ids)


def decode_images(test: pd.DataFrame, keys: set, root: Path, name: str, args,
                  on_bad: str) -> tuple[pd.DataFrame, dict, dict]:
    """Decode the images once per preprocessing key (size, square, equalize) into the cache. Returns
    the rows kept (all of them, unless on_bad='drop' dropped unreadable ones with a warning), and per
    key the cache and each kept row's slot in it."""
    caches, keep = {}, np.ones(len(test), dtype=bool)
    for size, square, equalize in sorted(keys):
        table, caches[(size, square, equalize)] = cached_table(test, root, size, args.cache_dir, name, square,
                                                               args.workers, on_bad=on_bad, progress=args.progress,
                                                               equalize=equalize)
        keep &= test["path"].isin(table["path"]).to_numpy()
    test = test[keep].reset_index(drop=True)
    slots = {key: test["path"].map({p: i for i, p in enumerate(c.paths)}).to_numpy(np.int64)
             for key, c in caches.items()}
    return test, caches, slots


def training_means(sources: list[Source], routes: Routes) -> dict[str, float]:
    """The constant predictor of each pathology: the training mean recorded in the checkpoints that
    predict it (their mean, weighted by their training rows where recorded); NaN when none records
    one (checkpoints saved before train.py recorded it)."""
    out = {}
    for name, by_view in routes.items():
        m = [sources[s].metrics(name) for s in sorted({s for chosen in by_view.values() for s, _ in chosen})]
        m = [x for x in m if x.get("train_mean") is not None]
        weights = [x["n_train"] for x in m] if all(x.get("n_train") for x in m) else None
        out[name] = float(np.average([x["train_mean"] for x in m], weights=weights)) if m else float("nan")
    return out


def score(out: Path, test: pd.DataFrame, targets: pd.DataFrame, const: dict, plots: Path | None) -> tuple[dict, list]:
    """Score the written CSV, read back (the values exactly as submitted), against the labels of its
    Ids, grouped by patient (evaluation.evaluate); write metrics.json and metrics.csv beside it and,
    with plots, a ROC and a reliability PNG per labelled pathology. Returns (metrics, PNG paths)."""
    ids = test["Id"].to_numpy()
    names = list(targets.columns)
    pred = read_submission(out).set_index("Id").loc[ids, names].to_numpy(np.float64)
    target = targets.reindex(ids).to_numpy(np.float64)
    metrics = evaluate(pred, target, test["patient"].to_numpy(), names, const)
    write_metrics(metrics, out.with_name("metrics.json"), out.with_name("metrics.csv"))
    return metrics, plot_evaluation(pred, target, names, plots) if plots is not None else []


# ---------------------------------------------------------------------------------------------
# Inference

def predict_sources(sources: list[Source], caches: dict, slots: dict, need: np.ndarray, batch_size: int,
                    rt: Runtime, tta: str = "none") -> list[np.ndarray]:
    """Raw outputs per source, (F, N, K_s) float32 in [-1, 1] (F: its models, the K folds of a K-fold
    model, else 1), NaN on rows a source does not serve. Each model runs model.predict over an
    XrayDataset of exactly the rows it serves, read from the cache of its preprocessing (decoded
    once; reading its uint8 again per model is cheap next to the forward pass)."""
    n = need.shape[1]
    raw = [np.full((len(src.models), n, len(src.pathologies)), np.nan, dtype=np.float32) for src in sources]
    runs = [(s, f) for s, src in enumerate(sources) if need[s].any() for f in range(len(src.models))]
    for s, f in tqdm(runs, desc="models", unit="model", disable=not rt.progress or len(runs) < 2, dynamic_ncols=True):
        src, rows = sources[s], np.flatnonzero(need[s])
        key = src.preprocess_key
        data = XrayDataset([caches[key]], slots[key][rows], np.zeros((len(rows), 0), np.float32))
        raw[s][f, rows] = predict(src.models[f], data, batch_size, rt, tta,
                                  desc=f"predicting {src.folder}" + (f" fold {f}" if src.kfold else ""))
    return raw


def calibrated(src: Source, name: str, raw: np.ndarray) -> np.ndarray:
    """One model's output for pathology `name`: raw (F, n), one row per fold model, each through its
    own checkpoint's calibration map (fitted on its own validation rows), clipped to [-1, 1], then
    averaged over the folds -> (n,) float64."""
    return np.mean([apply_calibration((c.calibration or {}).get(name), r) for c, r in zip(src.ckpts, raw)], axis=0)


def assemble(sources: list[Source], raw: list[np.ndarray], routes: Routes, views: np.ndarray,
             blends: dict | None = None, studies: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values (N, P) float64 in [-1, 1], covered (N, P) bool), P = len(PATHOLOGIES). Each routed
    model's output goes through its calibration map (clipped to [-1, 1]; a K-fold model's folds each
    through their own, then averaged); then the models are averaged. A blended pathology (blends:
    name -> Blend) is instead calibration.apply_blend of its members' raw outputs (a K-fold member's:
    the mean of its folds' raw outputs, as its out-of-fold predictions that the blend was fitted on
    are raw; NaN where a member does not serve the image's view; the blend has its own calibration),
    fused over studies (N,)."""
    blends = blends or {}
    values = np.full((len(views), len(PATHOLOGIES)), np.nan)
    for j, name in enumerate(PATHOLOGIES):
        if name in blends:
            P = np.stack([np.where((sources[s].view == "all") | (views == sources[s].view), raw[s][:, :, k].mean(0),
                                   np.nan) for s, k in blends[name].members], axis=1)
            values[:, j] = apply_blend(blends[name].params, P, studies, views)
            continue
        for view, chosen in routes[name].items():
            rows = views == view
            if chosen and rows.any():
                values[rows, j] = np.mean([calibrated(sources[s], name, raw[s][:, rows, k]) for s, k in chosen], axis=0)
    return values, ~np.isnan(values)


# ---------------------------------------------------------------------------------------------
# The checked CSV

def read_submission(path: Path) -> pd.DataFrame:
    """A written submission CSV, its Ids read exactly (parse_ids, never through a float)."""
    df = pd.read_csv(path, converters={"Id": str})
    df["Id"] = parse_ids(df["Id"], str(path))
    return df


def check_submission(path: Path, ids) -> None:
    """The CSV at path is a valid submission for these test Ids: exact header, every Id once and no
    other (any order; Ids as parse_ids reads them), every value finite and in [-1, 1]. Raises
    UserError saying what is wrong, and where."""
    with open(path) as f:
        header = f.readline().rstrip("\r\n")
    if header != HEADER:
        raise UserError(f"{path}: header is {header!r}, expected {HEADER!r}")
    df = read_submission(path)
    got, want = set(df["Id"].tolist()), set(int(i) for i in ids)  # Python ints: compared exactly
    extra, missing = got - want, want - got
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

def fuse_and_fill(values: np.ndarray, covered: np.ndarray, studies: np.ndarray, blends: dict, study_fusion: bool,
                  fill_missing: float | None) -> tuple[np.ndarray, np.ndarray]:
    """--study-fusion over the pathologies no blend fuses itself, then --fill-missing where no
    checkpoint gave a value (check_coverage has already refused a gap without it: never write NaN)."""
    if study_fusion:
        plain = [j for j, n in enumerate(PATHOLOGIES) if n not in blends]
        values[:, plain] = fuse_studies(values[:, plain], studies)
        covered = ~np.isnan(values)
        if blends:
            print(f"--study-fusion: not applied to {', '.join(blends)}: the blend fuses their studies itself")
    if (~covered).any():
        if fill_missing is None:
            raise UserError("some test images are covered by no checkpoint; pass --fill-missing VALUE")
        values = np.where(covered, values, fill_missing)
    return values, covered


def checkpoints_used(sources: list, need: np.ndarray, checkpoints: Path) -> list[dict]:
    """The manifest's list: every best.pt that predicted at least one image, with its pathologies and fold."""
    return [{"path": str(checkpoints / src.folder / (f"fold{c.split.get('fold')}" if src.kfold else "") / "best.pt"),
             "pathology": ", ".join(c.pathologies), "fold": c.split.get("fold")}
            for s, src in enumerate(sources) if need[s].any() for c in src.ckpts]


def main(argv=None) -> dict:
    """Returns {"out", "submission" (DataFrame), "rows" (summary table), "n_images", "seconds"}; with
    --labels also "metrics" (evaluation.evaluate's dict, as in metrics.json) and "plots" (PNG paths)."""
    args = parse_args(argv)
    t0 = time.time()
    paths = find_checkpoints(args.checkpoints)
    guard_outputs(args, paths)
    warn_unfinished(paths)
    root, csv_path, test, targets, from_labels = read_inputs(args)
    if len(test) == 0:
        raise UserError(f"{csv_path}: no test rows")
    rt = setup_runtime(args, distributed=False)
    sources = load_sources(paths, args.checkpoints, rt)
    blends = load_blend(args.blend, sources, args.checkpoints) if args.blend is not None else {}
    routes = route(sources, args.combine, args.ensemble, blends)
    # pathologies whose values are shared within a study: the blend's own fusion, else --study-fusion
    fused = {n for n in PATHOLOGIES
             if (blends[n].params.get("w_frontal") is not None if n in blends else args.study_fusion)}
    check_coverage(routes, sources, test, args.fill_missing, fused, args.checkpoints)
    need = rows_needed(routes, len(sources), test["view"].to_numpy())

    # decode every image once per preprocessing key; a missing or unreadable test image is an error
    # (a labelled CSV's is dropped with a warning, as in training)
    t_decode = time.time()
    test, caches, slots = decode_images(test, {src.preprocess_key for s, src in enumerate(sources) if need[s].any()},
                                        root, csv_path.stem, args, on_bad="drop" if from_labels else "error")
    if len(test) == 0:
        raise UserError(f"{csv_path}: no readable images")
    views, studies = test["view"].to_numpy(), test["study"].to_numpy()
    need = rows_needed(routes, len(sources), views)
    t_predict = time.time()
    raw = predict_sources(sources, caches, slots, need, args.batch_size, rt, args.tta)
    t_done = time.time()

    values, covered = assemble(sources, raw, routes, views, blends, studies)
    values, covered = fuse_and_fill(values, covered, studies, blends, args.study_fusion, args.fill_missing)
    submission = pd.DataFrame(np.clip(values, -1.0, 1.0), columns=PATHOLOGIES)
    submission.insert(0, "Id", test["Id"].to_numpy())
    write_submission(args.out, submission, test["Id"])
    submission_manifest(args.out, checkpoints_used(sources, need, args.checkpoints), test_csv=str(csv_path),
                        device=str(rt.device))

    rows = summary_rows(sources, routes, values, covered, views, args.fill_missing)
    n_run = sum(int(need[s].sum()) * len(src.models) for s, src in enumerate(sources))
    print("\n" + format_table(rows, TABLE_COLUMNS))
    for name, b in blends.items():
        print(f"{name}: blend of " + ", ".join(f"{sources[s].folder} {w:.3f}"
                                              for (s, _), w in zip(b.members, b.params["weights"]))
              + f"; a {b.params['a']:.3f}, b {b.params['b']:+.3f}, w_frontal {b.params.get('w_frontal')}")
    print(f"\nwrote {args.out}: {len(submission)} rows from {csv_path} ({int((views == 'frontal').sum())} frontal, "
          f"{int((views == 'lateral').sum())} lateral), checked; {sum(len(s.ckpts) for s in sources)} checkpoint(s), "
          f"{n_run} model-image predictions in {t_done - t_predict:.1f}s on {rt.device}"
          + (f" ({n_run / (t_done - t_predict):.0f}/s)" if t_done > t_predict else "")
          + f", cache {t_predict - t_decode:.1f}s, total {time.time() - t0:.1f}s")
    result = {"out": args.out, "submission": submission, "rows": rows, "n_images": len(test),
              "seconds": {"decode": t_predict - t_decode, "predict": t_done - t_predict, "total": time.time() - t0}}
    if targets is not None:
        metrics, pngs = score(args.out, test, targets, training_means(sources, routes), args.plots)
        print(f"\nscored against {args.labels} (95% intervals: patient-grouped bootstrap; const_mse: the training mean):")
        print(format_table(metrics_rows(metrics), METRIC_COLUMNS))
        print(f"wrote {args.out.with_name('metrics.json')} and metrics.csv"
              + (f", {len(pngs)} plots in {args.plots}" if args.plots is not None else ""))
        result.update(metrics=metrics, plots=pngs)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
