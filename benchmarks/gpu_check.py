"""Check the CUDA path end to end on data it makes itself, and measure the training loop.

    python3 benchmarks/gpu_check.py --out gpu_check.json    # on a CUDA machine, no network; about 3-4 minutes
    python3 benchmarks/gpu_check.py --dry-run               # the same code paths on CPU at 32 px, about a minute

Sections, in order; each prints progress lines and the JSON (--out) is rewritten after each one,
so a run cut short still brings back what it finished:
1. data        the synthetic demo dataset (demo.make_demo), cached at --image-size (224).
2. train       train.main as a user runs it: bf16 autocast, channels_last, pinned uint8 batches from
               --loader-workers 4, --weights none. One eager run (Cardiomegaly).
3. cpu_vs_gpu  that run's best.pt on a fixed batch of cached images: CPU fp32 against the device in
               fp32 (TF32 off) and under the autocast that training and submission use; max abs diff
               of the [-1, 1] outputs must stay under --tol-fp32 / --tol-autocast.
4. submission  make_submission.main on the device, then the CSV checked again (header, Ids, values).
5. timing      at each --batch-sizes (64 256): images/s of train.train_one_epoch over the cached
               images (train.py's loader: EpochSampler, workers, pinned memory, uint8) against the
               bare step (the same model, forward + backward + AdamW on a uint8 batch already on the
               device, channels_last, the same autocast). Targets: loop / bare >= 0.95, and loop
               >= 2,500 images/s for ResNet-50 at 224 px on one H100.
6. compiled    train.main --compile --multi-head --pathology all (one batch shape: one compilation).
7. ddp         torchrun --standalone --nproc_per_node 2 train.py, when 2+ GPUs are visible
               (--ddp on with --dry-run: 2 CPU processes over gloo).
The exit status is 1, after a line 'GPU CHECK FAILED: ...', when any check fails (a tolerance
failure included: the later sections still run); 0 otherwise. Missed speed targets are reported,
not failures. --dry-run: CPU, 32 px, 24 patients, batch 8, a few timing steps, no compile.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import make_submission  # noqa: E402
import train  # noqa: E402
from cache import cached_table
from common import format_table, write_text
from dataset import XrayDataset, read_train_csv
from demo import make_demo
from common import jsonable  # noqa: E402
from model import build_model, load_checkpoint, model_config  # noqa: E402

PATHOLOGY = "Cardiomegaly"
TARGET_RATIO = 0.95
TARGET_IMAGES_PER_S = 2500  # ResNet-50, 224 px, one H100


def log(*a) -> None:
    print(*a, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON report, rewritten after each section")
    p.add_argument("--work", type=Path, help="folder for data, caches and checkpoints (default: a new temporary one)")
    p.add_argument("--dry-run", action="store_true", help="CPU, 32 px, a few images: check the script itself")
    p.add_argument("--image-size", type=int, help="default 224 (32 with --dry-run)")
    p.add_argument("--patients", type=int, help="demo training patients, about 1.9 images each (default 150; 24 dry)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each train.main run")
    p.add_argument("--batch-size", type=int, help="batch of the eager train.main run (default 64; 8 dry)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="timing batch sizes (default 64 256; 8 dry)")
    p.add_argument("--timing-images", type=int, help="images per timed epoch (default 7680; 48 dry)")
    p.add_argument("--loader-workers", type=int, help="DataLoader workers (default 4; 2 dry)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="section 6 (default on; off dry)")
    p.add_argument("--timing-compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also time loop and bare step under torch.compile (one more compilation per batch size)")
    p.add_argument("--ddp", choices=["auto", "on", "off"], default="auto",
                   help="section 7: auto = when 2+ GPUs are visible; on with --dry-run: 2 CPU processes")
    p.add_argument("--tol-fp32", type=float, default=2e-3, help="max abs diff, CPU fp32 vs device fp32")
    p.add_argument("--tol-autocast", type=float, default=3e-2, help="max abs diff, CPU fp32 vs device autocast")
    args = p.parse_args(argv)
    dry = args.dry_run
    for name, full, small in [("image_size", 224, 32), ("patients", 150, 24), ("batch_size", 64, 8),
                              ("batch_sizes", [64, 256], [8]), ("timing_images", 7680, 48),
                              ("loader_workers", 4, 2), ("compile", True, False)]:
        if getattr(args, name) is None:
            setattr(args, name, small if dry else full)
    if not dry and not torch.cuda.is_available():
        p.error("no CUDA device is visible; use --dry-run to check the script on CPU")
    return args


class Report:
    """Checks, numbers and the JSON file, rewritten after every section."""

    def __init__(self, path: Path, env: dict):
        self.path, self.data = path, {"env": env, "checks": {}, "sections": {}, "timing": [], "ok": None}

    def check(self, name: str, ok: bool, detail: str = "", **numbers) -> bool:
        self.data["checks"][name] = {"ok": bool(ok), "detail": detail, **numbers}
        log(f"  [{'ok' if ok else 'FAILED'}] {name}: {detail}")
        return ok

    def section(self, name: str, seconds: float, **info) -> None:
        self.data["sections"][name] = {"seconds": round(seconds, 2), **info}
        self.save()

    def save(self) -> None:
        write_text(self.path, json.dumps(jsonable(self.data), indent=2))

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.data["checks"].items() if not v["ok"]]


def run_section(report: Report, name: str, fn, *a):
    """Run one section; an exception fails it (traceback on stderr) and the next section runs."""
    log(f"\n== {name}")
    t0 = time.time()
    try:
        result = fn(*a)
    except (Exception, SystemExit) as e:
        traceback.print_exc()
        sys.stderr.flush()
        report.check(name, False, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        result = None
    report.section(name, time.time() - t0)
    return result


def environment(args, device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "device": str(device), "dry_run": args.dry_run, "image_size": args.image_size}
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    return env


# ---------------------------------------------------------------------------------------------
# Sections

def make_data(args, work: Path, report: Report):
    root = make_demo(work / "demo_data", n_train_patients=args.patients, n_test_patients=max(4, args.patients // 8),
                     progress=False)
    csv = root / "student_labels" / "train2023.csv"
    table, cache = cached_table(read_train_csv(csv), root, args.image_size, work / "cache", csv.stem,
                                workers=min(16, os.cpu_count() or 1), progress=False)
    report.check("data", len(table) > 0, f"{len(table)} training rows cached at {args.image_size} px", n_images=len(table))
    return root, table, cache


def train_argv(args, work: Path, root: Path, device: str, out: str, *extra) -> list[str]:
    return ["--data-root", str(root), "--cache-dir", str(work / "cache"), "--out-dir", str(work / out),
            "--image-size", str(args.image_size), "--epochs", str(args.epochs), "--weights", "none",
            "--patience", "0", "--device", device, "--loader-workers", str(args.loader_workers),
            "--workers", str(min(16, os.cpu_count() or 1)), "--no-progress", *extra]


def check_run(report: Report, name: str, out: Path, folder: str, epochs: int) -> dict:
    history = pd.read_csv(out / folder / "history.csv")
    finite = bool(np.isfinite(history[["train_loss", "val_loss"]].to_numpy()).all())
    ok = (out / folder / "best.pt").is_file() and len(history) == epochs and finite
    last = history.iloc[-1]
    report.check(name, ok, f"{len(history)} epochs, train loss {last['train_loss']:.4f}, val loss {last['val_loss']:.4f}, "
                 f"{last['train_images_per_s']:.0f} train images/s in the last epoch, epoch {last['seconds']:.1f}s",
                 train_images_per_s=float(last["train_images_per_s"]), epoch_seconds=float(last["seconds"]))
    return {"history": history.to_dict("records")}


def train_eager(args, work: Path, root: Path, device: str, report: Report):
    train.main(train_argv(args, work, root, device, "ckpt/eager", "--pathology", PATHOLOGY,
                          "--batch-size", str(args.batch_size)))
    return check_run(report, "train_eager", work / "ckpt" / "eager", "cardiomegaly", args.epochs)


def train_compiled(args, work: Path, root: Path, device: str, report: Report):
    # a batch larger than the training rows: every step has one shape, so one compilation
    train.main(train_argv(args, work, root, device, "ckpt/compiled", "--pathology", "all", "--multi-head",
                          "--compile", "--batch-size", "512"))
    return check_run(report, "train_compiled", work / "ckpt" / "compiled", "multi_head", args.epochs)


def train_ddp(args, work: Path, root: Path, device: str, report: Report):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
           *train_argv(args, work, root, device, "ddp", "--pathology", PATHOLOGY, "--batch-size", str(args.batch_size))]
    log("  " + " ".join(cmd))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        log(proc.stdout[-3000:] + proc.stderr[-3000:])
        report.check("train_ddp", False, f"torchrun exited {proc.returncode}")
        return None
    return check_run(report, "train_ddp", work / "ddp", "cardiomegaly", args.epochs)


def runtime(device: str, emulate_autocast: bool = False) -> train.Runtime:
    """The Runtime train.py makes for this device (autocast on CUDA: bf16 or fp16). The dry run's
    CPU-vs-device check emulates the device's autocast with CPU bf16, so its tolerance path runs."""
    rt = train.setup_runtime(argparse.Namespace(device=device, amp=True, progress=False), distributed=False)
    if emulate_autocast and rt.amp_dtype is None:
        rt.amp_dtype = torch.bfloat16
    return rt


