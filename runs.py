"""What a training run leaves on disk, read and written in one place: a model folder's history.csv,
val_predictions.csv and summary.json, and a K-fold run's oof_predictions.csv.

    OUT_DIR/<slug>/                       one model (train.py without --folds)
        best.pt, last.pt                  model.Checkpoint files
        history.csv                       HISTORY_COLUMNS, one row per epoch
        summary.json                      sizes, the best epoch's metrics, the split, the configuration
        val_predictions.csv               PREDICTION_COLUMNS: the best epoch's validation predictions
        curves.png
    OUT_DIR/<slug>/fold<I>/               the same, for fold I of a K-fold run (train.py --folds K)
    OUT_DIR/<slug>/oof_predictions.csv    PREDICTION_COLUMNS + fold: every row of the K folds' validation
                                          sets once, each predicted by the model that did not train on it
    OUT_DIR/<slug>/oof_summary.json       per pathology n, mse, mse_ci, nmse, auc, auc_ci of calibrated_oos
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from calibration import apply_calibration, calibrate_out_of_sample
from common import UserError, jsonable, write_text
from dataset import VIEWS
from evaluation import METRIC_KEYS, plot_curves
from model import Checkpoint
from runtime import Runtime, on_main
from snapshots import top_name

if TYPE_CHECKING:  # the types of train.py's run, which these functions write out
    from jobs import Job
    from state import TrainState

# history.csv: one row per validation (per epoch unless --val-per-epoch); samples: training samples
# drawn since the row before, all ranks together; lr: the rate at that point
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_mse", "val_mse_cv", "val_mse_cal", "const_mse", "val_auc",
                   "val_nmse", "samples", "lr", "seconds", "train_seconds", "train_images_per_s"]
# what a training run writes in its model folder (an --overwrite removes them before it starts again)
RUN_FILES = ("best.pt", "last.pt", "history.csv", "summary.json", "val_predictions.csv", "curves.png", "args.yaml",
             "manifest.json")
RUN_FOLDERS = ("tb", "top")
# the final table train.py prints: a row per model (and fold), the oof rows, the macro mean
TABLE_COLUMNS = ["pathology", "view", "fold", "n_train", "n_val", "best_epoch", "val_mse", "val_mse_cv", "val_mse_cal",
                 "const_mse", "val_nmse", "val_auc"]
# val_predictions.csv: one row per validation image and pathology; target on the project's scale,
# blank = unlabelled; raw (the model's output) and calibrated predictions in [-1, 1]: calibrated by
# the map that ships (fitted on every validation row: in sample), calibrated_oos by that fit made
# without the row's patient (calibration.calibrate_out_of_sample: out of sample)
PREDICTION_COLUMNS = ["path", "patient", "study", "view", "pathology", "target", "raw", "calibrated", "calibrated_oos"]
OOF_KEYS = ("n", "mse", "mse_ci", "nmse", "auc", "auc_ci")  # oof_summary.json, per pathology



def write_history(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, HISTORY_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def write_predictions(path: Path, rows: pd.DataFrame, names: list[str], targets: np.ndarray, raw: np.ndarray,
                      calibrated: np.ndarray, calibrated_oos: np.ndarray) -> None:
    """val_predictions.csv in long format: for each pathology k of `names`, every row of `rows`
    (path, patient, study, view) with its target[:, k], raw[:, k], calibrated[:, k] and
    calibrated_oos[:, k] (all (N, K) float, NaN target = unlabelled). Floats are written in full, so a
    calibrated value can be recomputed from its raw one exactly."""
    frames = [rows[["path", "patient", "study", "view"]].assign(
        pathology=name, target=targets[:, k].astype(np.float64), raw=raw[:, k].astype(np.float64),
        calibrated=calibrated[:, k].astype(np.float64), calibrated_oos=calibrated_oos[:, k].astype(np.float64))
        for k, name in enumerate(names)]
    write_text(path, pd.concat(frames).to_csv(index=False, columns=PREDICTION_COLUMNS, lineterminator="\n"))


def read_predictions(path: Path, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """A val_predictions.csv (or oof_predictions.csv, with extra=("fold",)), checked: the columns,
    known views, a raw prediction on every row, one row per (path, pathology). A file written
    before calibrated_oos existed reads with that column empty (NaN); merge_oof fills it in."""
    try:
        df = pd.read_csv(path, dtype={c: str for c in PREDICTION_COLUMNS[:5]})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from e
    if "calibrated_oos" not in df.columns:
        df.insert(len(PREDICTION_COLUMNS) - 1, "calibrated_oos", np.nan)
    missing = [c for c in (*PREDICTION_COLUMNS, *extra) if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    df["view"] = df["view"].str.lower()
    bad = df[~df["view"].isin(VIEWS)]
    if len(bad):
        raise UserError(f"{path}: view must be frontal or lateral, got {bad['view'].iloc[0]!r} (path {bad['path'].iloc[0]})")
    for c in ("target", "raw", "calibrated", "calibrated_oos"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    if df["raw"].isna().any():
        raise UserError(f"{path}: {int(df['raw'].isna().sum())} rows have no raw prediction")
    dup = df.duplicated(["path", "pathology"])
    if dup.any():
        raise UserError(f"{path}: {df.loc[dup, 'path'].iloc[0]} appears twice for {df.loc[dup, 'pathology'].iloc[0]}")
    return df


def fill_calibrated_oos(df: pd.DataFrame, summary: dict) -> pd.DataFrame:
    """One model folder's predictions (read_predictions) with calibrated_oos computed for each
    pathology where it is missing (a file written before the column existed), as train.py computes
    it: calibration.calibrate_out_of_sample of the pathology's raw outputs, targets and patients,
    with the calibration kind (config.calibration) and training mean (per_pathology.<name>.train_mean;
    none recorded: no guard) that the folder's summary.json records. Changes df in place; returns it."""
    kind = (summary.get("config") or {}).get("calibration", "affine")
    for name, index in df.groupby("pathology").groups.items():
        if df.loc[index, "calibrated_oos"].isna().any():
            prior = ((summary.get("per_pathology") or {}).get(name) or {}).get("train_mean")
            df.loc[index, "calibrated_oos"] = calibrate_out_of_sample(
                kind, df.loc[index, "raw"].to_numpy(), df.loc[index, "target"].to_numpy(), prior,
                df.loc[index, "patient"].to_numpy())
    return df


