"""Learn per pathology how to combine trained models, checked out of fold, from their validation predictions.

    python experiments/blend.py --runs runs/a runs/b --out blend.json
    python make_submission.py --checkpoints runs --blend blend.json

Each --runs DIR is a train.py --out-dir: one folder per model (<slug>/) holding summary.json and
val_predictions.csv (long format: path, patient, study, view, pathology, target, raw, calibrated).
A member is a model folder that predicts the pathology, named by its path relative to the folder
that holds the runs (`a/cardiomegaly`), so make_submission.py --checkpoints PARENT finds
PARENT/a/cardiomegaly/best.pt. All members must share one validation split (summary.json's
split.val_patients_sha1); one that does not is an error naming the runs.

Per pathology, on the union of the members' validation images (a one-view member only predicts its
view's images: it is left out of the average for the others, and the member weights are fitted on
the images every member predicts), evaluation.fit_blend fits, on the members' raw outputs (their own
calibration maps were fitted on these very rows), non-negative weights summing to 1 with a
shrinkage toward uniform, a frontal/lateral study-fusion weight and an affine calibration, all
chosen by patient-grouped K-fold CV. It prints the out-of-fold MSE of the best single member, the
uniform average and the learned blend, per pathology and macro, each with its own calibration
refitted without the fold it predicts, and writes blend.json:
    {"version": 1, "folds": K, "seed": N, "pathologies": {name: {"members": [...], "weights": [...],
     "lambda": f, "a": f, "b": f, "w_frontal": f or null, "fallback": bool, "reason": str or null,
     "oof": {"best_single": f, "uniform": f, "blend": f, "n": int}}}}
A pathology with too few labelled validation images (--min-rows, or under 2 patients per fold) falls
back to the uniform average (fallback true, reason says why).
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

from common import UserError, format_table, run_cli, write_text
from dataset import ALL_LABELS, VIEWS
from calibration import fit_blend
from common import jsonable
from evaluation import PREDICTION_COLUMNS

TABLE_COLUMNS = ["pathology", "members", "n", "best_single", "uniform", "blend", "w_frontal", "note"]


@dataclass
class Member:
    name: str  # the model folder relative to the runs' parent, posix: 'run_a/cardiomegaly'
    run: str  # the run folder relative to the same parent: 'run_a'
    folder: Path
    summary: dict


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--runs", type=Path, nargs="+", required=True, metavar="DIR",
                   help="train.py output folders, each holding one folder per model")
    p.add_argument("--out", type=Path, required=True, help="the blend file to write (JSON)")
    p.add_argument("--folds", type=int, default=5, metavar="K", help="patient-grouped CV folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--min-rows", type=int, default=50, metavar="N",
                   help="fewer labelled validation images than this: uniform average (default 50)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    args = p.parse_args(argv)
    if args.folds < 2:
        p.error(f"--folds must be at least 2, got {args.folds}")
    if args.min_rows < 1:
        p.error(f"--min-rows must be at least 1, got {args.min_rows}")
    return args


def find_members(runs: list[Path]) -> list[Member]:
    """Every model folder (summary.json + val_predictions.csv) of the runs; a run folder that is
    itself a model folder counts as one. Names are relative to the runs' common parent."""
    runs = [Path(r).resolve() for r in runs]
    for r in runs:
        if not r.is_dir():
            raise UserError(f"--runs {r}: no such folder")
    parent = Path(os.path.commonpath([r.parent for r in runs]))
    members = []
    for r in runs:
        folders = [r] if (r / "summary.json").is_file() else sorted(d for d in r.iterdir() if (d / "summary.json").is_file())
        found = []
        for d in folders:
            if not (d / "val_predictions.csv").is_file():
                warnings.warn(f"{d} has no val_predictions.csv (trained before train.py wrote it?): left out")
                continue
            found.append(Member(d.relative_to(parent).as_posix(), r.relative_to(parent).as_posix(), d,
                                read_summary(d / "summary.json")))
        if not found:
            raise UserError(f"--runs {r}: no model folder with summary.json and val_predictions.csv in it")
        members += found
    names = [m.name for m in members]
    if len(set(names)) < len(names):
        raise UserError(f"a model folder is given twice: {sorted({n for n in names if names.count(n) > 1})}")
    return members


def read_summary(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable summary.json ({e})") from e


def check_split(members: list[Member]) -> str:
    """The validation-patients hash every member shares; a UserError naming the runs when they differ."""
    by_hash: dict[str, list[Member]] = {}
    for m in members:
        sha = (m.summary.get("split") or {}).get("val_patients_sha1")
        if not sha:
            raise UserError(f"{m.folder}/summary.json records no validation split (split.val_patients_sha1): "
                            f"retrain it with the current train.py")
        by_hash.setdefault(sha, []).append(m)
    if len(by_hash) > 1:
        def describe(sha, ms):
            split = ms[0].summary["split"]
            runs = ", ".join(dict.fromkeys(m.run for m in ms))
            return f"{runs} (seed {split.get('seed')}, val_frac {split.get('val_frac')}, patients {sha[:8]})"
        raise UserError("the runs do not share one validation split: "
                        + " vs ".join(describe(sha, ms) for sha, ms in by_hash.items())
                        + "; blend runs trained with the same --seed and --val-frac")
    return next(iter(by_hash))


def read_predictions(member: Member) -> pd.DataFrame:
    """A member's val_predictions.csv, checked: the columns, known views, one row per (path, pathology)."""
    path = member.folder / "val_predictions.csv"
    try:
        df = pd.read_csv(path, dtype={c: str for c in PREDICTION_COLUMNS[:5]})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable CSV ({str(e).splitlines()[0]})") from e
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    df["view"] = df["view"].str.lower()
    bad = df[~df["view"].isin(VIEWS)]
    if len(bad):
        raise UserError(f"{path}: view must be frontal or lateral, got {bad['view'].iloc[0]!r} (path {bad['path'].iloc[0]})")
    for c in ("target", "raw", "calibrated"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    if df["raw"].isna().any():
        raise UserError(f"{path}: {int(df['raw'].isna().sum())} rows have no raw prediction")
    dup = df.duplicated(["path", "pathology"])
    if dup.any():
        raise UserError(f"{path}: {df.loc[dup, 'path'].iloc[0]} appears twice for {df.loc[dup, 'pathology'].iloc[0]}")
    return df


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    members = find_members(args.runs)
    check_split(members)
    tables = {m.name: read_predictions(m) for m in members}
    names = pathology_order({p for df in tables.values() for p in df["pathology"].unique()})
    blend = {"version": 1, "folds": args.folds, "seed": args.seed, "pathologies": {}}
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