def cpu_vs_device(args, work: Path, cache, table: pd.DataFrame, rt: train.Runtime, report: Report):
    path = work / "ckpt" / "eager" / "cardiomegaly" / "best.pt"
    x = cache.get(table["slot"].to_numpy()[:32])
    cpu_model, _ = load_checkpoint(path, "cpu")
    with torch.no_grad():
        ref = cpu_model(x).float()
        model, _ = load_checkpoint(path, rt.device)
        if rt.cuda:
            model.to(memory_format=torch.channels_last)
        xd = x.to(rt.device).contiguous(memory_format=torch.channels_last)
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            fp32 = model(xd).float().cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        with rt.autocast():
            amp = model(xd).float().cpu()
    d32, damp = (fp32 - ref).abs(), (amp - ref).abs()
    spread = float(ref.std())
    report.check("cpu_vs_device_fp32", float(d32.max()) < args.tol_fp32,
                 f"max abs diff {float(d32.max()):.2e} (tolerance {args.tol_fp32:g}) over {len(x)} images",
                 max_abs=float(d32.max()), mean_abs=float(d32.mean()), tolerance=args.tol_fp32)
    report.check("cpu_vs_device_autocast", float(damp.max()) < args.tol_autocast,
                 f"max abs diff {float(damp.max()):.2e}, mean {float(damp.mean()):.2e} under {rt.amp_dtype} "
                 f"(tolerance {args.tol_autocast:g}; outputs' spread {spread:.3f})",
                 max_abs=float(damp.max()), mean_abs=float(damp.mean()), tolerance=args.tol_autocast,
                 amp_dtype=str(rt.amp_dtype), output_std=spread)


