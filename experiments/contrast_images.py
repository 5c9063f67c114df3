"""Build contrast-adjusted copies of the cached training images (offline augmentation).

    python experiments/contrast_images.py                                # the demo data, 64 px, x1.5
    python experiments/contrast_images.py --factor 1.5 --data-root /data/cs156b --image-size 224

Each image is scaled by --factor around its own mean and clipped to [0, 255]. The copy lives beside
the base cache as CACHE_DIR/<base folder>+contrast<factor> (e.g. +contrast1.5); `python train.py
--augmented contrast` finds it (or name it exactly, --augmented contrast1.5, when several are built).
"""
from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

if __name__ == "__main__":  # `python experiments/contrast_images.py` from anywhere: find the repo's modules
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment import adjust_contrast
from cache import ImageCache
from common import run_cli
import config
from experiments.flip_images import build_copy, check_args, make_parser


def main(argv=None) -> ImageCache:
    p = make_parser("Build contrast-adjusted copies of the cached training images "
                    "(used by train.py --augmented contrast).", prog="contrast_images.py")
    p.add_argument("--factor", type=float, default=1.5,
                   help="contrast factor around each image's mean (1 = unchanged, >1 more contrast)")
    args = check_args(p, config.parse_args(p, argv))
    if not 0 < args.factor < math.inf:
        p.error(f"--factor must be positive and finite, got {args.factor}")
    return build_copy(args, f"contrast{args.factor:g}", partial(adjust_contrast, factor=args.factor))


if __name__ == "__main__":
    sys.exit(run_cli(main))
