"""Grid search over head size x frozen backbone stages x learning rate, one train.py run per config.

    python experiments/gridsearch.py --pathology Cardiomegaly --out-dir runs/grid      # demo data
    python experiments/gridsearch.py --pathology "Pleural Effusion" --data-root /data/cs156b \\
        --hidden 256 512 --freeze 3 5 --lr 5e-4 1e-4 --epochs 5 --out-dir runs/grid --shard 2/4
    python experiments/gridsearch.py --config grid.yaml --shard 2/4      # grid and training flags from a file

--freeze N keeps the first N backbone stages (stem, layer1..4) frozen for the whole run while the
rest trains, as in the original project; --unfreeze-epoch E unfreezes them from epoch E (0-based)
instead. Every flag it does not know (--epochs, --image-size, --data-root, --folds, ...) goes to
train.py unchanged; so do the training keys of a --config file (the command line wins). Each
configuration (a trial) trains through train.main() into its own folder,
OUT_DIR/hidden256_freeze3_lr0.0005/<slug>/, always with --resume: a finished trial returns its
summary without training, one killed mid-way carries on from its last.pt, and one rerun with more
--epochs trains on.

A trial that fails (a bad value train.py refuses, a loss that is not finite, out of memory) is
recorded in its folder as failed.json with its one-line reason, and the shard goes on with the next
one; the script exits 2 at the end if any trial of the shard failed. A rerun skips failed trials
unless --retry-failed.

--shard I/N (1-based: I = 1..N, as SLURM's --array=1-N) trains only configurations I, I+N, I+2N, ...
of the grid, so N jobs cover it exactly once. Every run (and --collect) rebuilds OUT_DIR/results.csv
from the files on disk and replaces it atomically. It holds one row per finished or failed trial:
a single-split trial's from its summary.json, a K-fold trial's (--folds K) from its out-of-fold
oof_summary.json. Rows are ranked within their pathology and view only (two pathologies sharing an
--out-dir are two rankings), best validation loss first; the table printed is the run's own.
"""
from __future__ import annotations

import argparse
import csv
import functools
import gc
import io
import itertools
import json
import re
import sys
import time
import warnings
from pathlib import Path

if __name__ == "__main__":  # `python experiments/gridsearch.py` from anywhere: find the repo's modules
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

import config
from common import Parser, UserError, check_outputs, format_table, run_cli, write_text
from dataset import ALL_LABELS, check_pathologies, slug
from runs import fold_indices

DEFAULT_HIDDEN, DEFAULT_FREEZE, DEFAULT_LR = [256, 512], [3, 5], [5e-4, 1e-4]  # the original project's grid
NUMBER = (int, float, None)  # a metric in summary.json: a number, or null where it is undefined
METRICS = ["val_loss", "val_mse", "val_mse_cv", "val_mse_cal", "const_mse", "val_nmse", "val_auc"]
RESULT_COLUMNS = ["pathology", "view", "rank", "status", "hidden", "freeze", "lr", "folds", *METRICS, "best_epoch",
                  "epochs_run", "seconds", "trainable_params", "unfreeze_epoch", "config", "reason"]
TABLE_COLUMNS = ["rank", "status", "hidden", "freeze", "lr", "folds", "trainable_params", "val_loss", "val_mse",
                 "val_mse_cv", "val_auc", "best_epoch", "seconds"]
