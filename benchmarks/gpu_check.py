"""Check every code path that only runs on a GPU, end to end on data it makes itself, and measure
the training loop's speed and memory.

    python benchmarks/gpu_check.py --out gpu_check.json     # one CUDA machine, no network: ~6-8 minutes
    python benchmarks/gpu_check.py --dry-run                # the same code paths on CPU at 32 px: ~2-3 minutes
    python benchmarks/gpu_check.py --work /tmp/gc --only memory timing   # redo some sections

Sections, in the order they run. Each prints progress lines and its checks; the JSON report (--out)
is rewritten after each one, so a run cut short keeps what finished. --only NAME [NAME ...] runs
those (and the data, and the eager run when a section needs it and --work lacks it) and replaces
them in an existing report.
 1. data        the synthetic demo dataset (demo.make_demo), cached at --image-size (224; 32 dry).
 2. train_eager train.main as a user runs it, 2 epochs of Cardiomegaly, --weights none,
                --loader-workers 4: records the autocast dtype runtime.amp_dtype_for chose (bf16 from
                compute capability 8.0, else fp16 with a scaler) and the card's capability, and checks,
                inside train_step, that batches arrive as pinned uint8 and the model is channels_last.
 3. resume      a train.py subprocess with the same flags gets SIGTERM (sent by this script to its
                process group, as SLURM signals a job step, when the child reaches epoch 2 batch 1)
                and must exit 130 with last.pt at that batch; then `train.py --resume` in a new process
                runs to the end, and its history and its outputs on a fixed batch (final weights,
                best.pt) are compared with the uninterrupted run (section 2): bit-identical on CPU,
                within --tol-resume on the device (not bit-deterministic; a second uninterrupted run
                gives the noise floor). Then
                --resume of the finished run must return at once and change no file.
 4. grid        experiments/gridsearch.py, a 2-configuration grid with --shard 1/2, twice: the second
                run trains nothing ('already finished') and leaves results.csv byte for byte the same.
 5. variants    --multi-head (all pathologies), --head-type three-class, --ema 0.999 --accum-steps 2:
                1 epoch each; each best.pt loads on the CPU and predicts in [-1, 1].
 6. cpu_vs_gpu  section 2's best.pt on a fixed batch: CPU fp32 against the device in fp32 (TF32 off)
                and under the training/submission autocast: max abs diff under --tol-fp32 /
                --tol-autocast (the dry run emulates the autocast with CPU bf16).
 7. submission  make_submission.main on the device over the checkpoints so far, the CSV checked again.
 8. timing      ResNet-50 at --batch-sizes (64 256): images/s of the real training path
                (train.train_one_epoch: EpochSampler, loader workers, pinned uint8, --augment none),
                of train.train_step on a batch already on the device, and of the bare step (forward,
                backward, AdamW; same model and autocast). Targets loop / bare >= 0.95 and >= 2,500
                images/s: reported, never failed. Then train_step images/s, eager, of --timm-archs
                (timm/convnext_tiny, timm/vit_small_patch16_224) at 224 px, batch 64.
 9. memory      peak GPU memory (torch.cuda.max_memory_allocated, and the allocator's reserved peak)
                of one training step at batch 32 for ResNet-50, DenseNet-121 and timm/convnext_tiny at
                224, 384 and 512 px, with and without --grad-checkpointing; 'OOM' where it does not fit.
10. compiled    train.main --compile, 2 epochs, one batch shape (one compilation); best.pt loads.
                It runs late because its compilation is the slowest and least predictable step.
11. ddp         torchrun --standalone --nproc_per_node 2 train.py when 2+ GPUs are visible (in the dry
                run: 2 CPU processes over gloo); otherwise skipped with a note.
The exit status is 1, after a line 'GPU CHECK FAILED: ...', when any check fails (the later sections
still run); 0 otherwise. Speed targets are reported, not checked. --dry-run: CPU, 32 px, 24 patients,
ResNet-18, batch 8, a few timing steps, a tiny memory section (CUDA-only numbers 'n/a on CPU'), no
compile.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import make_submission  # noqa: E402
import train  # noqa: E402
from cache import cached_table  # noqa: E402
from common import format_table, jsonable, write_text  # noqa: E402
from dataset import read_train_csv  # noqa: E402
from demo import make_demo  # noqa: E402
from experiments import gridsearch  # noqa: E402
from model import Checkpoint, load_checkpoint  # noqa: E402
from runtime import close_loader, setup_runtime  # noqa: E402

SECTIONS = ["data", "train_eager", "resume", "grid", "variants", "cpu_vs_gpu", "submission", "timing", "memory",
            "compiled", "ddp"]
NEEDS_EAGER = {"resume", "cpu_vs_gpu", "submission"}  # read section 2's run
PATHOLOGY, FOLDER = "Cardiomegaly", "cardiomegaly"
TARGET_RATIO = 0.95
TARGET_IMAGES_PER_S = 2500  # ResNet-50, 224 px, one H100
STOP_AT = (1, 1)  # resume section: SIGTERM while the child is at epoch 2 (0-based 1), batch 1 of 0-based
N_FIXED = 32  # images in the fixed batch that outputs are compared on
GIB = 2 ** 30
# usable GiB of the card classes docs/training.md talks about, a little under the smallest of each
# (an A10 "24 GB" has 22.5 GiB, an RTX 4090 24.0; an H100 "80 GB" 79.6, an A100 80.0)
CARDS_GIB = {"fits_24gb": 22.0, "fits_80gb": 78.0}


def log(*a) -> None:
    print(*a, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON report, rewritten after each section")
    p.add_argument("--work", type=Path, help="folder for data, caches and checkpoints (default: a new temporary one); "
                   "reuse it with --only")
    p.add_argument("--dry-run", action="store_true", help="CPU, 32 px, a few images: check the script itself")
    p.add_argument("--only", nargs="+", choices=SECTIONS, metavar="NAME",
                   help=f"run these sections only (of {', '.join(SECTIONS)}), replacing them in an existing --out")
    p.add_argument("--max-minutes", type=float, help="start no section after this many minutes (they are listed "
                   "as not run), so the report's summary is written before an outer time limit")
    p.add_argument("--image-size", type=int, help="default 224 (32 with --dry-run)")
    p.add_argument("--patients", type=int, help="demo training patients, about 1.9 images each (default 150; 24 dry)")
    p.add_argument("--arch", help="backbone of the train.py runs (default resnet50; resnet18 dry)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the eager, resume and compiled runs")
    p.add_argument("--batch-size", type=int, help="batch of the train.py runs (default 64; 8 dry)")
    p.add_argument("--loader-workers", type=int, help="DataLoader workers (default 4; 2 dry)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="timing batch sizes (default 64 256; 8 dry)")
    p.add_argument("--timing-images", type=int, help="images per timed epoch (default 7680; 48 dry)")
    p.add_argument("--timing-arch", help="backbone timed against the bare step (default resnet50; resnet18 dry)")
    p.add_argument("--timing-repeats", type=int, help="timed epochs (after a warm-up one), and timed runs of the "
                   "device-batch steps; the best counts (default 2; 1 dry)")
    p.add_argument("--timm-archs", nargs="*", help="timm models whose train_step is timed at batch 64 "
                   "(default timm/convnext_tiny timm/vit_small_patch16_224; dry: their smallest siblings, "
                   "timm/convnext_atto timm/vit_tiny_patch16_224)")
    p.add_argument("--timm-steps", type=int, help="timed train_step calls per timm model (default 20; 2 dry)")
    p.add_argument("--memory-archs", nargs="*", help="default resnet50 densenet121 timm/convnext_tiny "
                   "(resnet18 timm/convnext_atto dry)")
    p.add_argument("--memory-sizes", type=int, nargs="+", help="default 224 384 512 (32 dry)")
    p.add_argument("--memory-batch", type=int, help="default 32 (4 dry)")
    p.add_argument("--threads", type=int, help="CPU threads of this process and its children (default: torch's; 1 dry, "
                   "where on a shared 2-core machine two threads per process run several times slower than one)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="the compiled section (default on; "
                   "off dry)")
    p.add_argument("--compile-batch-size", type=int, default=512,
                   help="batch of the compiled run: more than its training rows, so every step has one shape")
    p.add_argument("--ddp", choices=["auto", "on", "off"], default="auto",
                   help="auto: when 2+ GPUs are visible, and in the dry run (2 CPU processes over gloo)")
    p.add_argument("--tol-fp32", type=float, default=2e-3, help="max abs diff, CPU fp32 vs device fp32")
    p.add_argument("--tol-autocast", type=float, default=3e-2, help="max abs diff, CPU fp32 vs device autocast")
    p.add_argument("--tol-resume", type=float, default=0.05,
                   help="on the device: max abs diff of val_loss and of best.pt's outputs, resumed vs uninterrupted "
                   "(on CPU they must be equal)")
    args = p.parse_args(argv)
    dry = args.dry_run
    for name, full, small in [("image_size", 224, 32), ("patients", 150, 24), ("arch", "resnet50", "resnet18"),
                              ("batch_size", 64, 8), ("loader_workers", 4, 2), ("batch_sizes", [64, 256], [8]),
                              ("timing_images", 7680, 16), ("timing_arch", "resnet50", "resnet18"),
                              ("timing_repeats", 2, 1),
                              ("timm_archs", ["timm/convnext_tiny", "timm/vit_small_patch16_224"],
                               ["timm/convnext_atto", "timm/vit_tiny_patch16_224"]),
                              ("timm_steps", 20, 1),
                              ("memory_archs", ["resnet50", "densenet121", "timm/convnext_tiny"],
                               ["resnet18", "timm/convnext_atto"]),
                              ("memory_sizes", [224, 384, 512], [32]), ("memory_batch", 32, 4),
                              ("compile", True, False)]:
        if getattr(args, name) is None:
            setattr(args, name, small if dry else full)
    if not dry and not torch.cuda.is_available():
        p.error("no CUDA device is visible; use --dry-run to check the script on CPU")
    return args


# ---------------------------------------------------------------------------------------------
# The report

class Report:
    """Sections, their checks and numbers, and the JSON file, rewritten after every section."""

    def __init__(self, path: Path, env: dict, keep_from: dict | None = None):
        self.path = path
        self.data = {"env": env, "ok": None, "failed": [], "not_run": [], "seconds": None, "sections": {}}
        if keep_from:  # --only: the other sections of the last report stay
            self.data["sections"] = keep_from.get("sections", {})
        self.current: dict = {}

    def start(self, name: str) -> None:
        self.current = self.data["sections"][name] = {"ok": None, "seconds": None, "checks": {}}

    def check(self, name: str, ok: bool, detail: str = "", **numbers) -> bool:
        self.current["checks"][name] = {"ok": bool(ok), "detail": detail, **numbers}
        log(f"  [{'ok' if ok else 'FAILED'}] {name}: {detail}")
        return bool(ok)

    def record(self, **numbers) -> None:
        self.current.update(numbers)

    def end(self, seconds: float) -> None:
        self.current["seconds"] = round(seconds, 2)
        self.current["ok"] = all(c["ok"] for c in self.current["checks"].values())
        self.save()

    def save(self) -> None:
        self.data["failed"] = [f"{s}/{c}" for s, sec in self.data["sections"].items()
                               for c, v in sec.get("checks", {}).items() if not v["ok"]]
        write_text(self.path, json.dumps(jsonable(self.data), indent=2))


@dataclass
class Ctx:
    """What the sections share."""
    args: argparse.Namespace
    work: Path
    device: str          # 'cuda' or 'cpu'
    rt: train.Runtime    # this process's runtime (the device, its autocast)
    report: Report
    root: Path | None = None
    table: pd.DataFrame | None = None
    cache: object = None
    fixed: torch.Tensor | None = None  # uint8 (N_FIXED, 1, S, S): outputs are compared on it

    @property
    def cuda(self) -> bool:
        return self.rt.cuda


def run_section(ctx: Ctx, name: str, fn, index: int, total: int, t_start: float) -> None:
    """Run one section; an exception fails it (traceback on stderr) and the next section runs."""
    log(f"\n== [{index}/{total}] {name}  (at {time.time() - t_start:.0f}s)")
    ctx.report.start(name)
    t0 = time.time()
    try:
        fn(ctx)
    except (Exception, SystemExit) as e:
        traceback.print_exc()
        sys.stderr.flush()
        first = str(e).splitlines()[0] if str(e) else ""
        ctx.report.check(name, False, f"raised {type(e).__name__}: {first}"[:300])
    finally:
        free_memory()
    ctx.report.end(time.time() - t0)
    log(f"   {name}: {'ok' if ctx.report.current['ok'] else 'FAILED'} in {time.time() - t0:.1f}s")


def attempt(ctx: Ctx, name: str, fn, *a):
    """fn(*a), or a failed check `name` when it raises: one part of a section failing does not stop
    the others."""
    try:
        return fn(*a)
    except (Exception, SystemExit) as e:
        traceback.print_exc()
        sys.stderr.flush()
        first = str(e).splitlines()[0] if str(e) else ""
        ctx.report.check(name, False, f"raised {type(e).__name__}: {first}"[:300])
        return None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(rt: train.Runtime) -> None:
    if rt.cuda:
        torch.cuda.synchronize(rt.device)


class Tee(io.TextIOBase):
    """stdout that is also kept, to look for a line that a run printed."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.parts.append(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    @property
    def text(self) -> str:
        return "".join(self.parts)


