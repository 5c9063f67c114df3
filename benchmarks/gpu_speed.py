"""The speed sections of benchmarks/gpu_check.py: the training loop against the bare step, timm models'
throughput, and peak memory per backbone and image size (sections 9-10)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import train  # noqa: E402
from jobs import prepare_job  # noqa: E402
from runtime import close_loader  # noqa: E402
from state import TrainState, build_state  # noqa: E402
from gpu_context import CARDS_GIB, GIB, PATHOLOGY, TARGET_IMAGES_PER_S, TARGET_RATIO, Ctx, attempt, free_memory, log, sync  # noqa: E402


def step_args(ctx: Ctx, arch: str, size: int, batch: int, *extra) -> argparse.Namespace:
    return train.parse_args(["--pathology", PATHOLOGY, "--data-root", str(ctx.root), "--cache-dir",
                             str(ctx.work / "cache"), "--out-dir", str(ctx.work / "timing"), "--arch", arch,
                             "--image-size", str(size), "--batch-size", str(batch), "--epochs", "3",
                             "--weights", "none", "--augment", "none", "--loader-workers", str(ctx.args.loader_workers),
                             "--save-every", "0", "--device", ctx.device, "--no-progress", *extra])


def bare_state(ctx: Ctx, targs: argparse.Namespace) -> TrainState:
    """state.build_state for a job that is only a name: the model, optimizer and scaler that train.py
    would train (grad checkpointing, channels_last and the autocast included), prepared for epoch 0
    (train.prepare_epoch sets state.net)."""
    job = SimpleNamespace(names=[PATHOLOGY], label=f"{targs.arch} {targs.image_size}px", folder=ctx.work / "timing",
                          head_type="regression", epoch_len=100)
    state = build_state(job, targs, ctx.rt)
    train.prepare_epoch(state, ctx.rt)
    return state


def device_batch(ctx: Ctx, batch: int, size: int):
    """A batch already on the device, as train.to_device leaves one: images (B, 1, S, S) uint8
    (channels_last on CUDA), targets (B, 1) float32 in [-1, 1], mask (B, 1) bool, all labelled."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=g).to(ctx.rt.device)
    if ctx.cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 1, generator=g) * 2 - 1).to(ctx.rt.device)
    return x, y, torch.ones_like(y, dtype=torch.bool)


def step_batches(ctx: Ctx, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> list:
    """train_step's `batches` for the device batch: the images already on the device, the targets and
    mask on the CPU (pinned on CUDA) as the loader gives them, so that train_step counts the
    labelled entries without a device sync, as in training."""
    y, mask = y.cpu(), mask.cpu()
    if ctx.cuda:
        y, mask = y.pin_memory(), mask.pin_memory()
    return [(x, y, mask)]


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
    """jobs.prepare_job over n training rows: the cached rows labelled for PATHOLOGY, repeated."""
    labelled = ctx.table[ctx.table[PATHOLOGY].notna()].reset_index(drop=True)
    big = labelled.iloc[np.resize(np.arange(len(labelled)), n + 4)].reset_index(drop=True)
    is_val = np.arange(len(big)) >= n
    return prepare_job([PATHOLOGY], ctx.work / "timing", big, is_val, {"seed": 0}, [ctx.cache], targs, ctx.rt)


def time_batch_size(ctx: Ctx, batch: int) -> dict:
    """images/s at one batch size: train.train_until over whole epochs (the best of --timing-repeats
    epochs after a warm-up epoch), then train_step and the bare step on a batch already on the
    device (as many images, the best of --timing-repeats runs)."""
    a, rt = ctx.args, ctx.rt
    n = max(2 * batch, a.timing_images // batch * batch)
    targs = step_args(ctx, a.timing_arch, a.image_size, batch)
    job = loop_job(ctx, targs, n)
    try:
        state = build_state(job, targs, rt)
        no_signal = SimpleNamespace(requested=None)
        images = next(iter(job.loader))[0]
        row = {"batch": batch, "images_per_epoch": n, "loader_dtype": str(images.dtype),
               "loader_pinned": images.is_pinned()}
        rates = []
        for epoch in range(1 + a.timing_repeats):
            # epoch `epoch` from its start, as after a validation at the previous epoch's end
            state.epoch, state.pos, state.validations = epoch, 0, epoch * targs.val_per_epoch
            state.since_val, state.train_seconds = 0, 0.0
            train.prepare_epoch(state, rt)
            sync(rt)
            t0 = time.perf_counter()
            train.train_until(state, job, rt, no_signal)  # its last check reads the loss: synchronised
            sync(rt)
            if state.pos != job.epoch_len:
                raise RuntimeError(f"train_until stopped at sample {state.pos} of {job.epoch_len}")
            if epoch:
                rates.append(n / (time.perf_counter() - t0))
        loop = max(rates)
    finally:
        close_loader(job.loader)  # its workers ignore SIGTERM: stopped here, not at the interpreter's exit
    x, y, mask = device_batch(ctx, batch, a.image_size)
    calls = n // batch
    warmup = min(5, calls) if ctx.cuda else 1
    batches = step_batches(ctx, x, y, mask)
    step = images_per_s(ctx, lambda: train.train_step(state, batches, rt), batch, calls, warmup)

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
    log(f"  batch {batch}: bare {floor:.1f}, train_step {step:.1f}, train_until (whole epochs) {loop:.1f} images/s; "
        f"loop / bare {loop / floor:.3f}")
    return row


def time_timm(ctx: Ctx, arch: str) -> dict:
    a = ctx.args
    batch = 64 if not a.dry_run else a.batch_size
    targs = step_args(ctx, arch, a.image_size, batch)
    state = bare_state(ctx, targs)
    batches = step_batches(ctx, *device_batch(ctx, batch, a.image_size))
    rate = images_per_s(ctx, lambda: train.train_step(state, batches, ctx.rt), batch, a.timm_steps,
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
        batches = step_batches(ctx, *device_batch(ctx, batch, size))
        train.train_step(state, batches, rt)
        sync(rt)
        if rt.cuda:
            resident = torch.cuda.memory_allocated(rt.device) - base
            torch.cuda.reset_peak_memory_stats(rt.device)
        t0 = time.perf_counter()
        train.train_step(state, batches, rt)
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

