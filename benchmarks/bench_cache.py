"""Benchmark: building the image cache vs a plain one-process PIL loop, on full-resolution JPEGs.

    python benchmarks/bench_cache.py [--n 400] [--size 256] [--workers N] [--repeat R] [--keep DIR]
    python benchmarks/bench_cache.py --n 300 --size 224 --equalize none hist clahe

Makes N synthetic grayscale JPEGs of 2300 x 2750 px (the CS 156b resolution) with a CS 156b-style
student_labels/train2023.csv in a temporary folder, then times, each as a whole process with its
start-up included:
  (a) python dataset.py --data-root ROOT --image-size S   (draft decoding, --workers processes)
  (b) a baseline: one process doing PIL open -> convert('L') -> resize -> np.stack -> torch.save
  (c) (a) again with the same arguments: it finds the cache complete
and, to separate start-up from decoding, each one's decoding loop timed inside its process. Prints a
table (seconds, images per second, speedups) and the cache's size against N * S * S bytes. The
files are read once before timing, so both sides read from the OS page cache, not the disk. With
--repeat R each measurement is the fastest of R runs (for a machine shared with other work).

With --equalize MODE [MODE ...] it times instead the cache build (in-process, a fresh folder each
time, --workers processes) once per --equalize setting, and each setting's equalisation alone, one
core, per S x S image: what each setting adds to a build.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache import build_cache, equalize_image, load_image
from common import default_workers, format_table
from dataset import PATHOLOGIES  # noqa: E402

BASELINE = r"""
import sys, time
import numpy as np, torch
from PIL import Image
root, csv, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import pandas as pd
paths = pd.read_csv(csv)["Path"]
t0 = time.perf_counter()
images = []
for p in paths:
    with Image.open(f"{root}/{p}") as im:
        images.append(np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR)))