def environment(args, rt: train.Runtime) -> dict:
    import timm
    import torchvision
    env = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "timm": timm.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(rt.device),
           "dry_run": args.dry_run, "image_size": args.image_size,
           "arch": args.arch, "amp_dtype": str(rt.amp_dtype), "argv": sys.argv[1:],
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if rt.cuda:
        props = torch.cuda.get_device_properties(rt.device)
        env.update(gpu=props.name, gpus=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / GIB, 1),
                   capability=f"{props.major}.{props.minor}")
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return env


# ---------------------------------------------------------------------------------------------
# Training runs as a user runs them

def train_flags(ctx: Ctx, out: Path, *extra, epochs: int | None = None) -> list[str]:
    """A train.py argv on the demo data under --work; extra flags last (they win)."""
    a = ctx.args
    return ["--data-root", str(ctx.root), "--cache-dir", str(ctx.work / "cache"), "--out-dir", str(out),
            "--image-size", str(a.image_size), "--epochs", str(epochs or a.epochs), "--weights", "none",
            "--arch", a.arch, "--batch-size", str(a.batch_size), "--patience", "0", "--device", ctx.device,
            "--loader-workers", str(a.loader_workers), "--workers", str(min(16, os.cpu_count() or 1)),
            "--no-progress", *extra]


