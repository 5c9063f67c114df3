"""Benchmark: what checking a complete cache against its files costs (one stat per image).

    python benchmarks/bench_stat.py [--n-full 400] [--n-small 180000] [--repeat 3] [--keep DIR]

Makes, in a temporary folder (deleted afterwards), two data roots with a CS 156b train2023.csv:
  full    N_FULL synthetic grayscale JPEGs of 2300 x 2750 px (bench_cache.make_images)
  small   N_SMALL tiny JPEGs in the CS 156b layout (3 views a patient), as many paths as the real
          CSV has rows: the stat pass depends on the number of paths, not on the files' sizes
builds each one's cache (64 px, 16 px for the small files), then times, best of --repeat:
  stat pass   cache.file_stat over every path, one thread: the cost this check adds to a run
  check       build_cache on the complete cache, in-process: meta.json, every shard's status,
              pixel size and file stats (STAT_THREADS shards at a time), as every script runs it
  rerun       `python dataset.py` on the complete cache, a whole process (CSV read included)
The files were just written, so their inodes are in memory (a warm stat); on a network filesystem
each stat is a round trip to the server, which the check's threads overlap.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_cache import make_images  # noqa: E402
from cache import STAT_THREADS, build_cache, file_stat  # noqa: E402
from common import format_table  # noqa: E402
from dataset import PATHOLOGIES  # noqa: E402


def make_small(root: Path, n: int) -> None:
    """n copies of one 16 x 16 JPEG under root/train/pidP/study1/viewV_frontal.jpg (3 a patient), and the CSV."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(buf, "JPEG")
    blob = buf.getvalue()
    rels = [f"train/pid{10000 + i // 3}/study1/view{i % 3 + 1}_frontal.jpg" for i in range(n)]
    for i, rel in enumerate(rels):
        if i % 3 == 0:
            (root / rel).parent.mkdir(parents=True)
        (root / rel).write_bytes(blob)
    labels = {name: 1.0 for name in PATHOLOGIES}
    rows = [{"Unnamed: 0.1": i, "Unnamed: 0": i, "Path": rel, "Sex": "Female", "Age": 50, "Frontal/Lateral": "Frontal",
             "AP/PA": "AP", **labels} for i, rel in enumerate(rels)]
    (root / "student_labels").mkdir()
    pd.DataFrame(rows).to_csv(root / "student_labels" / "train2023.csv", index=False)


def best(f, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(name: str, root: Path, size: int, cache_dir: Path, repeat: int) -> dict:
    paths = list(pd.read_csv(root / "student_labels" / "train2023.csv")["Path"])
    t0 = time.perf_counter()
    build_cache(paths, root, size, cache_dir, "train2023", progress=False)
    built = time.perf_counter() - t0
    stat = best(lambda: [file_stat(root / p) for p in paths], repeat)
    check = best(lambda: build_cache(paths, root, size, cache_dir, "train2023", progress=False), repeat)
    cmd = [sys.executable, "dataset.py", "--data-root", str(root), "--image-size", str(size), "--cache-dir",
           str(cache_dir)]
    rerun = best(lambda: subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True), repeat)
    return {"set": name, "images": len(paths), "build s": built, "stat pass s": stat,
            "us/img": 1e6 * stat / len(paths), "check s": check, "rerun s": rerun}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-full", type=int, default=400, help="full-resolution JPEGs")
    p.add_argument("--n-small", type=int, default=180_000, help="paths of tiny files (the real CSV's 178k rows)")
    p.add_argument("--repeat", type=int, default=3, help="take the fastest of this many runs of each")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it, instead of a temporary one")
    args = p.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_stat_"))
    try:
        rows = []
        for name, n, size in (("full", args.n_full, 64), ("small", args.n_small, 16)):
            root = work / name
            if not (root / "student_labels" / "train2023.csv").is_file():
                t0 = time.perf_counter()
                root.mkdir(parents=True, exist_ok=True)
                make_images(root, n, 2300, 2750) if name == "full" else make_small(root, n)
                print(f"made {n} {name} files in {time.perf_counter() - t0:.0f} s", flush=True)
            rows.append(measure(f"{name} ({size} px cache)", root, size, work / f"cache_{name}", args.repeat))
        print(format_table(rows, ["set", "images", "build s", "stat pass s", "us/img", "check s", "rerun s"]))
        print(f"\nfastest of {args.repeat}; warm inodes; check runs {STAT_THREADS} shards at a time; "
              f"{os.cpu_count()} CPUs visible, {len(os.sched_getaffinity(0))} usable")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