torch.save(torch.from_numpy(np.stack(images)), out)
print(time.perf_counter() - t0)
"""


def make_images(root: Path, n: int, width: int, height: int, distinct: int = 16, seed: int = 0) -> None:
    """n JPEGs under root/train/pidK/study1/view1_frontal.jpg and a CS 156b train2023.csv. `distinct`
    different pictures (smooth anatomy-like shapes plus film grain) are copied to the n files: the
    decoding cost is the same, the making is n/distinct times faster."""
    import pandas as pd
    rng = np.random.default_rng(seed)
    blobs = []
    yy, xx = np.mgrid[0:height // 8, 0:width // 8].astype(np.float32)
    for d in range(distinct):
        small = 60 + 40 * np.sin(xx / rng.uniform(20, 40)) * np.cos(yy / rng.uniform(20, 40))
        for _ in range(6):
            cy, cx = rng.uniform(0, height // 8), rng.uniform(0, width // 8)
            small += 80 * (((yy - cy) / rng.uniform(20, 90)) ** 2 + ((xx - cx) / rng.uniform(20, 90)) ** 2 < 1)
        big = np.asarray(Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR),
                         np.float32)
        big += rng.normal(0, 6, big.shape).astype(np.float32)
        path = root / f"distinct_{d}.jpg"
        Image.fromarray(big.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        blobs.append(path.read_bytes())
        path.unlink()
    rows = []
    for i in range(n):
        rel = f"train/pid{10000 + i}/study1/view1_frontal.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(blobs[i % distinct])
        rows.append({"Unnamed: 0.1": i, "Unnamed: 0": i, "Path": rel, "Sex": "Female", "Age": 50,
                     "Frontal/Lateral": "Frontal", "AP/PA": "AP",
                     **{name: float(rng.choice([1.0, 0.0, -1.0])) for name in PATHOLOGIES}})
    (root / "student_labels").mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "student_labels" / "train2023.csv", index=False)


def per_image_ms(files: list[Path], size: int) -> tuple[float, float]:
    """One core: ms per image for a full decode + resize, and for load_image (draft decode + resize)."""
    def full(p):
        with Image.open(p) as im:
            return np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR))
    out = []
    for f in (full, lambda p: load_image(p, size)):
        t0 = time.perf_counter()
        for p in files:
            f(p)
        out.append(1000 * (time.perf_counter() - t0) / len(files))
    return out[0], out[1]


def equalize_table(root: Path, files: list[Path], size: int, workers: int, modes: list[str], repeat: int,
                   work: Path) -> list[dict]:
    """Per --equalize mode: the whole in-process cache build (fastest of `repeat`) and the
    equalisation alone, ms per size x size image on one core."""
    paths = [str(f.relative_to(root)) for f in files]
    plain = [load_image(f, size) for f in files[:64]]
    build_cache(paths[:8], root, size, work / "warm", "bench", workers=workers, progress=False)  # imports, forks
    rows = []
    for mode in modes:
        equalize_image(plain[0], mode)  # the library's import and set-up, outside the clock
        build_s = float("inf")
        for r in range(repeat):
            shutil.rmtree(work / "cache_eq", ignore_errors=True)
            t0 = time.perf_counter()
            build_cache(paths, root, size, work / "cache_eq", "bench", workers=workers, progress=False, equalize=mode)
            build_s = min(build_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for a in plain:
            equalize_image(a, mode)
        rows.append({"--equalize": mode, "build s": build_s, "img/s": len(paths) / build_s,
                     "equalize ms/img": 1000 * (time.perf_counter() - t0) / len(plain)})
    for row in rows:
        row["vs none"] = row["build s"] / rows[0]["build s"]
    return rows


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{r.stderr}")
    return wall, r.stdout


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=400, help="number of images")
    p.add_argument("--size", type=int, default=256, help="cached image side, px")
    p.add_argument("--workers", type=int, default=default_workers(), help="dataset.py --workers")
    p.add_argument("--width", type=int, default=2300)
    p.add_argument("--height", type=int, default=2750)
    p.add_argument("--repeat", type=int, default=1, help="take the fastest of this many runs of each")
    p.add_argument("--keep", type=Path, help="keep (or reuse) the images in this folder instead of a temporary one")
    p.add_argument("--equalize", nargs="+", choices=["none", "hist", "clahe"],
                   help="time the build once per --equalize setting instead (the first is the reference)")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    root = args.keep or work / "data"
    try:
        if not (root / "student_labels" / "train2023.csv").is_file():
            t0 = time.perf_counter()
            root.mkdir(parents=True, exist_ok=True)
            make_images(root, args.n, args.width, args.height)
            print(f"made {args.n} JPEGs of {args.width} x {args.height} px in {time.perf_counter() - t0:.0f} s")
        files = sorted((root / "train").rglob("*.jpg"))
        n = len(files)
        mean_kb = np.mean([f.stat().st_size for f in files]) / 1024
        for f in files:  # into the page cache, for both sides alike
            f.read_bytes()
        if args.equalize:
            rows = equalize_table(root, files, args.size, args.workers, args.equalize, args.repeat, work)
            print(format_table(rows, ["--equalize", "build s", "img/s", "vs none", "equalize ms/img"]))
            print(f"\nfastest of {args.repeat} build(s); {n} JPEGs, {args.width} x {args.height} px, cached at "
                  f"{args.size} px with {args.workers} workers; equalize alone on one core, over 64 images; "
                  f"{os.cpu_count()} CPUs visible, {len(os.sched_getaffinity(0))} usable")
            return
        py, s = sys.executable, args.size
        cache_dir = work / "cache"

        import torch  # noqa: F401  (for the in-process timing below: imported before the clock starts)
        paths = [str(f.relative_to(root)) for f in files]
        base_wall = base_loop = build_wall = rerun_wall = build_loop = float("inf")
        for r in range(args.repeat):
            wall, out = timed([py, "-c", BASELINE, str(root), str(root / "student_labels" / "train2023.csv"),
                               str(s), str(work / "baseline.pt")])
            base_wall, base_loop = min(base_wall, wall), min(base_loop, float(out.strip().splitlines()[-1]))
            shutil.rmtree(cache_dir, ignore_errors=True)
            cmd = [py, "dataset.py", "--data-root", str(root), "--image-size", str(s), "--cache-dir", str(cache_dir),
                   "--workers", str(args.workers)]
            build_wall = min(build_wall, timed(cmd)[0])
            rerun_wall = min(rerun_wall, timed(cmd)[0])
            # the decoding alone, inside this process (fresh cache folder, same workers)
            shutil.rmtree(work / "cache_inproc", ignore_errors=True)
            t0 = time.perf_counter()
            build_cache(paths, root, s, work / "cache_inproc", "bench", workers=args.workers, progress=False)
            build_loop = min(build_loop, time.perf_counter() - t0)

        full_ms, draft_ms = per_image_ms(files[:32], s)
        nbytes = sum(f.stat().st_size for f in next(cache_dir.iterdir()).glob("shard_*.pt"))
        rows = [
            {"run": "(b) baseline: PIL full decode, 1 process", "whole s": base_wall, "img/s whole": n / base_wall,
             "loop s": base_loop, "img/s loop": n / base_loop},
            {"run": f"(a) dataset.py, draft, {args.workers} workers", "whole s": build_wall,
             "img/s whole": n / build_wall, "loop s": build_loop, "img/s loop": n / build_loop},
            {"run": "(c) dataset.py rerun (cache complete)", "whole s": rerun_wall, "img/s whole": None,
             "loop s": None, "img/s loop": None},
        ]
        print(format_table(rows, ["run", "whole s", "img/s whole", "loop s", "img/s loop"]))
        print(f"\nfastest of {args.repeat} run(s); {n} JPEGs, {args.width} x {args.height} px, {mean_kb:.0f} KiB each, cached at {s} px; "
              f"{os.cpu_count()} CPUs visible, {len(os.sched_getaffinity(0))} usable")
        print(f"speedup whole process (b)/(a): {base_wall / build_wall:.2f}x   (target >= 2x)")
        print(f"speedup per image (loop):      {base_loop / build_loop:.2f}x   (aim >= 3.5x on 2 cores)")
        print(f"one core, per image: full decode {full_ms:.1f} ms, draft decode {draft_ms:.1f} ms "
              f"({full_ms / draft_ms:.2f}x); ceiling with {args.workers} workers: {args.workers * full_ms / draft_ms:.1f}x")
        print(f"rerun / build (c)/(a):         {rerun_wall / build_wall:.2f}     (target well under 0.5)")
        print(f"cache bytes: {nbytes:,} vs N*S*S = {n * s * s:,} ({nbytes / (n * s * s):.4f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