def eager_flags(ctx: Ctx, out: Path) -> list[str]:
    """Section 2's command, which section 3 interrupts and resumes."""
    return train_flags(ctx, out, "--pathology", PATHOLOGY)


def eager_folder(ctx: Ctx) -> Path:
    return ctx.work / "ckpt" / "eager" / FOLDER


def eager_done(ctx: Ctx) -> bool:
    f = eager_folder(ctx)
    return (f / "best.pt").is_file() and (f / "history.csv").is_file() and \
        len(pd.read_csv(f / "history.csv")) == ctx.args.epochs


def scores(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, Checkpoint]:
    """A checkpoint loaded on the CPU, as make_submission.py loads it: its scores (N, K) float32 on x."""
    model, ckpt = load_checkpoint(path, "cpu")
    with torch.no_grad():
        return model.score(model(x)).float(), ckpt


def check_trained(ctx: Ctx, name: str, folder: Path, epochs: int) -> dict:
    """A finished run's folder: history.csv has `epochs` finite rows; best.pt loads on the CPU and
    predicts the fixed batch, one finite column per pathology in [-1, 1]."""
    history = pd.read_csv(folder / "history.csv")
    finite = bool(np.isfinite(history[["train_loss", "val_loss"]].to_numpy()).all())
    s, ckpt = scores(folder / "best.pt", ctx.fixed)
    shape_ok = tuple(s.shape) == (len(ctx.fixed), len(ckpt.pathologies))
    in_range = bool(torch.isfinite(s).all() and s.min() >= -1 and s.max() <= 1)
    last = history.iloc[-1]
    ctx.report.check(name, len(history) == epochs and finite and shape_ok and in_range,
                     f"{len(history)}/{epochs} epochs, val loss {last['val_loss']:.4f}, best.pt (epoch {ckpt.epoch}, "
                     f"{len(ckpt.pathologies)} output(s)) predicts in [{float(s.min()):.3f}, {float(s.max()):.3f}] "
                     f"on the CPU; {last['train_images_per_s']:.0f} train images/s in the last epoch",
                     epochs=len(history), val_loss=float(last["val_loss"]), best_epoch=ckpt.epoch,
                     outputs=len(ckpt.pathologies), score_min=float(s.min()), score_max=float(s.max()),
                     train_images_per_s=float(last["train_images_per_s"]), epoch_seconds=float(last["seconds"]))
    return {"history": history.to_dict("records")}


