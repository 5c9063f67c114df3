"""Grid search over head size x frozen backbone stages x learning rate, one train.py run per config.

    python experiments/gridsearch.py --pathology Cardiomegaly --out-dir runs/grid      # demo data
    python experiments/gridsearch.py --pathology "Pleural Effusion" --data-root /data/cs156b \\
        --hidden 256 512 --freeze 3 5 --lr 5e-4 1e-4 --epochs 5 --out-dir runs/grid --shard 2/4

--freeze N keeps the first N backbone stages (stem, layer1..4) frozen for the whole run while the
rest trains, as in the original project; --unfreeze-epoch E unfreezes them from epoch E (0-based)
instead. Every flag it does not know (--epochs, --image-size, --data-root, --augmented, ...) goes to
train.py unchanged. Each configuration trains through train.main() into its own folder,
OUT_DIR/hidden256_freeze3_lr0.0005/<slug>/, always with --resume: a finished configuration returns
its summary without training, one killed mid-way carries on from its last.pt.

--shard I/N (1-based: I = 1..N, as SLURM's --array=1-N) trains only configurations I, I+N, I+2N, ...
of the grid, so N jobs cover it exactly once. Every run (and --collect) rebuilds OUT_DIR/results.csv
from the summary.json files on disk, best validation loss first, and replaces it atomically:
concurrent shards never leave a torn file, and the last one to finish lists every finished config.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import itertools
import json
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # `python experiments/gridsearch.py` from anywhere: find the repo's modules
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from common import Parser, UserError, format_table, run_cli, write_text
from dataset import ALL_LABELS, check_pathologies

DEFAULT_HIDDEN, DEFAULT_FREEZE, DEFAULT_LR = [256, 512], [3, 5], [5e-4, 1e-4]  # the original project's grid
RESULT_COLUMNS = ["pathology", "hidden", "freeze", "lr", "val_loss", "val_mse", "val_mse_cv", "val_mse_cal", "const_mse",
                  "val_auc", "best_epoch", "epochs_run", "seconds", "trainable_params", "unfreeze_epoch", "config"]
TABLE_COLUMNS = ["hidden", "freeze", "lr", "trainable_params", "val_loss", "val_mse", "val_mse_cv", "val_auc",
                 "best_epoch", "seconds"]
CONFIG_DIR = re.compile(r"hidden\d+_freeze\d+_lr\S+")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(grid arguments, the flags passed through to train.py unchanged)."""
    p = Parser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                epilog="Any other flag is passed to train.py unchanged (see python train.py --help).")
    p.add_argument("--pathology", required=True, metavar="NAME", help="the pathology to tune (quote names with spaces)")
    p.add_argument("--hidden", type=int, nargs="+", default=DEFAULT_HIDDEN, metavar="N",
                   help="MLP head sizes (default 256 512)")
    p.add_argument("--freeze", type=int, nargs="+", default=DEFAULT_FREEZE, metavar="N",
                   help="backbone stages (stem, layer1..4) kept frozen while the rest trains: for the whole run, "
                   "or until --unfreeze-epoch (default 3 5)")
    p.add_argument("--lr", type=float, nargs="+", default=DEFAULT_LR, metavar="F",
                   help="peak learning rates (default 5e-4 1e-4)")
    p.add_argument("--unfreeze-epoch", type=int, metavar="E",
                   help="epoch (0-based) from which the --freeze stages train too (default: never, i.e. --epochs: "
                   "frozen for the whole run; train.py alone defaults to 1)")
    p.add_argument("--out-dir", type=Path, required=True, help="one folder per configuration, and results.csv")
    p.add_argument("--shard", metavar="I/N", help="train only the I-th of N slices of the grid (1 <= I <= N)")
    p.add_argument("--collect", action=argparse.BooleanOptionalAction, default=False,
                   help="train nothing: only rebuild results.csv from the summaries on disk and print it")
    args, passthrough = p.parse_known_args(argv)
    try:
        args.shard = parse_shard(args.shard) if args.shard else (1, 1)
        names = check_pathologies([args.pathology], ALL_LABELS)
    except UserError as e:
        p.error(str(e))
    if len(names) != 1:
        p.error(f"--pathology takes one name, got {args.pathology!r}")
    args.pathology = names[0]
    for flag in ("--resume", "--no-resume", "--multi-head", "--no-multi-head"):
        if any(a == flag or a.startswith(flag + "=") for a in passthrough):
            p.error(f"{flag} cannot be passed through: gridsearch sets it itself")
    return args, passthrough


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
    they win if a pass-through flag repeats one)."""
    unfreeze = [] if args.unfreeze_epoch is None else ["--unfreeze-epoch", str(args.unfreeze_epoch)]
    return ["--pathology", args.pathology, *passthrough, "--hidden", str(cfg["hidden"]), "--freeze", str(cfg["freeze"]),
            *unfreeze, "--lr", repr(cfg["lr"]), "--out-dir", str(args.out_dir / config_name(cfg)), "--resume"]


def history_seconds(path: Path) -> float | None:
    """Training seconds of a run: the sum of history.csv's per-epoch seconds (kept across resumes)."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return round(sum(float(r["seconds"]) for r in csv.DictReader(f) if r.get("seconds")), 2)


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
    except (KeyError, TypeError, ValueError):
        return None


