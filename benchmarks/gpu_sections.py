"""The checks of benchmarks/gpu_check.py: data, training eager, interrupt and resume, a resume across
precisions, grid shard re-run, variants, CPU against GPU, submission, compiled, DDP (sections 1-8,
11, 12)."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import make_submission  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from demo import make_demo  # noqa: E402
from experiments import gridsearch  # noqa: E402
from model import Checkpoint, load_checkpoint  # noqa: E402
from gpu_context import (FOLDER, N_FIXED, PATHOLOGY, RUN_TIMEOUT_S, STOP_AT, Ctx, Tee, attempt,  # noqa: E402
                         check_trained, eager_flags, eager_folder, log, run_logged, scores, tail, train_flags,
                         wait_or_kill)


def section_data(ctx: Ctx) -> None:
    """The demo dataset, read and cached as train.py reads it (train.read_table, train.load_images)."""
    a = ctx.args
    root = ctx.work / "demo_data"
    if not (root / "student_labels" / "train2023.csv").is_file():
        log(f"  making the demo dataset: {a.patients} training patients in {root}")
        tmp = ctx.work / "demo_data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        make_demo(tmp, n_train_patients=a.patients, n_test_patients=max(4, a.patients // 8), progress=False)
        tmp.rename(root)
    ctx.root = root
    targs = train.parse_args(eager_flags(ctx, ctx.work / "ckpt" / "eager"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*dropped \\d+ (stray rows|rows whose image)")
        table, root, csv_path = train.read_table(targs, ctx.rt)
        table, sources = train.load_images(table, root, csv_path, targs)
    cache = sources[0]
    ctx.table, ctx.cache = table, cache
    ctx.fixed = cache.get(table["slot"].to_numpy()[:N_FIXED])
    ctx.report.check("data", len(table) > 0,
                     f"{len(table)} training rows cached at {a.image_size} px in {cache.folder}",
                     n_images=len(table), n_labelled=int(table[PATHOLOGY].notna().sum()))


def section_train_eager(ctx: Ctx) -> None:
    seen: dict = {}
    real = train.train_step

    def spy(state, batches, rt, show=None):  # what the run's first step gets: batches, model, autocast
        if not seen:
            images = batches[0][0]
            conv = next(p for p in state.model.parameters() if p.dim() == 4)
            seen.update(dtype=str(images.dtype), pinned=images.is_pinned(), shape=list(images.shape),
                        channels_last=conv.is_contiguous(memory_format=torch.channels_last),
                        amp_dtype=str(rt.amp_dtype))
        return real(state, batches, rt, show)
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


def interrupted_child(argv: list[str]) -> int:
    """The child of the resume section: `train.py ARGV` that, when training reaches (epoch, batch)
    (0-based; batch b starts at sample b x batch size x processes), touches MARKER and waits there
    until the SIGTERM that the parent then sends has been received (by train.py's own StopSignals
    handler), so the signal lands at a known batch.
    argv: MARKER EPOCH BATCH then train.py's flags."""
    from common import run_cli
    marker, epoch, batch, flags = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3:]
    real = train.train_step

    def train_step(state, batches, rt, show=None):
        if (state.epoch, state.pos) == (epoch, batch * state.settings.batch_size * rt.world):
            marker.touch()
            handler = signal.getsignal(signal.SIGTERM)
            stop_signals = getattr(handler, "__self__", None)  # the StopSignals the loop watches
            t0 = time.time()
            while getattr(stop_signals, "requested", None) is None and time.time() - t0 < 120:
                time.sleep(0.01)
        return real(state, batches, rt, show)
    train.train_step = train_step
    return run_cli(train.main, flags)


