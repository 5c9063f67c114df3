"""Each training lever against the baseline recipe, paired on the same held-out test patients.

    python benchmarks/compare_levers.py --data-root ../shared/data/nih_dev --work /tmp/levers \\
        --seeds 0 1 2 --levers baseline clahe hist inside combo -- --arch resnet18 --workers 1

The baseline is benchmarks/compare_folds.py's `kfold5` (--multi-head over every labelled finding,
--folds 5 --fold all, --weights none, the fold models' calibrated outputs averaged by
make_submission.py); each lever adds its flags (LEVERS) to it. For every lever and seed: the test
macro MSE and AUC from the CSV make_submission.py wrote, the CPU and wall time of its training, and
the paired difference against the baseline of the same seed (the same resamples of the test
patients for both: compare_folds.paired_difference). The table gives each lever's mean over the
seeds with the range, and the mean paired difference with the range of the seeds' differences and
the seed-0 interval. Runs already trained under WORK are reused (train.py --resume returns a
finished run at once); WORK/levers.json keeps every number.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_folds import (measurement_parser, paired_difference, parse_with_extra, test_score,  # noqa: E402
                           train_run)
from common import format_table, jsonable, run_cli, write_text  # noqa: E402
from dataset import PATHOLOGIES, read_train_csv  # noqa: E402

LEVERS = {
    "baseline": [],
    "clahe": ["--equalize", "clahe"],
    "hist": ["--equalize", "hist"],
    # --patience counts validations: 12 at 4 a epoch is the baseline's 3 epochs
    "inside": ["--val-per-epoch", "4", "--keep-top", "3", "--average-top", "3", "--patience", "12"],
    "blank-negative": ["--blank", "negative"],
    "lsr-ones": ["--uncertain", "lsr-ones"],
    "three-class": ["--uncertain", "three-class"],
    "combo": ["--equalize", "clahe", "--val-per-epoch", "4", "--keep-top", "3", "--average-top", "3", "--patience", "12"],
}
# --lever NAME=FLAGS adds or replaces one, e.g. --lever "mine=--equalize hist --val-per-epoch 2"
COLUMNS = ["lever", "seeds", "test_mse", "mse_range", "test_auc", "auc_range", "d_mse", "d_mse_seeds", "d_mse_ci0",
           "d_auc", "d_auc_seeds", "d_auc_ci0", "cpu_min", "wall_min"]


def parse_args(argv):
    p = measurement_parser(__doc__.split("\n\n")[0], 6, "folds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--levers", nargs="+", default=["baseline", "clahe", "hist", "inside", "combo"])
    p.add_argument("--lever", action="append", default=[], metavar="NAME=FLAGS",
                   help="define a lever (or redefine one of LEVERS) by its train.py flags")
    args = parse_with_extra(p, argv)
    for spec in args.lever:
        name, _, flags = spec.partition("=")
        LEVERS[name] = flags.split()
    if args.levers[0] != "baseline":
        args.levers.insert(0, "baseline")
    unknown = [x for x in args.levers if x not in LEVERS]
    if unknown:
        p.error(f"unknown lever(s) {', '.join(unknown)}: one of {', '.join(LEVERS)}, or define it with --lever")
    return args


def run_lever(args, lever: str, seed: int) -> dict:
    """Train (or reuse) one lever's K-fold run at one seed, submit on the test set, score it."""
    name = f"{lever}_s{seed}"
    t0, c0 = time.time(), time.process_time()
    run = train_run(args, f"{lever}/s{seed}", "--seed", str(seed), "--folds", str(args.k), "--fold", "all",
                    *LEVERS[lever])
    times = {"cpu_min": (time.process_time() - c0) / 60, "wall_min": (time.time() - t0) / 60}
    timing = args.work / "runs" / lever / f"s{seed}" / "timing.json"
    if timing.is_file():  # trained by an earlier call: its own times
        times = json.loads(timing.read_text())
    else:
        write_text(timing, json.dumps(times))
    return {"lever": lever, "seed": seed, **test_score(args, name, run), **times}


def summarise(args, runs: list[dict]) -> list[dict]:
    rows = []
    for lever in args.levers:
        mine = [r for r in runs if r["lever"] == lever]
        row = {"lever": lever, "seeds": len(mine)}
        for key in ("test_mse", "test_auc"):
            v = [r[key] for r in mine]
            row[key], row[key.replace("test_", "") + "_range"] = float(np.mean(v)), f"{min(v):.3f}-{max(v):.3f}"
        if lever != "baseline":
            for key in ("mse", "auc"):
                d = [r[f"d_{key}"] for r in mine]
                row[f"d_{key}"], row[f"d_{key}_seeds"] = float(np.mean(d)), f"{min(d):+.3f} to {max(d):+.3f}"
                row[f"d_{key}_ci0"] = next((r[f"d_{key}_ci"] for r in mine if r["seed"] == args.seeds[0]), "")
        row["cpu_min"] = float(np.mean([r["cpu_min"] for r in mine]))
        row["wall_min"] = float(np.mean([r["wall_min"] for r in mine]))
        rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.work.mkdir(parents=True, exist_ok=True)
    table = read_train_csv(args.data_root / "student_labels" / "train2023.csv")
    args.names = [n for n in PATHOLOGIES if n in table.columns and table[n].notna().any()]
    runs = []
    for lever in args.levers:
        for seed in args.seeds:
            r = run_lever(args, lever, seed)
            if lever != "baseline":
                d = paired_difference(args, f"{lever}_s{seed}", f"baseline_s{seed}")
                r.update(d_mse=d["mse_diff"], d_mse_ci=d["mse_diff_ci"], d_auc=d["auc_diff"], d_auc_ci=d["auc_diff_ci"])
            runs.append(r)
            print(f"{lever} seed {seed}: test MSE {r['test_mse']:.4f}, AUC {r['test_auc']:.4f}, "
                  f"{r['cpu_min']:.1f} CPU min, {r['wall_min']:.1f} min", flush=True)
            write_text(args.work / "levers.json", json.dumps(jsonable({"runs": runs}), indent=2))  # so far
    rows = summarise(args, runs)
    write_text(args.work / "levers.json", json.dumps(jsonable({"runs": runs, "levers": rows,
                                                               "flags": {k: LEVERS[k] for k in args.levers}}), indent=2))
    print(f"\n{args.data_root}: {', '.join(args.names)}; multi-head, {args.k} folds, {args.image_size} px, "
          f"{args.epochs} epochs, --weights none, seeds {args.seeds}, extra {args.extra}\n" + format_table(rows, COLUMNS))
    print("d_*: the lever minus the baseline of the same seed, on the same test patients (mean over the seeds, their "
          "range, and seed " f"{args.seeds[0]}'s patient-grouped 95% interval)")
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
