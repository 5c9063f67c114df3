"""Learn per pathology how to combine trained models, checked out of fold, from their validation predictions.

    python experiments/blend.py --runs runs/a runs/b --out blend.json
    python make_submission.py --checkpoints runs --blend blend.json

Each --runs DIR is a train.py --out-dir: one folder per model (<slug>/) holding summary.json and
val_predictions.csv (long format: path, patient, study, view, pathology, target, raw, calibrated).
A member is a model folder that predicts the pathology, named by its path relative to the folder
that holds the runs (`a/cardiomegaly`), so make_submission.py --checkpoints PARENT finds
PARENT/a/cardiomegaly/best.pt. All single-split members must share one validation split
(summary.json's split.val_patients_sha1); one that does not is an error naming the runs.

A K-fold model (train.py --folds K: <slug>/fold<I>/ folders and <slug>/oof_predictions.csv) is one
member too, named the same way (`a/cardiomegaly`); its predictions are oof_predictions.csv, every
training row predicted by the fold model that did not train on it, so the blend is fitted on all of
them (make_submission.py predicts it with the mean of its K folds' raw outputs). Its folds must all
have finished (an error names those that have not), and K-fold members must share one set of folds
(split.folds_sha1: same --split-seed, --folds and data), or the run stops naming them. K-fold and
single-split members together are blended on the rows they share: the single-split members'
validation patients (a printed line says so and how many rows that keeps).

Per pathology, on the union of the members' validation images (a one-view member only predicts its
view's images: it is left out of the average for the others, and the member weights are fitted on
the images every member predicts), calibration.fit_blend fits, on the members' raw outputs (their own
calibration maps were fitted on these very rows), non-negative weights summing to 1 with a
shrinkage toward uniform, a frontal/lateral study-fusion weight and an affine calibration, all
chosen by patient-grouped K-fold CV. It prints the out-of-fold MSE of the best single member, the
uniform average and the learned blend, per pathology and macro, each with its own calibration
refitted without the fold it predicts, and writes blend.json:
    {"version": 2, "folds": K, "seed": N, "fingerprints": {member: {...}},
     "pathologies": {name: {"members": [...], "weights": [...],
     "lambda": f, "a": f, "b": f, "w_frontal": f or null, "fallback": bool, "reason": str or null,
     "oof": {"best_single": f, "uniform": f, "blend": f, "n": int}}}}
A pathology with too few labelled validation images (--min-rows, or under 2 patients per fold) falls
back to the uniform average (fallback true, reason says why). Each member's fingerprint (blendfile.py:
its best.pt's epoch and validation loss, the SHA-256 of its predictions) lets make_submission.py
refuse a member retrained since. A model folder with best.pt but no summary.json (a run still
training, or stopped before its end) is left out, named in a warning. --out is checked before any
work: never a member's file, never under a data root the members' summary.json records.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # `python experiments/blend.py` from anywhere: find the repo's modules
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from tqdm import tqdm

from blendfile import BLEND_VERSION, checkpoint_record, fingerprint, predictions_file
from calibration import fit_blend
from common import DEMO_ROOT, Parser, UserError, check_outputs, format_table, jsonable, run_cli, write_text
import config
from dataset import ALL_LABELS
from runs import FOLD_NAME, fold_folder, fold_indices, kfold_split, read_oof, read_predictions, read_summary

TABLE_COLUMNS = ["pathology", "members", "n", "best_single", "uniform", "blend", "w_frontal", "note"]


@dataclass
class Member:
    name: str  # the model folder relative to the runs' parent, posix: 'run_a/cardiomegaly'
    run: str  # the run folder relative to the same parent: 'run_a'
    folder: Path
    split: dict  # summary.json's split record (a K-fold model's: its finished folds' common one)
    data_root: Path | None  # the data root its summary.json records (the demo's when none was given)

    @property
    def kfold(self) -> bool:
        """A K-fold model (folder/fold<I>/): its predictions are oof_predictions.csv, every training row."""
        return bool(fold_indices(self.folder))

    @property
    def model_folders(self) -> list[Path]:
        """The folders holding its best.pt and summary.json: folder, or a K-fold model's K fold<I>/."""
        return [fold_folder(self.folder, i) for i in range(int(self.split["folds"]))] if self.kfold else [self.folder]

    def inputs(self) -> list[Path]:
        """Every file of it that blend.py reads: its predictions, summary.json and best.pt files."""
        return [predictions_file(self.folder, self.kfold)] + [f / name for f in self.model_folders
                                                             for name in ("summary.json", "best.pt")]

    def predictions(self) -> pd.DataFrame:
        """val_predictions.csv, or a K-fold model's oof_predictions.csv (runs.read_oof: an error names
        the folds not finished)."""
        return read_oof(self.folder) if self.kfold else read_predictions(self.folder / "val_predictions.csv")

    def fingerprint(self) -> dict:
        """blendfile.fingerprint: each best.pt's epoch and validation loss (read from the checkpoint,
        whose validation predictions these are; from summary.json where best.pt was not kept, as
        when only the CSVs were copied to blend), and the SHA-256 of its predictions file."""
        from model import Checkpoint  # torch: only when a blend is written
        models = []
        for f in self.model_folders:
            if (f / "best.pt").is_file():
                models.append(checkpoint_record(Checkpoint.load(f / "best.pt")))
            else:  # neither: an unfinished fold, which reading the predictions then names
                summary = read_summary(f / "summary.json") if (f / "summary.json").is_file() else {}
                models.append((summary.get("best_epoch"), summary.get("val_loss")))
        return fingerprint(models, predictions_file(self.folder, self.kfold))


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--runs", type=Path, nargs="+", required=True, metavar="DIR",
                   help="train.py output folders, each holding one folder per model")
    p.add_argument("--out", type=Path, required=True, help="the blend file to write (JSON)")
    p.add_argument("--folds", type=int, default=5, metavar="K", help="patient-grouped CV folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--min-rows", type=int, default=50, metavar="N",
                   help="fewer labelled validation images than this: uniform average (default 50)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    config.add_config_flag(p)
    args = config.parse_args(p, argv)
    if args.folds < 2:
        p.error(f"--folds must be at least 2, got {args.folds}")
    if args.min_rows < 1:
        p.error(f"--min-rows must be at least 1, got {args.min_rows}")
    if args.seed < 0:  # numpy's generators take no negative seed
        p.error(f"--seed must be >= 0, got {args.seed}")
    return args


def is_unfinished(d: Path) -> bool:
    """A model folder with best.pt but no summary.json: a run still training, or stopped before its end."""
    return (d / "best.pt").is_file() and not (d / "summary.json").is_file() and not fold_indices(d)


def recorded_root(summary: dict) -> Path | None:
    """The data root a summary.json's configuration records (the demo's folder when none was
    given); None for a summary without a configuration."""
    settings = summary.get("config")
    if not isinstance(settings, dict):
        return None
    return Path(settings["data_root"]) if settings.get("data_root") else DEMO_ROOT


def find_members(runs: list[Path]) -> list[Member]:
    """Every model folder of the runs: a single model (summary.json + val_predictions.csv) or a K-fold
    model (fold<I>/ folders, one member); a run folder that is itself a model folder counts as one.
    Names are relative to the runs' common parent. Unfinished model folders (is_unfinished) are left
    out, named in one warning."""
    runs = [Path(r).resolve() for r in runs]
    for r in runs:
        if not r.is_dir():
            raise UserError(f"--runs {r}: no such folder")
    parent = Path(os.path.commonpath([r.parent for r in runs]))

    def is_model(d: Path) -> bool:
        return (d / "summary.json").is_file() or bool(fold_indices(d))
    members, unfinished = [], []
    for r in runs:
        if FOLD_NAME.fullmatch(r.name) and (r / "summary.json").is_file():
            raise UserError(f"--runs {r}: one fold of a K-fold model; give its parent {r.parent}, whose "
                            f"out-of-fold predictions cover every training row")
        subfolders = [] if is_model(r) or is_unfinished(r) else sorted(d for d in r.iterdir() if d.is_dir())
        folders = [r] if is_model(r) else [d for d in subfolders if is_model(d)]
        waiting = [d for d in [r, *subfolders] if is_unfinished(d)]
        unfinished += waiting
        found = []
        for d in folders:
            if fold_indices(d):
                split = kfold_split(d)
                summary = read_summary(next(f for f in (fold_folder(d, i) for i in fold_indices(d))
                                            if (f / "summary.json").is_file()) / "summary.json")
            elif not (d / "val_predictions.csv").is_file():
                warnings.warn(f"{d} has no val_predictions.csv (trained before train.py wrote it?): left out")
                continue
            else:
                summary = read_summary(d / "summary.json")
                split = summary.get("split") or {}
            found.append(Member(d.relative_to(parent).as_posix(), r.relative_to(parent).as_posix(), d, split,
                                recorded_root(summary)))
        if not found:
            raise UserError(f"--runs {r}: no model folder in it (summary.json and val_predictions.csv, or the "
                            f"fold<I>/ folders of a K-fold model)"
                            + (f"; {waiting[0]} has best.pt but no summary.json: finish its training first"
                               if waiting else ""))
        members += found
    if unfinished:
        warnings.warn(f"{len(unfinished)} model folder(s) with best.pt but no summary.json (a run still training or "
                      f"stopped before its end) left out of the blend: {', '.join(map(str, unfinished))}; finish them "
                      f"(train.py ... --resume) and rerun experiments/blend.py (until then make_submission.py --blend "
                      f"uses such a best.pt alone for a pathology no member predicts)")
    names = [m.name for m in members]
    if len(set(names)) < len(names):
        raise UserError(f"a model folder is given twice: {sorted({n for n in names if names.count(n) > 1})}")
    return members


def check_split(members: list[Member]) -> None:
    """The K-fold members share one set of folds (split.folds_sha1), the single-split members one
    validation split (split.val_patients_sha1); a UserError naming the runs when they do not."""
    def runs_of(ms):
        return ", ".join(dict.fromkeys(m.run for m in ms))

    def groups(ms, key):
        by: dict[str, list[Member]] = {}
        for m in ms:
            sha = m.split.get(key)
            if not sha:
                raise UserError(f"{m.folder}: its summary.json records no split (split.{key}): retrain it with the "
                                f"current train.py")
            by.setdefault(sha, []).append(m)
        return by
    kfold = groups([m for m in members if m.kfold], "folds_sha1")
    if len(kfold) > 1:
        raise UserError("the K-fold runs do not share one set of folds: " + " vs ".join(
            f"{runs_of(ms)} (split seed {ms[0].split.get('seed')}, {ms[0].split.get('folds')} folds, folds {sha[:8]})"
            for sha, ms in kfold.items()) + "; blend K-fold runs trained with the same --split-seed, --folds and data")
    single = groups([m for m in members if not m.kfold], "val_patients_sha1")
    if len(single) > 1:
        def describe(sha, ms):
            split = ms[0].split
            return f"{runs_of(ms)} (seed {split.get('seed')}, val_frac {split.get('val_frac')}, patients {sha[:8]})"
        raise UserError("the runs do not share one validation split: "
                        + " vs ".join(describe(sha, ms) for sha, ms in single.items())
                        + "; blend runs trained with the same --seed and --val-frac")


def shared_rows(members: list[Member], tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """K-fold and single-split members together: the K-fold members' out-of-fold predictions kept on
    the single-split members' validation patients only, the rows every member was validated on
    (elsewhere the single-split members have no prediction that their training did not see). Says
    so in one line; tables unchanged when the members are all of one kind."""
    kfold = [m for m in members if m.kfold]
    single = [m for m in members if not m.kfold]
    if not kfold or not single:
        return tables
    patients = set().union(*(tables[m.name]["patient"] for m in single))
    out = {m.name: tables[m.name][tables[m.name]["patient"].isin(patients)] if m.kfold else tables[m.name]
           for m in members}
    first = kfold[0].name
    print(f"K-fold and single-split members together: the blend is fitted on the {len(patients)} validation "
          f"patients of {', '.join(dict.fromkeys(m.run for m in single))} only, where every member was validated "
          f"({out[first]['path'].nunique()} of the {tables[first]['path'].nunique()} images of the out-of-fold "
          f"predictions); to fit on every training row, train every run with --folds")
    return out


def pathology_frame(name: str, members: list[Member], tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per validation image any member predicts for this pathology: path, patient, study,
    view, target, and one column per member (its raw prediction, NaN where it has none: its own
    calibration map was fitted on these rows, so the blend calibrates in-fold instead).
    Members disagreeing on a label (other CSVs or label conventions?) is an error."""
    out = None
    for m in members:
        df = tables[m.name]
        df = df[df["pathology"] == name].set_index("path")
        cols = df[["patient", "study", "view", "target"]]
        if out is None:
            out = cols.copy()
        else:
            both = out["target"].reindex(df.index).notna() & df["target"].notna()
            clash = both & (out["target"].reindex(df.index) != df["target"])
            if clash.any():
                raise UserError(f"{name}: {m.name} has other labels than {members[0].name} for {int(clash.sum())} "
                                f"images (e.g. {clash[clash].index[0]}): trained on other CSVs or --label-convention?")
            out = out.combine_first(cols)
        out[m.name] = df["raw"]
    out = out.reindex(columns=["patient", "study", "view", "target", *[m.name for m in members]])
    return out.rename_axis("path").reset_index()


def blend_pathology(name: str, members: list[Member], tables: dict, args) -> dict:
    """blend.json's entry for one pathology."""
    df = pathology_frame(name, members, tables)
    names = [m.name for m in members]
    fit = fit_blend(df[names].to_numpy(np.float64), df["target"].to_numpy(np.float64), df["patient"].to_numpy(),
                    df["study"].to_numpy(), df["view"].to_numpy(), k=args.folds, seed=args.seed,
                    min_rows=args.min_rows)
    return {"members": names, **fit}


def pathology_order(names) -> list[str]:
    known = {n: i for i, n in enumerate(ALL_LABELS)}
    return sorted(names, key=lambda n: (known.get(n, len(known)), n))


def table_rows(blend: dict) -> list[dict]:
    rows = []
    for name, e in blend["pathologies"].items():
        rows.append({"pathology": name, "members": len(e["members"]), "n": e["oof"]["n"],
                     **{k: e["oof"][k] for k in ("best_single", "uniform", "blend")},
                     "w_frontal": "-" if e["fallback"] else "none" if e["w_frontal"] is None else e["w_frontal"],
                     "note": f"uniform: {e['reason']}" if e["fallback"] else ""})
    def mean(k):
        v = [r[k] for r in rows if r[k] is not None and np.isfinite(r[k])]
        return float(np.mean(v)) if v else float("nan")
    rows.append({"pathology": "macro", "n": sum(r["n"] for r in rows),
                 **{k: mean(k) for k in ("best_single", "uniform", "blend")}})
    return rows


def weights_line(name: str, e: dict) -> str:
    parts = ", ".join(f"{m} {w:.3f}" for m, w in zip(e["members"], e["weights"]))
    if e["fallback"]:
        return f"{name}: {parts} (uniform)"
    fusion = "none" if e["w_frontal"] is None else f"{e['w_frontal']:.1f}"
    return f"{name}: {parts} (lambda {e['lambda']:g}, a {e['a']:.3f}, b {e['b']:+.3f}, w_frontal {fusion})"


def guard_out(out: Path, members: list[Member]) -> None:
    """common.check_outputs for --out, before any work: not a file of a member (its predictions,
    summary.json, best.pt), not under a data root the members record, writable."""
    inputs = {f"--runs ({m.name}/{f.relative_to(m.folder).as_posix()})": f for m in members for f in m.inputs()}
    for root in sorted({m.data_root for m in members if m.data_root is not None}) or [None]:
        check_outputs(files={"--out": out}, inputs=inputs, data_root=root)


def main(argv=None) -> dict:
    args = parse_args(argv)
    members = find_members(args.runs)
    check_split(members)
    guard_out(args.out, members)
    # before the files are read: one rewritten meanwhile is then refused by make_submission, never trusted
    fingerprints = {m.name: m.fingerprint() for m in members}
    tables = shared_rows(members, {m.name: m.predictions() for m in members})
    names = pathology_order({p for df in tables.values() for p in df["pathology"].unique()})
    blend = {"version": BLEND_VERSION, "folds": args.folds, "seed": args.seed, "fingerprints": fingerprints,
             "pathologies": {}}
    for name in tqdm(names, desc="blending", disable=not args.progress, leave=False, dynamic_ncols=True):
        have = [m for m in members if (tables[m.name]["pathology"] == name).any()]
        blend["pathologies"][name] = blend_pathology(name, have, tables, args)
    blend = jsonable(blend)
    write_text(args.out, json.dumps(blend, indent=2, allow_nan=False) + "\n")
    print("out-of-fold MSE per pathology (best single member, uniform average, learned blend):")
    print(format_table(table_rows(blend), TABLE_COLUMNS))
    for name, e in blend["pathologies"].items():
        print(weights_line(name, e))
    print(f"wrote {args.out}")
    return blend


if __name__ == "__main__":
    sys.exit(run_cli(main))
