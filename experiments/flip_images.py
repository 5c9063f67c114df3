"""Build horizontally flipped copies of the cached training images (offline augmentation).

    python experiments/flip_images.py                                    # the demo data, 64 px
    python experiments/flip_images.py --data-root /data/cs156b --image-size 224 --cache-dir cache

builds (or finishes) the base image cache of the CSV, then its flipped copy beside it as
CACHE_DIR/<base folder>+flip. `python train.py --augmented flip` (same --data-root, --csv,
--image-size, --square, --equalize and --cache-dir) then adds the copies as extra training samples;
each copy keeps its source image's labels and patient, so copies never cross the patient split. A
copy is made from the base cache's pixels, so it follows their --equalize; when base shards are
rebuilt (an image replaced or restored), rerunning this script remakes the copies of those shards
(train.py refuses an out-of-date copy in one line).

build_copy() is the one routine both augmentation scripts use (contrast_images.py imports it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

if __name__ == "__main__":  # `python experiments/flip_images.py` from anywhere: find the repo's modules
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment import flip_images
from cache import ImageCache, cached_table, derive_cache
from common import Parser, add_data_flags, check_common_flags, run_cli
import config
from dataset import read_train_csv, resolve_data
from patients import add_patient_col_flag


def make_parser(description: str, prog: str = "flip_images.py") -> argparse.ArgumentParser:
    """The flags every augmentation script takes: the same ones that key the base cache in train.py."""
    p = Parser(description=description, prog=prog)
    add_data_flags(p, "--csv", "training CSV (default: the first of DATA_ROOT/student_labels/train2023.csv, "
                   "CheXpert-v1.0-small/train.csv, CheXpert-v1.0/train.csv)")
    add_patient_col_flag(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    config.add_config_flag(p)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the image size the way train.py does (64 on the demo data) and reject bad values."""
    if args.image_size is None:
        from train import DEMO_DEFAULTS, REAL_DEFAULTS  # one place holds these defaults
        args.image_size = (DEMO_DEFAULTS if args.data_root is None else REAL_DEFAULTS)["image_size"]
    check_common_flags(p, args)
    return args


def build_copy(args: argparse.Namespace, name: str, transform: Callable) -> ImageCache:
    """Build (or finish) the base cache for args' CSV, then its copy `name` made by `transform`
    (uint8 (n, S, S) -> uint8 (n, S, S)); print a summary and return the copy. Resumable per shard:
    run again, it finds both complete and returns at once."""
    t0 = time.time()
    root, csv = resolve_data(args.data_root, args.csv, "train2023.csv")
    # the same call train.py makes, so the base cache (and hence the copy) has the same key
    table, base = cached_table(read_train_csv(csv, patient_col=args.patient_col), root, args.image_size,
                               args.cache_dir, csv.stem, args.square, args.workers, progress=args.progress,
                               equalize=args.equalize)
    copy = derive_cache(base, name, transform, progress=args.progress)
    n_bytes = sum(copy.shard_path(k).stat().st_size for k in range(copy.n_shards))
    print(f"{'copy':<10} {copy.folder}\n{'base':<10} {base.folder}\n{'transform':<10} {name}\n"
          f"{'images':<10} {len(copy)} ({len(table)} usable training rows)\n"
          f"{'size':<10} {copy.size} x {copy.size} px, uint8, {copy.square}, equalize {copy.equalize}\n"
          f"{'bytes':<10} {n_bytes / 1e6:.1f} MB in {copy.n_shards} shards\n{'seconds':<10} {time.time() - t0:.2f}\n"
          f"train on it with: python train.py ... --augmented {name} (same --data-root, --csv, --image-size, "
          f"--square, --equalize, --cache-dir)")
    return copy


def main(argv=None) -> ImageCache:
    p = make_parser("Build horizontally flipped copies of the cached training images "
                    "(used by train.py --augmented flip).")
    args = check_args(p, config.parse_args(p, argv))
    return build_copy(args, "flip", flip_images)


if __name__ == "__main__":
    sys.exit(run_cli(main))