def submission(args, work: Path, root: Path, device: str, report: Report):
    out = work / "submission.csv"
    result = make_submission.main(["--data-root", str(root), "--checkpoints", str(work / "ckpt"), "--out", str(out),
                                   "--ensemble", "--fill-missing", "0", "--cache-dir", str(work / "cache"),
                                   "--device", device, "--no-progress", "--workers", str(min(16, os.cpu_count() or 1))])
    ids = pd.read_csv(root / "student_labels" / "test_ids.csv")["Id"]
    make_submission.check_submission(out, ids)  # raises (and so fails the section) on any fault
    values = result["submission"].drop(columns="Id").to_numpy()
    report.check("submission", len(result["submission"]) == len(ids),
                 f"{out.name}: {len(ids)} rows checked, values in [{values.min():.3f}, {values.max():.3f}], "
                 f"{result['seconds']['predict']:.2f}s predicting on {device}", rows=len(ids))


def make_loader(table: pd.DataFrame, cache, n: int, batch_size: int, workers: int, rt: train.Runtime):
    """train.py's training loader over n images (the cached rows repeated): EpochSampler with the
    label-balancing weights, batches of uint8 from the cache, workers, pinned memory on CUDA."""
    slots = np.resize(table["slot"].to_numpy(), n)
    targets = np.resize(np.nan_to_num(table[PATHOLOGY].to_numpy(np.float32), nan=0.0), n).reshape(n, 1)
    data = XrayDataset([cache], slots, targets)
    sampler = train.EpochSampler(train.sample_weights(targets), n, batch_size, seed=0)
    return train.train_loader(data, sampler, workers, rt), sampler


def new_model(rt: train.Runtime, compile_it: bool):
    torch.manual_seed(0)
    model = build_model(model_config([PATHOLOGY])).to(rt.device)
    if rt.cuda:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    return model, (torch.compile(model) if compile_it else model), opt, scaler


def sync(rt: train.Runtime) -> None:
    if rt.cuda:
        torch.cuda.synchronize(rt.device)


def loop_images_per_s(table, cache, batch_size: int, n: int, workers: int, rt, compile_it: bool) -> float:
    """images/s of train.train_one_epoch, best of two epochs after a warm-up epoch."""
    loader, sampler = make_loader(table, cache, n, batch_size, workers, rt)
    model, net, opt, scaler = new_model(rt, compile_it)
    rates = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        sync(rt)
        t0 = time.perf_counter()
        train.train_one_epoch(net, loader, opt, None, scaler, rt, [], "timing")  # ends in .item(): synchronised
        seconds = time.perf_counter() - t0
        if epoch:
            rates.append(n / seconds)
    train.close_loader(loader)  # its workers ignore SIGTERM: stopped here, not at the interpreter's exit
    return max(rates)