def run_logged(ctx: Ctx, cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Start cmd in the repo, unbuffered, output to log_path, in its own process group (with
    --threads, that many CPU threads)."""
    shown = [*cmd[:2], "<gpu_check.interrupted_child>", *cmd[3:]] if cmd[1] == "-c" else cmd
    log("  $ " + " ".join(shown))
    threads = {"OMP_NUM_THREADS": str(ctx.args.threads)} if ctx.args.threads else {}
    out = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), **threads},
                                start_new_session=True)
    finally:
        out.close()


def tail(path: Path, n: int = 12) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    | " + line for line in lines[-n:])


# ---------------------------------------------------------------------------------------------
# 1-2: data, train eager

def section_data(ctx: Ctx) -> None:
    a = ctx.args
    root = ctx.work / "demo_data"
    if not (root / "student_labels" / "train2023.csv").is_file():
        log(f"  making the demo dataset: {a.patients} training patients in {root}")
        tmp = ctx.work / "demo_data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_demo(tmp, n_train_patients=a.patients, n_test_patients=max(4, a.patients // 8), progress=False)
        tmp.rename(root)
    csv = root / "student_labels" / "train2023.csv"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dropped \\d+ (stray rows|rows whose image)")
        table, cache = cached_table(read_train_csv(csv), root, a.image_size, ctx.work / "cache", csv.stem,
                                    workers=min(16, os.cpu_count() or 1), progress=False)
    ctx.root, ctx.table, ctx.cache = root, table, cache
    ctx.fixed = cache.get(table["slot"].to_numpy()[:N_FIXED])
    ctx.report.check("data", len(table) > 0,
                     f"{len(table)} training rows cached at {a.image_size} px in {cache.folder}",
                     n_images=len(table), n_labelled=int(table[PATHOLOGY].notna().sum()))


def section_train_eager(ctx: Ctx) -> None:
    seen: dict = {}
    real = train.train_step

    def spy(state, batches, args, rt):  # what the run's first step gets: batches, model, autocast
        if not seen:
            images = batches[0][0]
            conv = next(p for p in state.model.parameters() if p.dim() == 4)
            seen.update(dtype=str(images.dtype), pinned=images.is_pinned(), shape=list(images.shape),
                        channels_last=conv.is_contiguous(memory_format=torch.channels_last),
                        amp_dtype=str(rt.amp_dtype))
        return real(state, batches, args, rt)
    out = ctx.work / "ckpt" / "eager"
    shutil.rmtree(out, ignore_errors=True)
    train.train_step = spy
    try:
        train.main(eager_flags(ctx, out))
    finally:
        train.train_step = real
    check_trained(ctx, "train_eager", out / FOLDER, ctx.args.epochs)
    if ctx.cuda:
        cap = torch.cuda.get_device_capability(ctx.rt.device)
        want = torch.bfloat16 if cap >= (8, 0) else torch.float16
        ctx.report.check("autocast_dtype", seen.get("amp_dtype") == str(want),
                         f"{seen.get('amp_dtype')} on compute capability {cap[0]}.{cap[1]} (expected {want})",
                         amp_dtype=seen.get("amp_dtype"), capability=f"{cap[0]}.{cap[1]}")
        ok = seen.get("dtype") == "torch.uint8" and seen.get("pinned") and seen.get("channels_last")
    else:
        ctx.report.check("autocast_dtype", seen.get("amp_dtype") == "None", "no autocast on CPU",
                         amp_dtype=seen.get("amp_dtype"), capability="n/a on CPU")
        ok = seen.get("dtype") == "torch.uint8"
    ctx.report.check("batches_and_layout", bool(ok), f"first training batch {seen.get('shape')} {seen.get('dtype')}, "
                     f"pinned {seen.get('pinned')}, model channels_last {seen.get('channels_last')}"
                     + ("" if ctx.cuda else " (pinned and channels_last: CUDA only)"), **seen)


# ---------------------------------------------------------------------------------------------
# 3: interrupt and resume on the device

def interrupted_child(argv: list[str]) -> int:
    """The child of the resume section: `train.py ARGV` that, when training reaches (epoch, batch)
    (0-based), touches MARKER and waits there until the SIGTERM that the parent then sends has been
    received (by train.py's own StopSignals handler), so the signal lands at a known batch.
    argv: MARKER EPOCH BATCH then train.py's flags."""
    from common import run_cli
    marker, epoch, batch, flags = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3:]
    real = train.train_step

    def train_step(state, batches, args, rt):
        if (state.epoch, state.step) == (epoch, batch):
            marker.touch()
            handler = signal.getsignal(signal.SIGTERM)
            stop_signals = getattr(handler, "__self__", None)  # the StopSignals the loop watches
            t0 = time.time()
            while getattr(stop_signals, "requested", None) is None and time.time() - t0 < 120:
                time.sleep(0.01)
        return real(state, batches, args, rt)
    train.train_step = train_step
    return run_cli(train.main, flags)


CHILD = ("import sys; sys.path[:0] = [{root!r}, {bench!r}]; import gpu_check; "
         "sys.exit(gpu_check.interrupted_child(sys.argv[1:]))")


def run_files(folder: Path) -> dict:
    """What a finished run must not rewrite (summary.json it does rewrite, with the same content)."""
    names = ("best.pt", "last.pt", "history.csv", "val_predictions.csv")
    return {name: (folder / name).stat().st_mtime_ns for name in names if (folder / name).is_file()}


def compare_runs(ctx: Ctx, a: Path, b: Path) -> dict:
    """Two runs of one command: history rows, best.pt's epoch, the outputs of best.pt and last.pt (the
    final weights) on the fixed batch, last.pt's weights."""
    ha, hb = pd.read_csv(a / "history.csv"), pd.read_csv(b / "history.csv")
    sa, ca = scores(a / "best.pt", ctx.fixed)
    sb, cb = scores(b / "best.pt", ctx.fixed)
    fa, fb = scores(a / "last.pt", ctx.fixed)[0], scores(b / "last.pt", ctx.fixed)[0]
    la, lb = Checkpoint.load(a / "last.pt").state_dict, Checkpoint.load(b / "last.pt").state_dict

    def diff(col: str) -> float:
        return float(np.abs(ha[col].to_numpy() - hb[col].to_numpy()).max()) if len(ha) == len(hb) else float("inf")
    return {"epochs": [len(ha), len(hb)], "same_epochs": ha["epoch"].tolist() == hb["epoch"].tolist(),
            "best_epoch": [ca.epoch, cb.epoch], "train_loss_diff": diff("train_loss"),
            "val_loss_diff": diff("val_loss"), "val_mse_diff": diff("val_mse"),
            "output_diff": float((sa - sb).abs().max()), "last_output_diff": float((fa - fb).abs().max()),
            "last_weights_diff": max(float((la[k].float() - lb[k].float()).abs().max()) for k in la if la[k].numel())}


def section_resume(ctx: Ctx) -> None:
    a = ctx.args
    straight = eager_folder(ctx)
    out = ctx.work / "resume"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    flags = eager_flags(ctx, out)
    marker = out / "at_batch"
    epoch, batch = STOP_AT
    child = CHILD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"))
    proc = run_logged(ctx, [sys.executable, "-c", child, str(marker), str(epoch), str(batch), *flags],
                      out / "interrupted.log")
    t0 = time.time()
    while not marker.exists() and proc.poll() is None and time.time() - t0 < 600:
        time.sleep(0.02)
    sent = marker.exists() and proc.poll() is None
    if sent:  # the whole process group, loader workers too, as SLURM signals every process of a job step
        os.killpg(proc.pid, signal.SIGTERM)
        log(f"  sent SIGTERM to the child's process group after batch {batch} of epoch {epoch + 1} "
            f"({time.time() - t0:.1f}s after its start)")
    try:
        rc = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    log(tail(out / "interrupted.log", 6))
    last_path = out / FOLDER / "last.pt"
    last = Checkpoint.load(last_path) if last_path.is_file() else None
    ts = (last.training_state or {}) if last else {}
    step = ts.get("step", -1)
    ctx.report.check("interrupted", sent and rc == 130 and last is not None and last.interrupted and last.epoch == epoch
                     and step == batch + 1,
                     f"SIGTERM {'sent' if sent else 'NOT sent (the child never reached the batch)'}; exit {rc} "
                     f"(want 130); last.pt at epoch {getattr(last, 'epoch', None)} + {step} batches, interrupted "
                     f"{getattr(last, 'interrupted', None)} (want epoch {epoch} + {batch + 1})",
                     exit_code=rc, last_epoch=getattr(last, "epoch", None), last_step=step,
                     rng_streams=sorted(ts.get("rng", {})), optimizer_state=bool(ts.get("optimizer", {}).get("state")))
    if last is None:
        return

    t0 = time.time()
    proc = run_logged(ctx, [sys.executable, "train.py", *flags, "--resume"], out / "resumed.log")
    try:
        rc = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    text = (out / "resumed.log").read_text(errors="replace")
    log(tail(out / "resumed.log", 10))
    where = f"from epoch {epoch + 1} batch {batch + 1}"
    ctx.report.check("resumed", rc == 0 and where in text,
                     f"`train.py --resume` in a new process exited {rc}, "
                     f"{'resumed ' + where if where in text else 'no line saying ' + repr(where)}"
                     f" ({time.time() - t0:.1f}s; restores optimizer, scheduler, scaler and RNG streams "
                     f"{sorted(ts.get('rng', {}))} from last.pt loaded on the CPU)", exit_code=rc)
    if rc != 0:
        return

    cmp = compare_runs(ctx, straight, out / FOLDER)
    keys = ("train_loss_diff", "val_loss_diff", "val_mse_diff", "output_diff", "last_output_diff", "last_weights_diff")
    numbers = {k: cmp[k] for k in keys}
    same_epochs = cmp["same_epochs"] and cmp["epochs"][0] == a.epochs
    same_best = cmp["best_epoch"][0] == cmp["best_epoch"][1]
    if ctx.cuda:  # the noise floor: the same command again, uninterrupted
        again = ctx.work / "resume_straight2"
        shutil.rmtree(again, ignore_errors=True)
        train.main(eager_flags(ctx, again))
        noise = compare_runs(ctx, straight, again / FOLDER)
        numbers["noise_floor"] = {k: noise[k] for k in keys}
        # not bit-deterministic: when two epochs' val losses are that close, best.pt may be another epoch's
        ok = (same_epochs and cmp["val_loss_diff"] < a.tol_resume and cmp["last_output_diff"] < a.tol_resume
              and (not same_best or cmp["output_diff"] < a.tol_resume))
        rule = f"each < --tol-resume {a.tol_resume:g}; two uninterrupted runs differ by val loss " \
               f"{noise['val_loss_diff']:.2e}, final outputs {noise['last_output_diff']:.2e}"
    else:
        ok = same_epochs and same_best and all(v == 0 for v in numbers.values())
        rule = "bit-identical on CPU"
    ctx.report.check("resume_matches_uninterrupted", ok,
                     f"epochs {cmp['epochs']}, best epoch {cmp['best_epoch']}; max abs diff val loss "
                     f"{cmp['val_loss_diff']:.2e}, train loss {cmp['train_loss_diff']:.2e}, outputs of best.pt "
                     f"{cmp['output_diff']:.2e} and of the final weights {cmp['last_output_diff']:.2e}, last.pt "
                     f"weights {cmp['last_weights_diff']:.2e} ({rule})", best_epoch=cmp["best_epoch"], **numbers)

    before = run_files(out / FOLDER)
    t0 = time.time()
    with contextlib.redirect_stdout(Tee(sys.stdout)) as tee:
        [summary] = train.main(flags + ["--resume"])
    seconds = time.time() - t0
    ctx.report.check("resume_finished_run", "already finished" in tee.text and run_files(out / FOLDER) == before
                     and summary["epochs_run"] == a.epochs,
                     f"--resume of the finished run: "
                     f"{'already finished' if 'already finished' in tee.text else 'trained?'}"
                     f", {summary['epochs_run']} epochs, files unchanged {run_files(out / FOLDER) == before}, "
                     f"{seconds:.1f}s", seconds=round(seconds, 2))


# ---------------------------------------------------------------------------------------------
# 4-5: grid shard re-run, variants

def section_grid(ctx: Ctx) -> None:
    out = ctx.work / "grid"
    shutil.rmtree(out, ignore_errors=True)
    passthrough = train_flags(ctx, out, epochs=1)
    i = passthrough.index("--out-dir")
    del passthrough[i:i + 2]  # gridsearch gives each configuration its own
    argv = ["--pathology", PATHOLOGY, "--hidden", "32", "64", "--freeze", "0", "--lr", "3e-4", "--out-dir", str(out),
            "--shard", "1/2", *passthrough]
    t0 = time.time()
    rows = gridsearch.main(argv)
    first_s = time.time() - t0
    results = out / "results.csv"
    ctx.report.check("grid_first_run", len(rows) == 1 and results.is_file() and rows[0]["val_loss"] is not None,
                     f"shard 1/2 of 2 configurations trained {len(rows)}: {[r['config'] for r in rows]} "
                     f"in {first_s:.1f}s",
                     seconds=round(first_s, 2))
    before, files = results.read_bytes(), {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    t0 = time.time()
    with contextlib.redirect_stdout(Tee(sys.stdout)) as tee:
        rows2 = gridsearch.main(argv)
    second_s = time.time() - t0
    unchanged = results.read_bytes() == before and {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == files
    ctx.report.check("grid_rerun_trains_nothing", "already finished" in tee.text and "epoch 1/1" not in tee.text
                     and unchanged and len(rows2) == 1,
                     f"second run: {'already finished' if 'already finished' in tee.text else 'no already finished'}"
                     f" line, results.csv and checkpoints unchanged {unchanged}, {second_s:.1f}s",
                     seconds=round(second_s, 2))


VARIANTS = {"multi_head": (["--pathology", "all", "--multi-head"], "multi_head"),
            "three_class": (["--pathology", PATHOLOGY, "--head-type", "three-class"], FOLDER),
            "ema_accum": (["--pathology", PATHOLOGY, "--ema", "0.999", "--accum-steps", "2"], FOLDER)}


def section_variants(ctx: Ctx) -> None:
    for name, (extra, folder) in VARIANTS.items():
        out = ctx.work / "ckpt" / name
        shutil.rmtree(out, ignore_errors=True)
        log(f"  -- {name}: {' '.join(extra)}")

        def run():
            train.main(train_flags(ctx, out, *extra, epochs=1))
            check_trained(ctx, name, out / folder, 1)
        attempt(ctx, name, run)
    multi = ctx.work / "ckpt" / "multi_head" / "multi_head" / "best.pt"
    if multi.is_file():
        n, want = len(Checkpoint.load(multi).pathologies), len(ctx.table.attrs["labels"])
        ctx.report.check("multi_head_outputs", n == want, f"{n} heads, one per label column of the CSV")


# ---------------------------------------------------------------------------------------------
# 6-7: CPU vs device, submission

def section_cpu_vs_gpu(ctx: Ctx) -> None:
    a, rt = ctx.args, ctx.rt
    path = eager_folder(ctx) / "best.pt"
    x = ctx.fixed
    ref, _ = scores(path, x)
    model, _ = load_checkpoint(path, rt.device)
    if rt.cuda:
        model.to(memory_format=torch.channels_last)
    amp_dtype = rt.amp_dtype or torch.bfloat16  # the dry run emulates the device's autocast with CPU bf16
    xd = x.to(rt.device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            fp32 = model.score(model(xd)).float().cpu()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        with torch.autocast(rt.device.type, dtype=amp_dtype):
            amp = model.score(model(xd)).float().cpu()
    d32, damp = (fp32 - ref).abs(), (amp - ref).abs()
    spread = float(ref.std())
    where = "device" if rt.cuda else "CPU (dry run)"
    ctx.report.check("fp32", float(d32.max()) < a.tol_fp32,
                     f"CPU fp32 vs {where} fp32 (TF32 off): max abs diff {float(d32.max()):.2e} (tolerance "
                     f"{a.tol_fp32:g}) over {len(x)} images", max_abs=float(d32.max()), mean_abs=float(d32.mean()),
                     tolerance=a.tol_fp32)
    ctx.report.check("autocast", float(damp.max()) < a.tol_autocast,
                     f"CPU fp32 vs {where} {amp_dtype} autocast: max abs diff {float(damp.max()):.2e}, mean "
                     f"{float(damp.mean()):.2e} (tolerance {a.tol_autocast:g}; outputs' spread {spread:.3f})",
                     max_abs=float(damp.max()), mean_abs=float(damp.mean()), tolerance=a.tol_autocast,
                     amp_dtype=str(amp_dtype), output_std=spread)


def section_submission(ctx: Ctx) -> None:
    out = ctx.work / "submission.csv"
    result = make_submission.main(["--data-root", str(ctx.root), "--checkpoints", str(ctx.work / "ckpt"),
                                   "--out", str(out), "--ensemble", "--fill-missing", "0",
                                   "--cache-dir", str(ctx.work / "cache"), "--device", ctx.device, "--no-progress",
                                   "--workers", str(min(16, os.cpu_count() or 1))])
    ids = pd.read_csv(ctx.root / "student_labels" / "test_ids.csv")["Id"]
    make_submission.check_submission(out, ids)  # raises (and so fails the section) on any fault
    values = result["submission"].drop(columns="Id").to_numpy()
    n_ckpt = len(make_submission.find_checkpoints(ctx.work / "ckpt"))
    ctx.report.check("submission", len(result["submission"]) == len(ids),
                     f"{out.name}: {len(ids)} rows from {n_ckpt} checkpoint(s) checked, values in "
                     f"[{values.min():.3f}, {values.max():.3f}], {result['seconds']['predict']:.2f}s predicting on "
                     f"{ctx.device}", rows=len(ids), checkpoints=n_ckpt, predict_seconds=result["seconds"]["predict"])


# ---------------------------------------------------------------------------------------------
# 8-9: timing and memory, on train.py's own state (model, optimizer, scaler, channels_last)

def step_args(ctx: Ctx, arch: str, size: int, batch: int, *extra) -> argparse.Namespace:
    return train.parse_args(["--pathology", PATHOLOGY, "--data-root", str(ctx.root), "--cache-dir",
                             str(ctx.work / "cache"), "--out-dir", str(ctx.work / "timing"), "--arch", arch,
                             "--image-size", str(size), "--batch-size", str(batch), "--epochs", "3",
                             "--weights", "none", "--augment", "none", "--loader-workers", str(ctx.args.loader_workers),
                             "--save-every", "0", "--device", ctx.device, "--no-progress", *extra])


def bare_state(ctx: Ctx, targs: argparse.Namespace) -> train.TrainState:
    """train.build_state for a job that is only a name: the model, optimizer, scheduler and scaler
    that train.py would train (grad checkpointing, channels_last and the autocast included)."""
    job = SimpleNamespace(names=[PATHOLOGY], label=f"{targs.arch} {targs.image_size}px", folder=ctx.work / "timing",
                          sampler=SimpleNamespace(batches_per_epoch=100))
    state = train.build_state(job, targs, ctx.rt)
    train.prepare_epoch(state, 0, targs, ctx.rt)
    state.totals = torch.zeros(2, device=ctx.rt.device)
    return state


def device_batch(ctx: Ctx, batch: int, size: int):
    """A uint8 batch already on the device, as train.to_device leaves one."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=g).to(ctx.rt.device)
    if ctx.cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, generator=g) * 2 - 1).to(ctx.rt.device)
    return x, y, torch.ones_like(y, dtype=torch.bool)


def images_per_s(ctx: Ctx, step, images: int, calls: int, warmup: int) -> float:
    """Best of `repeats` timings of `calls` calls of step() (each `images` images), after `warmup` calls."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(ctx.args.timing_repeats):
        sync(ctx.rt)
        t0 = time.perf_counter()
        for _ in range(calls):
            step()
        sync(ctx.rt)
        rates.append(calls * images / (time.perf_counter() - t0))
    return max(rates)


def loop_job(ctx: Ctx, targs: argparse.Namespace, n: int):
    """train.prepare_job over n training rows: the cached rows labelled for PATHOLOGY, repeated."""
    labelled = ctx.table[ctx.table[PATHOLOGY].notna()].reset_index(drop=True)
    big = labelled.iloc[np.resize(np.arange(len(labelled)), n + 4)].reset_index(drop=True)
    is_val = np.arange(len(big)) >= n
    return train.prepare_job([PATHOLOGY], ctx.work / "timing", big, is_val, {"seed": 0}, [ctx.cache], targs, ctx.rt)


def time_batch_size(ctx: Ctx, batch: int) -> dict:
    """images/s at one batch size: train_one_epoch (the best of --timing-repeats epochs after a
    warm-up epoch), then train_step and the bare step on a batch already on the device (as many
    images, the best of --timing-repeats runs)."""
    a, rt = ctx.args, ctx.rt
    n = max(2 * batch, a.timing_images // batch * batch)
    targs = step_args(ctx, a.timing_arch, a.image_size, batch)
    job = loop_job(ctx, targs, n)
    try:
        state = train.build_state(job, targs, rt)
        train.prepare_epoch(state, 0, targs, rt)
        no_signal = SimpleNamespace(requested=None)
        images = next(iter(job.loader))[0]
        row = {"batch": batch, "images_per_epoch": n, "loader_dtype": str(images.dtype),
               "loader_pinned": images.is_pinned()}
        rates = []
        for epoch in range(1 + a.timing_repeats):
            state.epoch, state.step, state.totals, state.train_seconds = epoch, 0, None, 0.0
            sync(rt)
            t0 = time.perf_counter()
            train.train_one_epoch(state, job, targs, rt, no_signal)  # its last check reads the loss: synchronised
            sync(rt)
            if epoch:
                rates.append(n / (time.perf_counter() - t0))
        loop = max(rates)
    finally:
        close_loader(job.loader)  # its workers ignore SIGTERM: stopped here, not at the interpreter's exit
    x, y, mask = device_batch(ctx, batch, a.image_size)
    calls = n // batch
    state.totals = torch.zeros(2, device=rt.device)
    warmup = min(5, calls) if ctx.cuda else 1
    step = images_per_s(ctx, lambda: train.train_step(state, [(x, y, mask)], targs, rt), batch, calls, warmup)

    def bare():
        state.optimizer.zero_grad(set_to_none=True)
        with rt.autocast():
            out = state.model(x)
        loss, count = train.loss_terms(out, y, mask)
        state.scaler.scale(loss / count).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    floor = images_per_s(ctx, bare, batch, calls, warmup)
    row.update(bare_images_per_s=round(floor, 1), step_images_per_s=round(step, 1), loop_images_per_s=round(loop, 1),
               ratio=round(loop / floor, 3), step_ratio=round(step / floor, 3),
               ratio_target_met=loop / floor >= TARGET_RATIO, rate_target_met=loop >= TARGET_IMAGES_PER_S)
    log(f"  batch {batch}: bare {floor:.1f}, train_step {step:.1f}, train_one_epoch {loop:.1f} images/s; "
        f"loop / bare {loop / floor:.3f}")
    return row


def time_timm(ctx: Ctx, arch: str) -> dict:
    a = ctx.args
    batch = 64 if not a.dry_run else a.batch_size
    targs = step_args(ctx, arch, a.image_size, batch)
    state = bare_state(ctx, targs)
    x, y, mask = device_batch(ctx, batch, a.image_size)
    rate = images_per_s(ctx, lambda: train.train_step(state, [(x, y, mask)], targs, ctx.rt), batch, a.timm_steps,
                        max(1, a.timm_steps // 4))
    params = sum(p.numel() for p in state.model.parameters())
    log(f"  {arch}: train_step {rate:.1f} images/s at batch {batch}, {a.image_size} px "
        f"({params / 1e6:.1f}M parameters)")
    return {"arch": arch, "batch": batch, "image_size": a.image_size, "images_per_s": round(rate, 1),
            "params_m": round(params / 1e6, 2)}


def section_timing(ctx: Ctx) -> None:
    rows, timm_rows = [], []
    ctx.report.record(arch=ctx.args.timing_arch, image_size=ctx.args.image_size, rows=rows, timm=timm_rows,
                      targets={"ratio": TARGET_RATIO, "images_per_s": TARGET_IMAGES_PER_S})
    for batch in ctx.args.batch_sizes:
        row = attempt(ctx, f"batch_{batch}", time_batch_size, ctx, batch)
        if row:
            rows.append(row)
            ok = row["loader_dtype"] == "torch.uint8" and (row["loader_pinned"] or not ctx.cuda)
            met = {k: "met" if row[k] else "not met" for k in ("ratio_target_met", "rate_target_met")}
            ctx.report.check(f"batch_{batch}", ok,
                             f"loader gives {row['loader_dtype']}, pinned {row['loader_pinned']}; loop / bare "
                             f"{row['ratio']:.3f} (target {TARGET_RATIO}, {met['ratio_target_met']}), loop "
                             f"{row['loop_images_per_s']:.0f} images/s (target {TARGET_IMAGES_PER_S}, "
                             f"{met['rate_target_met']})")
        ctx.report.save()
        free_memory()
    for arch in ctx.args.timm_archs:
        row = attempt(ctx, arch, time_timm, ctx, arch)
        if row:
            timm_rows.append(row)
            ctx.report.check(arch, True, f"train_step {row['images_per_s']:.1f} images/s")
        ctx.report.save()
        free_memory()


def memory_row(ctx: Ctx, arch: str, size: int, checkpointing: bool, context_gib: float) -> dict:
    """Peak memory of one training step (the second: the optimizer state and cuDNN's choices exist).
    It fits a card class when the allocator's reserved peak plus the CUDA context (context_gib,
    measured) stays under CARDS_GIB."""
    rt, batch = ctx.rt, ctx.args.memory_batch
    row = {"arch": arch, "image_size": size, "batch": batch, "grad_checkpointing": checkpointing}
    free_memory()
    base = torch.cuda.memory_allocated(rt.device) if rt.cuda else 0
    state = None
    try:
        flag = "--grad-checkpointing" if checkpointing else "--no-grad-checkpointing"
        targs = step_args(ctx, arch, size, batch, flag)
        state = bare_state(ctx, targs)
        x, y, mask = device_batch(ctx, batch, size)
        train.train_step(state, [(x, y, mask)], targs, rt)
        sync(rt)
        if rt.cuda:
            resident = torch.cuda.memory_allocated(rt.device) - base
            torch.cuda.reset_peak_memory_stats(rt.device)
        t0 = time.perf_counter()
        train.train_step(state, [(x, y, mask)], targs, rt)
        sync(rt)
        row["step_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        if rt.cuda:
            peak = torch.cuda.max_memory_allocated(rt.device) - base
            reserved = torch.cuda.max_memory_reserved(rt.device)
            row.update(peak_gib=round(peak / GIB, 2), reserved_gib=round(reserved / GIB, 2),
                       resident_gib=round(resident / GIB, 2),
                       **{k: reserved / GIB + context_gib <= v for k, v in CARDS_GIB.items()})
        else:
            row.update(peak_gib="n/a on CPU", reserved_gib="n/a on CPU", resident_gib="n/a on CPU")
    except torch.cuda.OutOfMemoryError:
        row.update(peak_gib="OOM", reserved_gib="OOM", **{k: False for k in CARDS_GIB})
    finally:
        del state
        free_memory()
    log(f"  {arch} {size}px batch {batch}{' grad-checkpointing' if checkpointing else ''}: peak {row.get('peak_gib')} "
        f"GiB, reserved {row.get('reserved_gib')} GiB, step {row.get('step_ms')} ms")
    return row


def section_memory(ctx: Ctx) -> None:
    rows, context_gib = [], 0.0
    free_memory()
    if ctx.cuda:  # what the process holds outside PyTorch's allocator: CUDA context, cuBLAS/cuDNN handles
        free, total = torch.cuda.mem_get_info(ctx.rt.device)
        context_gib = (total - free - torch.cuda.memory_reserved(ctx.rt.device)) / GIB
    ctx.report.record(rows=rows, cuda_context_gib=round(context_gib, 2) if ctx.cuda else "n/a on CPU",
                      cards_gib=CARDS_GIB,
                      note=None if ctx.cuda else "CUDA memory numbers are n/a on CPU; the steps ran")
    for arch in ctx.args.memory_archs:
        for size in ctx.args.memory_sizes:
            for checkpointing in (False, True):
                row = attempt(ctx, f"{arch}_{size}_{'gc' if checkpointing else 'plain'}", memory_row, ctx, arch, size,
                              checkpointing, context_gib)
                if row:
                    rows.append(row)
                ctx.report.save()
    done = [r for r in rows if "step_ms" in r or r.get("peak_gib") == "OOM"]
    ctx.report.check("memory", len(done) == len(rows) > 0, f"{len(rows)} configurations measured "
                     f"({sum(r.get('peak_gib') == 'OOM' for r in rows)} out of memory)")


# ---------------------------------------------------------------------------------------------
# 10-11: compiled, ddp

def section_compiled(ctx: Ctx) -> None:
    if not ctx.args.compile:
        ctx.report.record(skipped="--no-compile (the dry run's default)")
        log("  skipped: --no-compile")
        return
    out = ctx.work / "compiled"
    shutil.rmtree(out, ignore_errors=True)
    # a batch larger than the training rows: every step has one shape, so one compilation
    t0 = time.time()
    train.main(train_flags(ctx, out, "--pathology", PATHOLOGY, "--compile", "--batch-size",
                           str(ctx.args.compile_batch_size)))
    ctx.report.record(run_seconds=round(time.time() - t0, 1))
    check_trained(ctx, "compiled", out / FOLDER, ctx.args.epochs)


def section_ddp(ctx: Ctx) -> None:
    n_gpus = torch.cuda.device_count() if ctx.cuda else 0
    a = ctx.args
    if not (a.ddp == "on" or (a.ddp == "auto" and (n_gpus >= 2 or a.dry_run))):
        ctx.report.record(skipped=f"{n_gpus} GPU(s) visible; --ddp {a.ddp}")
        log(f"  skipped: {n_gpus} GPU(s) visible (needs 2; --ddp {a.ddp})")
        return
    out = ctx.work / "ddp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *train_flags(ctx, out, "--pathology", PATHOLOGY, epochs=1)]
    proc = run_logged(ctx, cmd, out / "torchrun.log", env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    try:
        rc = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    log(tail(out / "torchrun.log", 8))
    ctx.report.check("torchrun", rc == 0,
                     f"torchrun, 2 processes on {'2 GPUs' if ctx.cuda else 'CPU (gloo)'}: exit {rc}", exit_code=rc)
    if rc == 0:
        check_trained(ctx, "ddp_run", out / FOLDER, 1)


SECTION_FNS = {"data": section_data, "train_eager": section_train_eager, "resume": section_resume,
               "grid": section_grid, "variants": section_variants, "cpu_vs_gpu": section_cpu_vs_gpu,
               "submission": section_submission, "timing": section_timing, "memory": section_memory,
               "compiled": section_compiled, "ddp": section_ddp}


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    device = "cpu" if args.dry_run else "cuda"
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.threads is None and args.dry_run:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rt = setup_runtime(argparse.Namespace(device=device, amp=True, progress=False), distributed=False)
    env = environment(args, rt)
    log(f"gpu_check on {env.get('gpu', 'CPU (dry run)')}: torch {env['torch']}, CUDA {env['cuda']}, cuDNN "
        f"{env['cudnn']}, compute capability {env.get('capability', 'n/a')}, {env.get('gpus', 0)} GPU(s), "
        f"driver {env.get('driver', 'n/a')}, autocast {env['amp_dtype']}, python {env['python']}, torchvision "
        f"{env['torchvision']}, timm {env['timm']}, {env['cpus']} CPUs")
    log(f"work folder {work}, report {args.out}")
    keep = None
    if args.only and args.out.is_file():
        with contextlib.suppress(ValueError, OSError):
            keep = json.loads(args.out.read_text())
    report = Report(args.out, env, keep)
    ctx = Ctx(args, work, device, rt, report)

    chosen = set(args.only or SECTIONS) | {"data"}
    if chosen & NEEDS_EAGER and "train_eager" not in chosen:
        ctx.root = work / "demo_data"
        if not eager_done(ctx):
            chosen.add("train_eager")
    todo = [s for s in SECTIONS if s in chosen]
    for k, name in enumerate(todo, 1):
        if args.max_minutes is not None and time.time() - t_start > args.max_minutes * 60:
            report.data["not_run"].append(name)
            log(f"\n== [{k}/{len(todo)}] {name}: not run (past --max-minutes {args.max_minutes:g})")
            continue
        if name != "data" and ctx.table is None:
            report.data["not_run"].append(name)
            log(f"\n== [{k}/{len(todo)}] {name}: not run (no data)")
            continue
        run_section(ctx, name, SECTION_FNS[name], k, len(todo), t_start)
    return finish(report, t_start)


def finish(report: Report, t_start: float) -> int:
    checks = [{"check": f"{s}/{c}", "status": "ok" if v["ok"] else "FAILED", "detail": v["detail"][:150]}
              for s, sec in report.data["sections"].items() for c, v in sec.get("checks", {}).items()]
    log("\n" + format_table(checks, ["check", "status", "detail"]))
    timing = report.data["sections"].get("timing", {})
    if timing.get("rows"):
        log(f"\n{timing['arch']} at {timing['image_size']} px, images/s:\n" + format_table(
            timing["rows"], ["batch", "bare_images_per_s", "step_images_per_s", "loop_images_per_s", "ratio",
                             "ratio_target_met", "rate_target_met"]))
        log(f"targets: loop / bare >= {TARGET_RATIO}, loop >= {TARGET_IMAGES_PER_S} images/s "
            f"(ResNet-50, 224 px, one H100)")
    if timing.get("timm"):
        log("\n" + format_table(timing["timm"], ["arch", "batch", "image_size", "images_per_s", "params_m"]))
    memory = report.data["sections"].get("memory", {})
    if memory.get("rows"):
        log("\n" + format_table(memory["rows"], ["arch", "image_size", "batch", "grad_checkpointing", "peak_gib",
                                                 "reserved_gib", "step_ms", "fits_24gb", "fits_80gb"]))
    failed = report.data["failed"] = [f"{s}/{c}" for s, sec in report.data["sections"].items()
                                      for c, v in sec.get("checks", {}).items() if not v["ok"]]
    report.data["ok"] = not failed
    report.data["seconds"] = round(time.time() - t_start, 1)
    report.save()
    env = report.data["env"]
    log(f"\n{env.get('gpu', env['device'])}, torch {env['torch']}, {report.data['seconds']:.0f}s; "
        f"report in {report.path}")
    if report.data["not_run"]:
        log(f"not run: {', '.join(report.data['not_run'])}")
    if failed:
        log(f"GPU CHECK FAILED: {', '.join(failed)}")
        return 1
    log("GPU CHECK PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