CHILD = ("import sys; sys.path[:0] = [{root!r}, {bench!r}]; import gpu_sections; "
         "sys.exit(gpu_sections.interrupted_child(sys.argv[1:]))")


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
            "samples_diff": diff("samples"), "lr_diff": diff("lr"),
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
    while not marker.exists() and proc.poll() is None and time.time() - t0 < RUN_TIMEOUT_S:
        time.sleep(0.02)
    sent = marker.exists() and proc.poll() is None
    if sent:  # the whole process group, loader workers too, as SLURM signals every process of a job step
        os.killpg(proc.pid, signal.SIGTERM)
        log(f"  sent SIGTERM to the child's process group after batch {batch} of epoch {epoch + 1} "
            f"({time.time() - t0:.1f}s after its start)")
    rc = wait_or_kill(proc, RUN_TIMEOUT_S)
    log(tail(out / "interrupted.log", 6))
    last_path = out / FOLDER / "last.pt"
    last = Checkpoint.load(last_path) if last_path.is_file() else None
    ts = (last.training_state or {}) if last else {}
    want_pos = (batch + 1) * a.batch_size  # one process: a batch is batch-size samples
    at = (ts.get("epoch"), ts.get("pos"))
    ctx.report.check("interrupted", sent and rc == 130 and last is not None and last.interrupted
                     and at == (epoch, want_pos),
                     f"SIGTERM {'sent' if sent else 'NOT sent (the child never reached the batch)'}; exit {rc} "
                     f"(want 130); last.pt at {at[0]} epochs + sample {at[1]}, interrupted "
                     f"{getattr(last, 'interrupted', None)} (want {epoch} epochs + sample {want_pos})",
                     exit_code=rc, last_epoch=at[0], last_pos=at[1],
                     rng_streams=sorted(ts.get("rng", {})), optimizer_state=bool(ts.get("optimizer", {}).get("state")))
    if last is None:
        return

    (out / FOLDER / "history.csv").unlink(missing_ok=True)  # last.pt alone must be enough to resume
    t0 = time.time()
    proc = run_logged(ctx, [sys.executable, "train.py", *flags, "--resume"], out / "resumed.log")
    rc = wait_or_kill(proc, RUN_TIMEOUT_S)
    text = (out / "resumed.log").read_text(errors="replace")
    log(tail(out / "resumed.log", 10))
    where = f"from epoch {epoch + 1} sample {want_pos}"
    ctx.report.check("resumed", rc == 0 and where in text,
                     f"`train.py --resume` in a new process, history.csv deleted, exited {rc}, "
                     f"{'resumed ' + where if where in text else 'no line saying ' + repr(where)}"
                     f" ({time.time() - t0:.1f}s; restores optimizer, scaler, EMA, history and RNG streams "
                     f"{sorted(ts.get('rng', {}))} from last.pt loaded on the CPU)", exit_code=rc)
    if rc != 0:
        return

    cmp = compare_runs(ctx, straight, out / FOLDER)
    keys = ("train_loss_diff", "val_loss_diff", "val_mse_diff", "output_diff", "last_output_diff", "last_weights_diff",
            "samples_diff", "lr_diff")
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
              and (not same_best or cmp["output_diff"] < a.tol_resume) and cmp["samples_diff"] == 0
              and cmp["lr_diff"] <= 1e-12)
        rule = f"each < --tol-resume {a.tol_resume:g}, samples and lr equal; two uninterrupted runs differ by " \
               f"val loss {noise['val_loss_diff']:.2e}, final outputs {noise['last_output_diff']:.2e}"
    else:
        ok = same_epochs and same_best and all(v == 0 for v in numbers.values())
        rule = "bit-identical on CPU"
    ctx.report.check("resume_matches_uninterrupted", ok,
                     f"epochs {cmp['epochs']}, best epoch {cmp['best_epoch']}; max abs diff val loss "
                     f"{cmp['val_loss_diff']:.2e}, train loss {cmp['train_loss_diff']:.2e}, samples "
                     f"{cmp['samples_diff']:g}, lr {cmp['lr_diff']:.2e}, outputs of best.pt "
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


PRECISIONS = {"bf16_to_fp16": (torch.bfloat16, torch.float16), "fp16_to_bf16": (torch.float16, torch.bfloat16)}


@contextlib.contextmanager
def forced_autocast(dtype: torch.dtype):
    """train.py's autocast dtype forced to `dtype`, as on a card that computes in it (fp16 with a
    GradScaler: a V100, a T4; bf16: an A100, an H100): train.setup_runtime asks runtime.amp_dtype_for,
    patched here for the block. On the CPU (the dry run) torch's CPU autocast runs either dtype."""
    real = runtime.amp_dtype_for
    runtime.amp_dtype_for = lambda device, enabled=True: dtype if enabled else None
    try:
        yield
    finally:
        runtime.amp_dtype_for = real


@contextlib.contextmanager
def watched_run(stop_after_first_validation: bool):
    """train.main patched for one run: the autocast dtypes its steps ran under are collected (the
    yielded set), and with stop_after_first_validation this process sends itself SIGTERM after the
    run's first validation, as a cluster preempting the job at an epoch's end: train.py saves
    last.pt and exits 130. The SIGTERM handler of this process is restored afterwards."""
    real_step, real_end, seen = train.train_step, train.end_validation, set()
    handler = signal.getsignal(signal.SIGTERM)

    def step(state, batches, rt, show=None):
        seen.add(str(rt.amp_dtype))
        return real_step(state, batches, rt, show)

    def end_validation(state, job, val, rt):
        real_end(state, job, val, rt)
        if stop_after_first_validation and state.validations == 1:
            signal.raise_signal(signal.SIGTERM)  # train.py's StopSignals handler takes it
    train.train_step, train.end_validation = step, end_validation
    try:
        yield seen
    finally:
        train.train_step, train.end_validation = real_step, real_end
        signal.signal(signal.SIGTERM, handler)


def precision_run(ctx: Ctx, name: str, saved: torch.dtype, resumed: torch.dtype) -> None:
    """One resume across precisions: epoch 1 of 2 under `saved`, stopped by SIGTERM, then --resume
    under `resumed`. Both epochs must finish; the fp16 side's last.pt holds the GradScaler's state (a
    disabled scaler's is empty); bf16 -> fp16 must say the scaler starts afresh."""
    out = ctx.work / "precision" / name
    shutil.rmtree(out, ignore_errors=True)
    flags = train_flags(ctx, out, "--pathology", PATHOLOGY, epochs=2)
    folder, short = out / FOLDER, {torch.bfloat16: "bf16", torch.float16: "fp16"}
    rc = None
    with forced_autocast(saved), watched_run(True) as seen_saved:
        try:
            train.main(flags)
        except SystemExit as e:
            rc = e.code
    first = Checkpoint.load(folder / "last.pt").training_state
    with forced_autocast(resumed), watched_run(False) as seen_resumed, \
            contextlib.redirect_stdout(Tee(sys.stdout)) as tee:
        [summary] = train.main(flags + ["--resume"])
    final = Checkpoint.load(folder / "last.pt").training_state
    history = pd.read_csv(folder / "history.csv")
    scaler = {short[saved]: first["scaler"], short[resumed]: final["scaler"]}
    afresh = "gradient scaler starts afresh" in tee.text
    where = "from epoch 2 sample 0"
    dtypes = [sorted(seen_saved), sorted(seen_resumed)]
    scale = float(scaler["fp16"]["scale"]) if scaler["fp16"] else None
    ok = (rc == 130 and (first["epoch"], first["pos"]) == (1, 0) and where in tee.text and summary["epochs_run"] == 2
          and len(history) == 2 and bool(np.isfinite(history[["train_loss", "val_loss"]].to_numpy()).all())
          and dtypes == [[str(saved)], [str(resumed)]] and bool(scaler["fp16"]) and not scaler["bf16"]
          and afresh == (resumed == torch.float16))
    ctx.report.check(name, ok,
                     f"epoch 1 under {short[saved]} autocast stopped by SIGTERM (exit {rc}, last.pt at epoch "
                     f"{first['epoch']} sample {first['pos']}), --resume under {short[resumed]}: "
                     f"{'resumed ' + where if where in tee.text else 'no line saying ' + repr(where)}, "
                     f"{summary['epochs_run']} epochs, val loss {history['val_loss'].round(4).tolist()}; steps ran "
                     f"under {dtypes}; fp16's last.pt scaler {'EMPTY' if scale is None else f'at scale {scale:g}'}, "
                     f"bf16's {'empty' if not scaler['bf16'] else 'NOT empty'}; 'gradient scaler starts afresh' "
                     f"{'printed' if afresh else 'not printed'}",
                     exit_code=rc, epochs_run=summary["epochs_run"], val_loss=history["val_loss"].tolist(),
                     step_dtypes=dtypes, fp16_scale=scale, scaler_afresh=afresh)


def section_precision(ctx: Ctx) -> None:
    for name, (saved, resumed) in PRECISIONS.items():
        log(f"  -- {name}")
        attempt(ctx, name, precision_run, ctx, name, saved, resumed)


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


def section_compiled(ctx: Ctx) -> None:
    if not ctx.args.with_compile:
        ctx.report.record(skipped="off by default (about 1-2 minutes on a GPU): --with-compile runs it")
        log("  skipped: off by default; --with-compile runs it")
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
    rc = wait_or_kill(proc, RUN_TIMEOUT_S)
    log(tail(out / "torchrun.log", 8))
    ctx.report.check("torchrun", rc == 0,
                     f"torchrun, 2 processes on {'2 GPUs' if ctx.cuda else 'CPU (gloo)'}: exit {rc}", exit_code=rc)
    if rc == 0:
        check_trained(ctx, "ddp_run", out / FOLDER, 1)