def bare_images_per_s(batch_size: int, n: int, size: int, rt, compile_it: bool) -> float:
    """The floor: forward + backward + AdamW on one uint8 batch already on the device, n images' worth."""
    model, net, opt, scaler = new_model(rt, compile_it)
    model.train()
    x = torch.randint(0, 256, (batch_size, 1, size, size), dtype=torch.uint8, device=rt.device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.rand(batch_size, 1, device=rt.device) * 2 - 1
    mask = torch.ones_like(y, dtype=torch.bool)

    def step():
        with rt.autocast():
            pred = net(x)
        loss = train.masked_mse(pred.float(), y, mask)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    steps = max(1, n // batch_size)
    for _ in range(min(5, steps)):
        step()
    rates = []
    for _ in range(2):
        sync(rt)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(rt)
        rates.append(steps * batch_size / (time.perf_counter() - t0))
    return max(rates)


def timing(args, table, cache, rt: train.Runtime, report: Report):
    loader, _ = make_loader(table, cache, 2 * args.batch_sizes[0], args.batch_sizes[0], args.loader_workers, rt)
    images = next(iter(loader))[0]
    train.close_loader(loader)
    report.check("loader_uint8_pinned", images.dtype == torch.uint8 and (images.is_pinned() or not rt.cuda),
                 f"loader batch {tuple(images.shape)} {images.dtype}, pinned {images.is_pinned()}")
    rows = []
    for compile_it in [False] + ([True] if args.timing_compile else []):
        for bs in args.batch_sizes:
            n = max(bs * 2, args.timing_images // bs * bs)
            log(f"  batch {bs}{' compiled' if compile_it else ''}: {n} images per timed epoch")
            bare = bare_images_per_s(bs, n, args.image_size, rt, compile_it)
            loop = loop_images_per_s(table, cache, bs, n, args.loader_workers, rt, compile_it)
            row = {"batch": bs, "compiled": compile_it, "bare_images_per_s": round(bare, 1),
                   "loop_images_per_s": round(loop, 1), "ratio": round(loop / bare, 3),
                   "ratio_target_met": loop / bare >= TARGET_RATIO, "rate_target_met": loop >= TARGET_IMAGES_PER_S}
            log(f"  batch {bs}: bare {bare:.1f} images/s, loop {loop:.1f} images/s, ratio {loop / bare:.3f}")
            rows.append(row)
            report.data["timing"] = rows
            report.save()
    return rows


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    device = "cpu" if args.dry_run else "cuda"
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    rt = runtime(device)
    report = Report(args.out, environment(args, rt.device))
    report.data["env"]["amp_dtype"] = str(rt.amp_dtype)
    log(f"gpu_check: {report.data['env']}\nwork folder {work}, report {args.out}")
    if rt.cuda:
        cap = torch.cuda.get_device_capability(rt.device)
        report.check("autocast_dtype", rt.amp_dtype == (torch.bfloat16 if cap >= (8, 0) else torch.float16),
                     f"{rt.amp_dtype} on compute capability {cap[0]}.{cap[1]}")

    data = run_section(report, "data", make_data, args, work, report)
    if data is None:
        return finish(report, t_start)
    root, table, cache = data
    trained = run_section(report, "train_eager", train_eager, args, work, root, device, report)
    if trained is not None:
        run_section(report, "cpu_vs_device", cpu_vs_device, args, work, cache, table, runtime(device, True), report)
    run_section(report, "submission", submission, args, work, root, device, report)
    run_section(report, "timing", timing, args, table, cache, rt, report)
    if args.compile:
        run_section(report, "train_compiled", train_compiled, args, work, root, device, report)
    n_gpus = torch.cuda.device_count() if rt.cuda else 0
    if args.ddp == "on" or (args.ddp == "auto" and n_gpus >= 2):
        run_section(report, "train_ddp", train_ddp, args, work, root, device, report)
    else:
        log(f"\n== train_ddp: skipped ({n_gpus} GPU(s) visible; --ddp {args.ddp})")
    return finish(report, t_start)


def finish(report: Report, t_start: float) -> int:
    checks = [{"check": k, "status": "ok" if v["ok"] else "FAILED", "detail": v["detail"]}
              for k, v in report.data["checks"].items()]
    log("\n" + format_table(checks, ["check", "status", "detail"]))
    if report.data["timing"]:
        log("\n" + format_table(report.data["timing"], ["batch", "compiled", "bare_images_per_s", "loop_images_per_s",
                                                         "ratio", "ratio_target_met", "rate_target_met"]))
        log(f"targets: loop / bare >= {TARGET_RATIO}, loop >= {TARGET_IMAGES_PER_S} images/s "
            f"(ResNet-50, 224 px, one H100)")
    failed = report.failed
    report.data["ok"] = not failed
    report.data["seconds"] = round(time.time() - t_start, 1)
    report.save()
    env = report.data["env"]
    log(f"\n{env.get('gpu', env['device'])}, torch {env['torch']}, {report.data['seconds']:.0f}s; report in {report.path}")
    if failed:
        log(f"GPU CHECK FAILED: {', '.join(failed)}")
        return 1
    log("GPU CHECK PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