CONFIG_DIR = re.compile(r"hidden\d+_freeze\d+_lr\S+")
FAILED = "failed.json"  # in a trial's folder: why it failed, so that a rerun skips it
SET_BY_GRID = ("resume", "multi_head")  # train.py flags the grid sets itself


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(grid arguments, the flags passed through to train.py: a --config file's training keys, then
    the command line's unknown flags, so that the command line wins)."""
    p = Parser(prog="gridsearch.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
               epilog="Any other flag is passed to train.py unchanged (see python train.py --help).")
    p.add_argument("--pathology", required=True, metavar="NAME", help="the pathology to tune (quote names with spaces)")
    p.add_argument("--hidden", type=int, nargs="+", default=DEFAULT_HIDDEN, metavar="N",
                   help="MLP head sizes (default 256 512)")
    p.add_argument("--freeze", type=int, nargs="+", default=DEFAULT_FREEZE, metavar="N",
                   help="backbone stages (stem, layer1..4) kept frozen while the rest trains: for the whole run, "
                   "or until --unfreeze-epoch (default 3 5)")
    p.add_argument("--lr", type=float, nargs="+", default=DEFAULT_LR, metavar="F",
                   help="peak learning rates (default 5e-4 1e-4)")
    p.add_argument("--unfreeze-epoch", default="never", metavar="E|never",
                   help="epoch (0-based) from which the --freeze stages train too (default: never, frozen for the "
                   "whole run; train.py alone defaults to 1)")
    p.add_argument("--out-dir", type=Path, required=True, help="one folder per configuration, and results.csv")
    p.add_argument("--shard", metavar="I/N", help="train only the I-th of N slices of the grid (1 <= I <= N)")
    p.add_argument("--retry-failed", action=argparse.BooleanOptionalAction, default=False,
                   help="train the trials that failed before again (from their last.pt), instead of skipping them")
    p.add_argument("--collect", action=argparse.BooleanOptionalAction, default=False,
                   help="train nothing: only rebuild results.csv from the files on disk and print it")
    config.add_config_flag(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    for token in argv:  # argparse would give [] for --hidden=-- (config.parse_args refuses it for train.py)
        if re.fullmatch(r"--[\w-]+=--", token):
            p.error(f"argument {token.split('=')[0]}: expected a value, got '--'")
    from_file = read_grid_config(p, argv)
    args, passthrough = p.parse_known_args(argv)
    try:
        args.shard = parse_shard(args.shard) if args.shard else (1, 1)
        names = check_pathologies([args.pathology], ALL_LABELS)
    except UserError as e:
        p.error(str(e))
    if len(names) != 1:
        p.error(f"--pathology takes one name, got {args.pathology!r}")
    args.pathology = names[0]
    for dest in SET_BY_GRID:
        flag = "--" + dest.replace("_", "-")
        forms = (flag, "--no-" + flag[2:])
        if any(a in forms or a.startswith(tuple(f + "=" for f in forms)) for a in passthrough):
            p.error(f"{flag} cannot be passed through: gridsearch sets it itself")
    return args, [*from_file, *passthrough]


def read_grid_config(p: Parser, argv: list[str]) -> list[str]:
    """Apply `--config FILE.yaml` (if argv has one): its grid keys become p's defaults (so the
    command line wins); its training keys come back as train.py argv tokens. A key of neither
    script, a bad value or a key the grid sets itself (resume, multi-head) is p.error naming both."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path)
    path = pre.parse_known_args(argv)[0].config
    if path is None:
        return []
    tp = train_parser()
    try:
        values = config.read_config(path, p, others=tp)
    except UserError as e:
        p.error(str(e))
    mine = {d: v for d, v in values.items() if d in config.flag_actions(p)}
    theirs = {d: v for d, v in values.items() if d not in mine}
    for dest in SET_BY_GRID:
        if dest in theirs:
            p.error(f"--config {path}: {dest.replace('_', '-')!r} cannot be set: gridsearch sets it itself")
    for a in p._actions:
        if a.dest in mine:
            a.required = False
    p.set_defaults(**mine)
    p.config_source = (path, mine, argv)  # a bad value from the file: the error line names the file
    return config.to_argv(theirs, tp)


def train_parser() -> argparse.ArgumentParser:
    """train.py's own parser, to read the training keys of a --config file."""
    import train
    return train.make_parser()


def parse_shard(text: str) -> tuple[int, int]:
    """'2/4' -> (2, 4); 1-based, so the I of I/N runs from 1 to N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise UserError(f"--shard {text!r}: expected I/N, e.g. 1/4")
    i, n = int(m[1]), int(m[2])
    if n < 1 or not 1 <= i <= n:
        raise UserError(f"--shard {text}: I must be between 1 and N (1-based), got I={i}, N={n}")
    return i, n


def make_grid(hidden: list[int], freeze: list[int], lr: list[float]) -> list[dict]:
    """Every (hidden, freeze, lr), hidden varying slowest and lr fastest; repeated values count once."""
    uniq = lambda xs: list(dict.fromkeys(xs))
    return [{"hidden": h, "freeze": f, "lr": r} for h, f, r in itertools.product(uniq(hidden), uniq(freeze), uniq(lr))]


def config_name(cfg: dict) -> str:
    """{'hidden': 256, 'freeze': 3, 'lr': 5e-4} -> 'hidden256_freeze3_lr0.0005'."""
    return f"hidden{cfg['hidden']}_freeze{cfg['freeze']}_lr{cfg['lr']:g}"


def shard_of(grid: list[dict], i: int, n: int) -> list[dict]:
    """Configurations i, i+n, i+2n, ... (1-based): n shards cover the grid exactly once, and
    interleaving spreads the slow (large, unfrozen) configurations over the shards."""
    return grid[i - 1::n]


def train_argv(args: argparse.Namespace, passthrough: list[str], cfg: dict) -> list[str]:
    """train.py's argv for one configuration: the pass-through flags first, the grid's own last (so
    they win if a pass-through flag repeats one). --unfreeze-epoch is always given (never, unless
    set): it stays the same when a rerun raises --epochs, so the trial resumes."""
    return ["--pathology", args.pathology, *passthrough, "--hidden", str(cfg["hidden"]), "--freeze", str(cfg["freeze"]),
            "--unfreeze-epoch", str(args.unfreeze_epoch), "--lr", repr(cfg["lr"]),
            "--out-dir", str(args.out_dir / config_name(cfg)), "--resume"]


# ---------------------------------------------------------------------------------------------
# One trial: run it, or record why it failed

def run_trial(train, argv: list[str]) -> str | None:
    """train.main(argv): None once it finishes, or the one-line reason it failed (a UserError, which
    a loss that is not finite is too, or out of memory). Anything else is a bug and propagates, as
    do SystemExit (a SIGTERM saved last.pt: the job stops, to be requeued) and KeyboardInterrupt."""
    import torch
    try:
        train.main(argv)
        return None
    except UserError as e:
        return one_line(str(e))
    except (torch.OutOfMemoryError, MemoryError) as e:
        return "out of memory: " + one_line(str(e) or type(e).__name__)


def one_line(text: str, limit: int = 400) -> str:
    """The first line of a message, at most `limit` characters (CUDA's out-of-memory text runs on)."""
    line = text.strip().splitlines()[0] if text.strip() else "no message"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def free_memory() -> None:
    """Between trials: what a finished or failed trial held (its model, optimizer, batches, and the
    failure's traceback frames, which sit in reference cycles) is freed before the next one starts."""
    gc.collect()
    import torch
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def write_failure(folder: Path, cfg: dict, args: argparse.Namespace, view: str, reason: str, argv: list[str]) -> None:
    """TRIAL/failed.json: what failed, why, and with which train.py flags; a rerun skips the trial."""
    record = {"status": "failed", "reason": reason, "pathology": args.pathology, "view": view, **cfg,
              "unfreeze_epoch": args.unfreeze_epoch, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": argv}
    write_text(folder / FAILED, json.dumps(record, indent=2))


# ---------------------------------------------------------------------------------------------
# results.csv from the files on disk

def read_json(path: Path) -> dict:
    """A JSON object from a file, or UserError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e}); left out of results.csv") from e
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object (it holds a {type(data).__name__}); left out of results.csv")
    return data


def field(d: dict, key: str, kinds: tuple, path: Path, default=None):
    """d.get(key, default) if it is one of `kinds` (None among them: null or absent is allowed), else
    UserError naming the file and the key: a file of the wrong shape is one line, never a traceback."""
    value = d.get(key, default)
    types = tuple(k for k in kinds if k is not None)
    if (value is None and None in kinds) or (isinstance(value, types) and not isinstance(value, bool)):
        return value
    what = f"has no {key!r}" if key not in d else f"{key!r} is {value!r}"
    expected = " or ".join(k.__name__ if k else "null" for k in kinds)
    raise UserError(f"{path}: {what}, not what train.py writes ({expected}); left out of results.csv")



def trial_fields(summary: dict, path: Path) -> dict:
    """The columns a trial's summary.json (a fold's, for a K-fold trial) gives every row of it."""
    c, pathology = field(summary, "config", (dict,), path), field(summary, "pathology", (str,), path)
    return {"pathology": pathology, "view": field(summary, "view", (str,), path, "all"),
            "hidden": field(c, "hidden", (int, None), path), "freeze": field(c, "freeze", (int, None), path),
            "lr": field(c, "lr", NUMBER, path), "folds": field(c, "folds", (int, None), path),
            "trainable_params": trainable_params(pathology, c), "unfreeze_epoch": c.get("unfreeze_epoch")}


def single_row(folder: Path) -> dict:
    """A finished single-split trial: its best epoch's metrics from summary.json."""
    path = folder / "summary.json"
    s = read_json(path)
    return {**trial_fields(s, path), "status": "finished", **{k: field(s, k, NUMBER, path) for k in METRICS},
            "best_epoch": field(s, "best_epoch", (int, None), path),
            "epochs_run": field(s, "epochs_run", (int, None), path), "seconds": history_seconds(folder / "history.csv")}


def kfold_row(folder: Path) -> dict:
    """A finished K-fold trial: its out-of-fold metrics from oof_summary.json ({pathology: {n, mse,
    nmse, auc, mse_ci, auc_ci}}, mse from each row calibrated without its patient, as val_mse_cv is);
    the configuration from its first fold's summary.json; seconds over all folds."""
    path = folder / "oof_summary.json"
    oof = read_json(path)
    folds = [folder / f"fold{i}" for i in fold_indices(folder)]
    finished = [f for f in folds if (f / "summary.json").is_file()]
    if not finished:
        raise UserError(f"{path}: no fold<I>/summary.json beside it; left out of results.csv")
    row = trial_fields(read_json(finished[0] / "summary.json"), finished[0] / "summary.json")
    m = field(oof, row["pathology"], (dict,), path)
    mse, auc = field(m, "mse", (int, float), path), field(m, "auc", NUMBER, path)
    seconds = [s for s in (history_seconds(f / "history.csv") for f in folds) if s is not None]
    return {**row, "status": "finished", "folds": row["folds"] or len(folds), "val_loss": mse, "val_mse_cv": mse,
            "val_nmse": field(m, "nmse", NUMBER, path), "val_auc": auc, "const_mse": field(m, "const_mse", NUMBER, path),
            "seconds": round(sum(seconds), 2) if seconds else None}


def failed_row(folder: Path) -> dict:
    """A trial that failed, from its failed.json: its configuration and the reason, no metrics."""
    path = folder / FAILED
    f = read_json(path)
    return {"pathology": field(f, "pathology", (str,), path), "view": field(f, "view", (str,), path, "all"),
            "status": "failed", "hidden": field(f, "hidden", (int, None), path),
            "freeze": field(f, "freeze", (int, None), path), "lr": field(f, "lr", NUMBER, path),
            "unfreeze_epoch": f.get("unfreeze_epoch"), "reason": field(f, "reason", (str,), path, "?"),
            "seconds": history_seconds(folder / "history.csv")}


def history_seconds(path: Path) -> float | None:
    """Training seconds of a run: the sum of history.csv's per-epoch seconds (kept across resumes)."""
    if not path.is_file():
        return None
    try:
        with open(path, newline="") as f:
            return round(sum(float(r["seconds"]) for r in csv.DictReader(f) if r.get("seconds")), 2)
    except (OSError, ValueError, csv.Error) as e:
        raise UserError(f"{path}: not a history.csv of train.py ({e}); left out of results.csv") from e


@functools.lru_cache(maxsize=None)
def _trainable(pathology: str, head: str, hidden: int, dropout: float, freeze: int, arch: str = "resnet50",
               head_type: str = "regression", image_size: int | None = None) -> int:
    import torch
    from model import build_model, model_config, set_frozen
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(model_config([pathology], head, hidden, dropout, arch, head_type, image_size))
    set_frozen(model, freeze)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_params(pathology: str | None, config: dict) -> int | None:
    """Parameters a configuration trains while its --freeze stages are frozen (None if its summary
    lacks the fields). This is what the freeze axis changes: with --hidden 256, 24.0M parameters train
    with --freeze 0, 22.6M with 3 (stem, layer1, layer2 frozen), 15.5M with 4, the head's 0.5M with 5."""
    try:
        return _trainable(pathology, config["head"], int(config["hidden"]), float(config["dropout"]),
                          int(config["freeze"]), config.get("arch", "resnet50"), config.get("head_type", "regression"),
                          config.get("image_size"))  # a ViT's position embedding depends on it
    except (KeyError, TypeError, ValueError, UserError):
        return None


def trial_row(folder: Path) -> dict | None:
    """The row of one trial folder OUT_DIR/<config>/<slug>/: failed (failed.json wins: a later rerun
    failed), finished K-fold (oof_summary.json) or finished single split (summary.json); None while
    it is neither (running, killed, or a K-fold trial with folds to go)."""
    for name, read in ((FAILED, failed_row), ("oof_summary.json", kfold_row), ("summary.json", single_row)):
        if (folder / name).is_file():
            return {"config": f"{folder.parent.name}/{folder.name}", **read(folder)}
    return None


def collect_results(out_dir: Path) -> list[dict]:
    """One row per finished or failed trial under OUT_DIR, grouped by pathology and view; within a
    group, finished trials best val_loss first with their rank (1 = best), then failed ones. Reads
    only what is on disk, so any shard can rebuild it at any time; a file of the wrong shape is one
    warning naming it, and its trial is left out."""
    rows = []
    for folder in sorted(Path(out_dir).glob("*/*/")):
        if not (folder.is_dir() and CONFIG_DIR.fullmatch(folder.parent.name)):
            continue
        try:
            row = trial_row(folder)
        except UserError as e:
            warnings.warn(str(e), stacklevel=2)
            continue
        if row is not None:
            rows.append({c: row.get(c) for c in RESULT_COLUMNS})
    rows.sort(key=lambda r: (r["pathology"], r["view"], r["status"] != "finished", r["val_loss"] is None,
                             r["val_loss"] if r["val_loss"] is not None else 0.0, r["config"]))
    for (pathology, view), group in itertools.groupby(rows, key=lambda r: (r["pathology"], r["view"])):
        for k, r in enumerate(r for r in group if r["status"] == "finished" and r["val_loss"] is not None):
            r["rank"] = k + 1
    return rows


def write_results(out_dir: Path, rows: list[dict]) -> Path:
    """OUT_DIR/results.csv, replaced atomically (a temporary file renamed over it)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, RESULT_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    path = Path(out_dir) / "results.csv"
    write_text(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------
# The shard

def run_shard(train, args: argparse.Namespace, passthrough: list[str], todo: list[dict], view: str,
              progress: bool) -> list[str]:
    """Train the shard's trials one after another, each on its own: a failure is recorded and the
    next one starts. Returns the names of the trials that failed (now or, skipped, before)."""
    i, n = args.shard
    failed = []
    for k, cfg in enumerate(tqdm(todo, desc=f"grid shard {i}/{n}", unit="config", disable=not progress)):
        name, argv = config_name(cfg), train_argv(args, passthrough, cfg)
        folder = args.out_dir / name / slug(args.pathology, view)
        print(f"\n=== {name} ({k + 1}/{len(todo)} of shard {i}/{n}) ===", flush=True)
        if (folder / FAILED).is_file() and not args.retry_failed:
            try:
                reason = failed_row(folder)["reason"]
            except UserError as e:
                reason = str(e)
            print(f"{name}: skipped, it failed before ({reason}); --retry-failed trains it again", flush=True)
            failed.append(name)
            continue
        reason = run_trial(train, argv)
        free_memory()
        if reason is None:
            (folder / FAILED).unlink(missing_ok=True)  # a retried trial that now finishes
        else:
            write_failure(folder, cfg, args, view, reason, argv)
            print(f"{name}: failed ({reason}); recorded in {folder / FAILED}; the shard goes on", flush=True)
            failed.append(name)
        write_results(args.out_dir, collect_results(args.out_dir))  # partial results survive a killed shard
    return failed


def main(argv=None) -> list[dict]:
    """Train the shard (unless --collect), rebuild results.csv, print this pathology and view's rows;
    returns them, best first. UserError at the end if a trial of the shard failed."""
    args, passthrough = parse_args(argv)
    grid = make_grid(args.hidden, args.freeze, args.lr)
    i, n = args.shard
    todo = [] if args.collect else shard_of(grid, i, n)
    import train  # torch loads only after the grid's own flags are checked: a typo there fails at once
    # every trial's flags are checked now, so a typo fails before hours of training, not after
    own = train.parse_args(["--pathology", args.pathology, *passthrough])
    train_args = [train.parse_args(train_argv(args, passthrough, cfg)) for cfg in todo]
    weights = Path(own.weights) if own.weights not in ("imagenet", "none") else None
    check_outputs(folders={"--out-dir": args.out_dir}, inputs={"--train-csv": own.train_csv, "--weights": weights},
                  data_root=own.data_root)
    failed = []
    if not args.collect:
        print(f"grid: {len(grid)} configurations ({len(set(args.hidden))} hidden x {len(set(args.freeze))} freeze x "
              f"{len(set(args.lr))} lr); shard {i}/{n} trains {len(todo)}: {', '.join(map(config_name, todo)) or 'none'}")
        t0 = time.time()
        failed = run_shard(train, args, passthrough, todo, own.view, train_args[0].progress if train_args else False)
        print(f"\nshard {i}/{n}: {len(todo)} configurations in {time.time() - t0:.1f}s, {len(failed)} failed")
    rows = collect_results(args.out_dir)
    path = write_results(args.out_dir, rows)
    mine = [r for r in rows if (r["pathology"], r["view"]) == (args.pathology, own.view)]
    if mine:
        shown = [{**r, "lr": f"{r['lr']:g}" if isinstance(r["lr"], float) else r["lr"]} for r in mine]
        print(f"\n{args.pathology} (view {own.view}):\n" + format_table(shown, TABLE_COLUMNS))
    done = [r for r in mine if r["rank"] is not None]
    print(f"\n{args.pathology} (view {own.view}): {len(done)} finished and "
          f"{sum(r['status'] == 'failed' for r in mine)} failed configurations in {path}"
          + (f"; best: {done[0]['config']}" if done else ""))
    if failed:
        raise UserError(f"{len(failed)} of {len(todo)} trials of shard {i}/{n} failed ({', '.join(failed)}); the "
                        f"others ran. Reasons in the reason column of {path}; --retry-failed trains them again")
    return mine


if __name__ == "__main__":
    sys.exit(run_cli(main))
