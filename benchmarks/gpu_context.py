"""What the sections of benchmarks/gpu_check.py share: constants, the report, the context, and the
train.py runs as a user runs them."""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import train  # noqa: E402
from common import jsonable, write_text  # noqa: E402
from model import Checkpoint, load_checkpoint  # noqa: E402

PATHOLOGY, FOLDER = "Cardiomegaly", "cardiomegaly"
TARGET_RATIO = 0.95
TARGET_IMAGES_PER_S = 2500  # ResNet-50, 224 px, one H100
STOP_AT = (1, 1)  # resume section: SIGTERM while the child is at epoch 2 (0-based 1), batch 1 of 0-based
N_FIXED = 32  # images in the fixed batch that outputs are compared on
# a train.py subprocess (seconds, each: about 20 s on an H200, 10-60 s in the dry run) is killed past
# this, so that one hung run cannot spend a lent GPU's whole time
RUN_TIMEOUT_S = 300
GIB = 2 ** 30
# usable GiB of the card classes docs/training.md talks about, a little under the smallest of each
# (an A10 "24 GB" has 22.5 GiB, an RTX 4090 24.0; an H100 "80 GB" 79.6, an A100 80.0)
CARDS_GIB = {"fits_24gb": 22.0, "fits_80gb": 78.0}


def log(*a) -> None:
    print(*a, flush=True)


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
    shown = [*cmd[:2], "<gpu_sections.interrupted_child>", *cmd[3:]] if cmd[1] == "-c" else cmd
    log("  $ " + " ".join(shown))
    threads = {"OMP_NUM_THREADS": str(ctx.args.threads)} if ctx.args.threads else {}
    out = open(log_path, "w")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), **threads},
                                start_new_session=True)
    finally:
        out.close()


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> int:
    """The exit code of a run_logged process; past `timeout` seconds its process group is killed."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def tail(path: Path, n: int = 12) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join("    | " + line for line in lines[-n:])