def read_summary(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable summary.json ({e})") from e


def fold_folder(folder: Path, fold: int) -> Path:
    return Path(folder) / f"fold{fold}"


FOLD_NAME = re.compile(r"fold(\d+)")


def fold_indices(folder: Path) -> list[int]:
    """The I of every fold<I>/ subfolder of folder, sorted: [] for a single model folder (or none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for d in folder.iterdir() if d.is_dir() and (m := FOLD_NAME.fullmatch(d.name)))


def kfold_split(folder: Path) -> dict:
    """A K-fold model folder's split record, {seed, folds, folds_sha1, ...}: what its finished folds'
    summary.json share (each fold's own entries, fold and val_patients_sha1, left out). A fold is
    finished once its summary.json exists. Errors name what does not fit: no fold finished yet, or a
    finished fold with other folds (folds_sha1 or K) than the first, as merge_oof checks."""
    folder = Path(folder)
    finished = [f for f in (fold_folder(folder, i) for i in fold_indices(folder)) if (f / "summary.json").is_file()]
    if not finished:
        raise UserError(f"{folder}: a K-fold model none of whose folds has finished (no fold*/summary.json): "
                        f"finish training it (train.py --folds K --fold I --resume)")
    splits = {f: read_summary(f / "summary.json").get("split") or {} for f in finished}

    def folds(split):
        return split.get("folds"), split.get("folds_sha1")
    first = splits[finished[0]]
    for f, split in splits.items():
        if folds(split) != folds(first) or not split.get("folds_sha1"):
            raise UserError(f"{f}: its folds ({split.get('folds')} folds, hash {str(split.get('folds_sha1'))[:8]}) are "
                            f"not those of {finished[0]} ({first.get('folds')} folds, hash "
                            f"{str(first.get('folds_sha1'))[:8]}): retrain it with the same --split-seed, --folds "
                            f"and data, or delete it")
    return {k: v for k, v in first.items() if k not in ("fold", "val_patients_sha1")}


def read_oof(folder: Path) -> pd.DataFrame:
    """A finished K-fold model's oof_predictions.csv (read_predictions, with its fold column). An
    error names the folds not finished (no fold<I>/summary.json, I = 0..K-1), or, when all are,
    says how to write the missing file."""
    folder = Path(folder)
    k = int(kfold_split(folder)["folds"])
    missing = [f"fold{i}" for i in range(k) if not (fold_folder(folder, i) / "summary.json").is_file()]
    if missing:
        raise UserError(f"{folder}: {len(missing)} of its {k} folds not finished ({', '.join(missing)} have no "
                        f"summary.json), so it has no out-of-fold predictions yet: finish them (train.py --folds {k} "
                        f"--fold I --resume)")
    path = folder / "oof_predictions.csv"
    if not path.is_file():
        raise UserError(f"{path}: missing although all {k} folds have finished: run train.py for one of them "
                        f"again with --resume (a finished fold returns at once, then writes it)")
    return read_predictions(path, extra=("fold",))


def merge_oof(folder: Path, k: int, expected: pd.Series | None = None) -> pd.DataFrame | None:
    """OUT_DIR/<slug>/oof_predictions.csv from the K folds' val_predictions.csv, once all K are
    there (None, and nothing written, while one is missing). Checked: every fold records the same
    folds hash (the same patients in the same folds: same --split-seed and K, same rows), every
    (path, pathology) appears exactly once, and, given `expected` (the paths of every row the run
    trains on), every one of them is predicted. A clear error names the folder that does not fit."""
    folders = [fold_folder(folder, i) for i in range(k)]
    if not all((f / "val_predictions.csv").is_file() and (f / "summary.json").is_file() for f in folders):
        return None
    kfold_split(folder)  # every fold's summary records the same folds (K and hash), or an error names it
    df = pd.concat([fill_calibrated_oos(read_predictions(f / "val_predictions.csv"), read_summary(f / "summary.json"))
                    .assign(fold=i) for i, f in enumerate(folders)])
    dup = df.duplicated(["path", "pathology"])
    if dup.any():
        row = df[dup].iloc[0]
        raise UserError(f"{folder}: {row['path']} is predicted for {row['pathology']} by more than one fold")
    if expected is not None:
        missed = sorted(set(expected) - set(df["path"]))
        if missed:
            raise UserError(f"{folder}: {len(missed)} training rows are in no fold's validation set (e.g. {missed[0]})")
    write_text(Path(folder) / "oof_predictions.csv", df.to_csv(index=False, columns=[*PREDICTION_COLUMNS, "fold"],
                                                               lineterminator="\n"))
    return df


def check_layout(folder: Path, kfold: bool) -> None:
    """A model folder holds one single-split model or the folds of one K-fold run, never both: the
    submission and the blend would not know which one is meant."""
    if kfold and (Path(folder) / "best.pt").is_file():
        raise UserError(f"{folder} holds a single-split model; train --folds into another --out-dir")
    if not kfold and any(Path(folder).glob("fold*/best.pt")):
        raise UserError(f"{folder} holds a K-fold run; train without --folds into another --out-dir")


def oof_metrics(folder: Path, k: int, names: list[str], expected: pd.Series) -> dict | None:
    """merge_oof, then per pathology the evaluation.evaluate numbers of calibrated_oos (each row
    calibrated by a map fitted without its patient, by the fold model that did not train on it) over
    every labelled row: {name: {n, mse, mse_ci, nmse, auc, auc_ci}} (patient-grouped 95% intervals,
    200 resamples), also written as OUT_DIR/<slug>/oof_summary.json (NaN as null); None, and nothing
    written, while a fold is missing."""
    from evaluation import evaluate
    df = merge_oof(folder, k, expected)
    if df is None:
        return None
    out = {}
    for name in names:
        d = df[(df["pathology"] == name) & df["target"].notna()]
        m = evaluate(d[["calibrated_oos"]].to_numpy(), d[["target"]].to_numpy(), d["patient"].to_numpy(), [name], {},
                     n_boot=200)["per_pathology"][name]
        out[name] = {key: m[key] for key in OOF_KEYS}
    write_text(Path(folder) / "oof_summary.json", json.dumps(jsonable(out), indent=2, allow_nan=False) + "\n")
    return out


def prepare_folder(folder: Path, resume: bool, overwrite: bool, log, remove: bool = True) -> None:
    """Before any image is read: a model folder that holds another run (last.pt or best.pt) is
    carried on with --resume, started again with --overwrite (its run files removed, saying so, where
    `remove`: rank 0 only), and otherwise refused in one line naming both; --resume where there is no
    last.pt says that it starts afresh."""
    folder = Path(folder)
    last, best = (folder / "last.pt").is_file(), (folder / "best.pt").is_file()
    if resume:
        if not last and best:
            raise UserError(f"--resume: {folder} has best.pt but no last.pt to carry on from; --overwrite starts "
                            f"that run again")
        if not last:
            log(f"--resume: no {folder / 'last.pt'} yet: training {folder.name} from the start")
        return
    if not (last or best):
        return
    if not overwrite:
        raise UserError(f"{folder} holds another run ({', '.join(n for n, x in (('last.pt', last), ('best.pt', best)) if x)}):"
                        f" add --resume to carry it on, or --overwrite to start it again (its files are replaced)")
    log(f"--overwrite: removing the run in {folder} and starting again")
    if not remove:
        return
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(folder / name, ignore_errors=True)


def checkpoint_of(model, state: TrainState, job: Job, metrics: dict, calibration: dict, **values) -> Checkpoint:
    s = state.settings
    return Checkpoint.of(model, view=s.view, epoch=epoch_number(state.progress(job.epoch_len)), metrics=metrics,
                         calibration=calibration,
                         preprocess={"image_size": s.image_size, "square": s.square, "equalize": s.equalize,
                                     "mean": model.config["mean"],
                                     "std": model.config["std"],
                                     "uncertain": {n: p["uncertain"] for n, p in job.policies.items()},
                                     "blank": {n: p["blank"] for n, p in job.policies.items()},
                                     "label_convention": s.label_convention},
                         train_config=jsonable(vars(s)), split=job.split, **values)


def epoch_number(progress: float) -> int | float:
    """Epochs as history.csv and checkpoints show them: 2 at an epoch's end, 1.25 within one."""
    return int(progress) if progress == int(progress) else round(progress, 4)


def write_outputs(state: TrainState, job: Job, val: dict, improved: bool, keep: bool = False,
                  drop: list[str] = ()) -> None:
    """Rank 0's files after a validation, from the state: best.pt and val_predictions.csv when it
    improved (from this validation's weights, never a live reference), --keep-top's files (this
    validation's weights when they rank among the K best; those that fell out removed),
    history.csv, curves.png."""
    if improved:
        write_best(state, job, val, state.validated)
    if keep:
        checkpoint_of(state.validated, state, job, jsonable(state.history[-1]), val["calibration"]).save(
            job.folder / top_name(state.validations))
    for name in drop:
        (job.folder / name).unlink(missing_ok=True)
    write_history(job.folder / "history.csv", state.history)
    plot_curves(state.history, job.folder / "curves.png", f"{job.label} (view {state.settings.view})")  # about 0.2 s


def write_best(state: TrainState, job: Job, val: dict, model) -> None:
    """best.pt (these weights, with state.best's metrics and val's calibration) and val_predictions.csv."""
    checkpoint_of(model, state, job, state.best["metrics"], val["calibration"]).save(job.folder / "best.pt")
    cal = np.stack([apply_calibration(val["calibration"].get(n), val["pred"][:, k]) for k, n in enumerate(job.names)], 1)
    write_predictions(job.folder / "val_predictions.csv", job.val_rows, job.names, job.val_targets, val["pred"], cal,
                      val["calibrated_oos"])


def write_summary(state: TrainState, job: Job, data: dict, rt: Runtime) -> dict:
    """summary.json, from the state: sizes, how patients were found, the best validation's metrics
    per pathology, the split and the configuration; every rank returns it."""
    table, best = data["table"], state.best.get("metrics", {})
    summary = {"pathology": job.names[0] if len(job.names) == 1 else "multi_head", "pathologies": job.names,
               "view": state.settings.view, "folder": job.folder.name, "n_train": job.n_train,
               "n_val": len(job.val_targets), "n_sources": len(data["sources"]),
               "n_stray_rows": table.attrs.get("n_stray", 0), "n_bad_images": table.attrs.get("n_bad_images", 0),
               "patients": {"rule": table.attrs.get("patient_rule"), "n": int(table["patient"].nunique())},
               "n_duplicate_rows": table.attrs.get("n_duplicates", 0), "head_type": job.head_type,
               "best_epoch": state.best["epoch"], "epochs_run": epoch_number(state.progress(job.epoch_len)),
               "validations": state.validations, "early_stopped": state.best["stopped"],
               "best_from": (f"the average of the {state.best['averaged']['k']} best validations"
                             if state.best.get("averaged", {}).get("kept") else "the best validation"),
               "averaged": state.best.get("averaged"),
               **{k: best.get(k) for k in ("val_loss", *METRIC_KEYS)},
               "per_pathology": best.get("per_pathology", {}), "split": job.split,
               "config": jsonable(vars(state.settings))}
    for k, name in enumerate(job.names):
        summary["per_pathology"].setdefault(name, {}).update(n_train=job.n_train_of(k), **job.policies[name])
    on_main(rt, lambda: write_text(job.folder / "summary.json", json.dumps(jsonable(summary), indent=2)))
    return summary


def out_of_fold(folder: Path, job_names: list[str], table: pd.DataFrame, args, rt: Runtime) -> list[dict]:
    """Once all K folds of a model are trained: oof_predictions.csv (on rank 0) and a table row per
    pathology of the out-of-fold calibrated MSE and AUC over every row, with patient-grouped 95%
    intervals ([] until then)."""
    labelled = ~np.isnan(table[job_names].to_numpy(np.float32)).all(1)
    if args.view != "all":
        labelled &= (table["view"] == args.view).to_numpy()
    per = on_main(rt, lambda: oof_metrics(folder, args.folds, job_names, table["path"][labelled])) or {}
    return [{"pathology": name, "view": args.view, "fold": "oof", "n_val": m["n"], "val_nmse": m["nmse"],
             "val_mse_cv": with_interval(m["mse"], m["mse_ci"]), "val_auc": with_interval(m["auc"], m["auc_ci"])}
            for name, m in per.items()]


def with_interval(value, ci) -> str:
    """'0.5133 (0.480-0.547)' for the table; '-' where there is no number (no labelled row, one class only)."""
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.4f} ({ci[0]:.3f}-{ci[1]:.3f})"


def table_rows(summary: dict, fold) -> list[dict]:
    """Final-table rows: one per pathology of a job."""
    rows = []
    for name in summary["pathologies"]:
        per = summary["per_pathology"].get(name, {})
        rows.append({"pathology": name, "view": summary["view"], "fold": "-" if fold is None else fold,
                     "n_train": per.get("n_train"), "n_val": per.get("n"), "best_epoch": summary["best_epoch"],
                     **{k: per.get(k) for k in TABLE_COLUMNS[6:]}})
    return rows