def collect_results(out_dir: Path) -> list[dict]:
    """One row per finished configuration (a summary.json under OUT_DIR/<config>/<slug>/), best
    val_loss first. Reads only what is on disk, so any shard can rebuild it at any time."""
    rows = []
    for summary_path in sorted(Path(out_dir).glob("hidden*_freeze*_lr*/*/summary.json")):
        if not CONFIG_DIR.fullmatch(summary_path.parent.parent.name):
            continue
        try:
            s = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError):  # written atomically, so only a foreign file lands here
            continue
        c = s.get("config", {})
        rows.append({"pathology": s.get("pathology"), "hidden": c.get("hidden"), "freeze": c.get("freeze"),
                     "lr": c.get("lr"), **{k: s.get(k) for k in RESULT_COLUMNS[4:12]},
                     "seconds": history_seconds(summary_path.parent / "history.csv"),
                     "trainable_params": trainable_params(s.get("pathology"), c),
                     "unfreeze_epoch": c.get("unfreeze_epoch"),
                     "config": f"{summary_path.parent.parent.name}/{summary_path.parent.name}"})
    rows.sort(key=lambda r: (r["val_loss"] is None, r["val_loss"] if r["val_loss"] is not None else 0.0, r["config"]))
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


def main(argv=None) -> list[dict]:
    args, passthrough = parse_args(argv)
    grid = make_grid(args.hidden, args.freeze, args.lr)
    i, n = args.shard
    todo = shard_of(grid, i, n)
    if not args.collect:
        import train  # torch loads only after the grid's own flags are checked: a typo there fails at once
        if args.unfreeze_epoch is None:  # frozen for the whole run: unfreeze after the last epoch
            args.unfreeze_epoch = train.parse_args(["--pathology", args.pathology, *passthrough]).epochs
        # check every configuration's flags now, so a typo fails before hours of training, not after
        train_args = [train.parse_args(train_argv(args, passthrough, cfg)) for cfg in todo]
        progress = train_args[0].progress if train_args else False
        print(f"grid: {len(grid)} configurations ({len(set(args.hidden))} hidden x {len(set(args.freeze))} freeze x "
              f"{len(set(args.lr))} lr); shard {i}/{n} trains {len(todo)}: {', '.join(map(config_name, todo)) or 'none'}")
        t0 = time.time()
        for k, cfg in enumerate(tqdm(todo, desc=f"grid shard {i}/{n}", unit="config", disable=not progress)):
            print(f"\n=== {config_name(cfg)} ({k + 1}/{len(todo)} of shard {i}/{n}) ===", flush=True)
            train.main(train_argv(args, passthrough, cfg))
            write_results(args.out_dir, collect_results(args.out_dir))  # partial results survive a killed shard
        print(f"\nshard {i}/{n}: {len(todo)} configurations in {time.time() - t0:.1f}s")
    rows = collect_results(args.out_dir)
    path = write_results(args.out_dir, rows)
    if rows:
        shown = [{**r, "lr": f"{r['lr']:g}" if isinstance(r["lr"], float) else r["lr"]} for r in rows]
        print("\n" + format_table(shown, ["pathology", *TABLE_COLUMNS]))
    print(f"\n{len(rows)} finished configurations in {path}" + (f"; best: {rows[0]['config']}" if rows else ""))
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
