"""Check every code path that only runs on a GPU, end to end on data it makes itself, and measure
the training loop's speed and memory.

    python3 benchmarks/gpu_check.py --out gpu_check.json --max-minutes 6   # one CUDA GPU, no network: ~3-4 min
    python3 benchmarks/gpu_check.py --dry-run            # the same code paths on CPU at 32 px: ~100 s
    python3 benchmarks/gpu_check.py --work /tmp/gc --only memory timing   # redo some sections

Sections, in the order they run, with the estimated time of each on one H200 (ResNet-50 at 224 px
trains at ~4,300 images/s there; a train.py run on the demo data is start-up dominated: ~5-10 s).
Each prints progress lines and its checks; the JSON report (--out) is rewritten after each one, so
a run cut short keeps what finished. --only NAME [NAME ...] runs those (and the data, and the eager
run when a section needs it and --work lacks it) and replaces them in an existing report.
    (start-up: imports, CUDA context, the environment line: ~10 s)
 1. data        ~10 s. The synthetic demo dataset (demo.make_demo), read and cached as train.py does
                (train.read_table, train.load_images) at --image-size (224; 32 dry).
 2. train_eager ~10 s. train.main as a user runs it, 2 epochs of Cardiomegaly, --weights none,
                --loader-workers 4: records the autocast dtype runtime.amp_dtype_for chose (bf16 from
                compute capability 8.0, else fp16 with a scaler) and the card's capability, and checks,
                inside train_step, that batches arrive as pinned uint8 and the model is channels_last.
 3. resume      ~45 s (two subprocesses, each importing torch and starting CUDA, and one more run in
                process). A train.py subprocess with the same flags gets SIGTERM (sent by this script
                to its process group, as SLURM signals a job step, when the child reaches epoch 2 batch
                1) and must exit 130 with last.pt at that sample (training_state epoch 1, pos 2 x
                batch); then, history.csv deleted (last.pt alone must do), `train.py --resume` in a new
                process runs to the end, and its history (samples and lr equal) and its outputs on a
                fixed batch (final weights, best.pt) are compared with the uninterrupted run (section
                2): bit-identical on CPU, within --tol-resume on the device (not bit-deterministic; a
                second uninterrupted run gives the noise floor). Then --resume of the finished run must
                return at once and change no file.
 4. precision   ~25 s. A resume across precisions as a V100/T4 user meets it, in process: epoch 1 of 2
                under bf16 autocast (the H200's default), stopped by a SIGTERM after its validation, then
                --resume under fp16 with a GradScaler (it must print "gradient scaler starts afresh");
                and fp16 -> bf16. The dtype is forced by patching runtime.amp_dtype_for, which
                train.setup_runtime asks. Each finishes both epochs with finite losses, its steps ran
                under the forced dtypes, the fp16 side's last.pt holds a non-empty scaler state and the
                bf16 side's an empty one. The dry run does the same under CPU autocast.
 5. grid        ~10 s. experiments/gridsearch.py, a 2-configuration grid with --shard 1/2, twice: the
                second run trains nothing ('already finished') and leaves results.csv byte for byte.
 6. variants    ~20 s. --multi-head (all pathologies), --head-type three-class, --ema 0.999
                --accum-steps 2: 1 epoch each; each best.pt loads on the CPU and predicts in [-1, 1].
 7. cpu_vs_gpu  ~3 s. Section 2's best.pt on a fixed batch: CPU fp32 against the device in fp32 (TF32
                off) and under the training/submission autocast: max abs diff under --tol-fp32 /
                --tol-autocast (the dry run emulates the autocast with CPU bf16).
 8. submission  ~5 s. make_submission.main on the device over the checkpoints so far, the CSV checked.
 9. timing      ~25 s. ResNet-50 at --batch-sizes (256): images/s of the real training path
                (train.train_until over whole epochs of 7,680 images: EpochSampler, loader workers,
                pinned uint8, --augment none), of train.train_step on a batch already on the device,
                and of the bare step (forward, backward, AdamW; same model and autocast). Targets loop /
                bare >= 0.95 and >= 2,500 images/s: reported, never failed. Then train_step images/s,
                eager, of --timm-archs (timm/convnext_tiny) at 224 px, batch 64.
10. memory      ~30 s. Peak GPU memory (torch.cuda.max_memory_allocated, and the allocator's reserved
                peak) of one training step at batch 32 for ResNet-50, DenseNet-121 and
                timm/convnext_tiny at 224 and 512 px, with and without --grad-checkpointing; 'OOM'
                where it does not fit.
11. compiled    off by default (~1-2 min: torch.compile's first compilation of a ResNet-50 training
                step). With --with-compile: train.main --compile, 2 epochs, one batch shape (one
                compilation); best.pt loads. It runs late: its compilation is the least predictable.
12. ddp         torchrun --standalone --nproc_per_node 2 train.py when 2+ GPUs are visible (in the dry
                run: 2 CPU processes over gloo); otherwise skipped with a note (~0 s on one GPU).
Estimated total on one H200 by default: ~3-4 minutes (the sum above; a whole run of this version has
not been timed on a GPU). Left out by default to stay within ~5 minutes, and how to add it back:
batch 64 timing (--batch-sizes 64 256), timm/vit_small_patch16_224 (--timm-archs timm/convnext_tiny
timm/vit_small_patch16_224), 384 px memory rows (--memory-sizes 224 384 512), the compiled run
(--with-compile). The exit status is 1, after a line 'GPU CHECK FAILED: ...', when any check fails
(the later sections still run); 0 otherwise. Speed targets are reported, not checked. It prints the
card, torch and CUDA versions first and a table of the sections' times last. The sections live in
gpu_sections.py (1-8, 11, 12) and gpu_speed.py (9-10); what they share, in gpu_context.py.
--dry-run: CPU, 32 px, 24 patients, ResNet-18, batch 8, a few timing steps, timm/convnext_atto, a
tiny memory section (CUDA-only numbers 'n/a on CPU'), no compile.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import train  # noqa: E402
from common import format_table  # noqa: E402
from runtime import setup_runtime  # noqa: E402
from gpu_context import TARGET_IMAGES_PER_S, TARGET_RATIO, Ctx, GIB, Report, eager_done, free_memory, log  # noqa: E402
from gpu_sections import (section_compiled, section_cpu_vs_gpu, section_data, section_ddp, section_grid,  # noqa: E402
                          section_precision, section_resume, section_submission, section_train_eager, section_variants)
from gpu_speed import section_memory, section_timing  # noqa: E402

SECTIONS = ["data", "train_eager", "resume", "precision", "grid", "variants", "cpu_vs_gpu", "submission", "timing",
            "memory", "compiled", "ddp"]
NEEDS_EAGER = {"resume", "cpu_vs_gpu", "submission"}  # read section 2's run

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
    p.add_argument("--batch-sizes", type=int, nargs="+", help="timing batch sizes (default 256; 8 dry)")
    p.add_argument("--timing-images", type=int, help="images per timed epoch (default 7680; 48 dry)")
    p.add_argument("--timing-arch", help="backbone timed against the bare step (default resnet50; resnet18 dry)")
    p.add_argument("--timing-repeats", type=int, help="timed epochs (after a warm-up one), and timed runs of the "
                   "device-batch steps; the best counts (default 2; 1 dry)")
    p.add_argument("--timm-archs", nargs="*", help="timm models whose train_step is timed at batch 64 "
                   "(default timm/convnext_tiny; dry: its smallest sibling, timm/convnext_atto)")
    p.add_argument("--timm-steps", type=int, help="timed train_step calls per timm model (default 20; 2 dry)")
    p.add_argument("--memory-archs", nargs="*", help="default resnet50 densenet121 timm/convnext_tiny "
                   "(resnet18 timm/convnext_atto dry)")
    p.add_argument("--memory-sizes", type=int, nargs="+", help="default 224 512 (32 dry)")
    p.add_argument("--memory-batch", type=int, help="default 32 (4 dry)")
    p.add_argument("--threads", type=int, help="CPU threads of this process and its children (default: torch's; 1 dry, "
                   "where on a shared 2-core machine two threads per process run several times slower than one)")
    p.add_argument("--with-compile", action="store_true", help="run the compiled section (about 1-2 minutes "
                   "more on a GPU; minutes on a CPU, where it needs a C++ compiler)")
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
                              ("batch_size", 64, 8), ("loader_workers", 4, 2), ("batch_sizes", [256], [8]),
                              ("timing_images", 7680, 16), ("timing_arch", "resnet50", "resnet18"),
                              ("timing_repeats", 2, 1),
                              ("timm_archs", ["timm/convnext_tiny"], ["timm/convnext_atto"]),
                              ("timm_steps", 20, 1),
                              ("memory_archs", ["resnet50", "densenet121", "timm/convnext_tiny"],
                               ["resnet18", "timm/convnext_atto"]),
                              ("memory_sizes", [224, 512], [32]), ("memory_batch", 32, 4)]:
        if getattr(args, name) is None:
            setattr(args, name, small if dry else full)
    if not dry and not torch.cuda.is_available():
        p.error("no CUDA device is visible; use --dry-run to check the script on CPU")
    return args


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


SECTION_FNS = {"data": section_data, "train_eager": section_train_eager, "resume": section_resume,
               "precision": section_precision, "grid": section_grid, "variants": section_variants,
               "cpu_vs_gpu": section_cpu_vs_gpu, "submission": section_submission, "timing": section_timing,
               "memory": section_memory, "compiled": section_compiled, "ddp": section_ddp}


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
    sections = [{"section": s, "status": "skipped" if "skipped" in sec else "ok" if sec["ok"] else "FAILED",
                 "seconds": f"{sec['seconds'] or 0:.1f}"} for s, sec in report.data["sections"].items()]
    sections += [{"section": s, "status": "not run", "seconds": "-"} for s in report.data["not_run"]]
    sections.append({"section": "whole run", "status": "", "seconds": f"{time.time() - t_start:.1f}"})
    log("\n" + format_table(sections, ["section", "status", "seconds"]))
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
