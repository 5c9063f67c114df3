"""Where and how a script runs: the device and autocast dtype, torchrun's process group, the random
streams that --resume restores, signals, and DataLoader worker shutdown.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from common import UserError, test_hook


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0        # global: rank 0 alone writes files and logs
    world: int = 1
    amp_dtype: torch.dtype | None = None
    progress: bool = True
    local_rank: int = 0  # on this node: picks the GPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def log(self, *a):
        if self.main:
            print(*a, flush=True)


def amp_dtype_for(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """Autocast dtype: bf16 where the card computes it natively (compute capability 8.0 and up: A100,
    H100, RTX 30xx/40xx), fp16 (with a GradScaler) on older cards (V100, T4, P100), None off CUDA or
    with --no-amp. torch.cuda.is_bf16_supported() is not asked: it counts slow emulated bf16 too."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def setup_runtime(args, distributed: bool = True, join: bool = True) -> Runtime:
    """Pick the device (GPU LOCAL_RANK under torchrun) and autocast dtype; under torchrun (WORLD_SIZE
    > 1) join the process group unless join=False (then call join_process_group once the image cache
    is there). distributed=False (make_submission.py) stays a single process whatever the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed else 1
    rank = int(os.environ.get("RANK", "0")) if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible (try --device cpu)")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rt = Runtime(device, rank, world, amp_dtype_for(device, args.amp), args.progress and rank == 0, local_rank)
    if join:
        join_process_group(rt)
    return rt


def join_process_group(rt: Runtime) -> None:
    """Join torchrun's process group (nccl on GPU, gloo on CPU) once every process is ready.

    The processes first meet in torchrun's rendezvous store, where each one counts itself in and
    waits for the others with no timeout: a node still building its own cache (node-local
    --cache-dir) keeps the others waiting there, not inside a collective, whose timeout (10 minutes
    for nccl) a cache build outlasts. The group itself keeps the usual timeout."""
    if rt.world == 1 or dist.is_initialized():
        return
    store, _, _ = next(dist.rendezvous("env://", rt.rank, rt.world, timeout=timedelta(days=1)))
    key = f"cxr/ready/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    n = store.add(key, 1)
    everyone = -(-n // rt.world) * rt.world  # the count once all have arrived (it grows by world per main() call)
    t0, told = time.time(), False
    while n < everyone:
        if not told and time.time() - t0 > 10:
            print(f"rank {rt.rank} is ready; waiting for {everyone - n} more (a node still building its cache?)",
                  file=sys.stderr, flush=True)
            told = True
        time.sleep(1)
        n = store.add(key, 0)
    hook = test_hook("CXR_PG_TIMEOUT_S")
    timeout = timedelta(seconds=hook) if hook else None
    store.set_timeout(timeout or timedelta(minutes=30))
    dist.init_process_group("nccl" if rt.cuda else "gloo", store=dist.PrefixStore("default_pg", store),
                            rank=rt.rank, world_size=rt.world, timeout=timeout)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The random streams that --resume restores: CPU, Python, and every visible GPU's."""
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict, rank: int | None = None) -> None:
    """Restore rng_state(). Resumed on another GPU count, the GPUs that both runs have get their
    streams back; the rest keep theirs. last.pt holds rank 0's streams: rank 0 (default: this
    process's rank) continues them exactly, every other rank derives its own from them."""
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        for i in range(min(len(s["cuda"]), torch.cuda.device_count())):
            torch.cuda.set_rng_state(s["cuda"][i], i)
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
    if rank:
        seed_everything(int(torch.randint(0, 2**31, ())) + rank)


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader worker_init_fn. SLURM signals every process of a job step, loader workers too: a
    worker killed by SIGTERM ends the run in a DataLoader error instead of the saved last.pt that the
    main process writes on SIGTERM (StopSignals). The workers leave the signal to it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def close_loader(loader: DataLoader) -> None:
    """Stop a DataLoader's persistent workers now, the way an exhausted loader does (a sentinel,
    then join). Left to the interpreter's exit, they would get SIGTERM, which they ignore
    (ignore_sigterm): the process would hang at exit. The loader sits in a reference cycle, so
    plain reference counting does not free it in time."""
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    loader._iterator = None


class StopSignals:
    """SIGTERM (SLURM's warning before a kill, `scancel`) and Ctrl-C ask the run to stop at the next
    step boundary, where it saves last.pt and exits: `requested` says so. The handler only sets the
    flag, so a signal never lands inside an optimizer step or a checkpoint write. A second Ctrl-C
    stops at once (KeyboardInterrupt; last.pt keeps the last state saved). Further SIGTERMs are
    ignored: under srun torchrun a worker gets it twice (from SLURM, then forwarded by torchrun).
    Signal handlers can only be set from the main thread; elsewhere this does nothing."""

    def __init__(self, announce: bool = True):
        self.announce = announce  # print the line (rank 0 only: under torchrun every rank gets the signal)

    def __enter__(self) -> "StopSignals":
        self.requested: int | None = None
        self.active = threading.current_thread() is threading.main_thread()
        if self.active:
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == signal.SIGINT:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = signum
            if self.announce:
                print(f"\n{signal.Signals(signum).name}: stopping after this step, saving last.pt", file=sys.stderr,
                      flush=True)

    def __exit__(self, *exc) -> None:
        if self.active:
            for s, old in self.old.items():
                signal.signal(s, signal.SIG_IGN if s == signal.SIGTERM and self.requested else old)


def agree(rt: Runtime, *flags: bool, proposal: int = 1) -> list:
    """Each flag, true on every rank when it is true on any, and the smallest of the ranks'
    `proposal`s (the steps until the next check): one small all_reduce, a sync point, so call it
    at the same steps on every rank. Ranks then stop, save or fail together instead of one waiting
    in a collective for another that left."""
    if rt.world == 1:
        return [bool(f) for f in flags] + [proposal]
    t = torch.tensor([float(f) for f in flags] + [-float(proposal)], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the max of -proposal is minus the smallest proposal
    values = t.tolist()
    return [bool(v) for v in values[:-1]] + [int(-values[-1])]


def check_same_table(rt: Runtime, paths: list[str], digest: str) -> None:
    """Under torchrun, every rank's training table (its paths and labels: `digest`) must be rank
    0's: a node-local cache or CSV read that differs (a transient read error, a missing image on one
    node) would give that rank another table, perhaps another split, and a hang or a leak. Stops on
    every rank in one line naming the rank and its first path that differs."""
    if rt.world == 1:
        return
    digests = [None] * rt.world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) == 1:
        return
    box = [paths if rt.main else None]
    dist.broadcast_object_list(box)
    ref, what = box[0], None
    if digest != digests[0]:
        diff = next((i for i, (a, b) in enumerate(zip(paths, ref)) if a != b), min(len(paths), len(ref)))
        what = (f"{paths[diff] if diff < len(paths) else 'its end'} where rank 0 has "
                f"{ref[diff] if diff < len(ref) else 'its end'} (row {diff}, {len(paths)} rows against {len(ref)})"
                if diff < max(len(paths), len(ref)) else "the same paths with other labels")
    found = [None] * rt.world
    dist.all_gather_object(found, what)
    rank = next(r for r, w in enumerate(found) if w)
    raise UserError(f"rank {rank}'s training table differs from rank 0's: {found[rank]}; every node must read the "
                    f"same CSV and images (check its --data-root, --cache-dir and the warnings it printed)")


def on_main(rt: Runtime, fn):
    """fn() on rank 0 only (file writes, reads of what rank 0 wrote); its value, or its UserError (a
    full disk), on every rank, so no rank is left waiting in a collective for one that failed."""
    value, error = None, None
    if rt.main:
        try:
            value = fn()
        except UserError as e:
            error = str(e)
    if rt.world > 1:
        box = [(value, error)]
        dist.broadcast_object_list(box)
        value, error = box[0]
    if error:
        raise UserError(error)
    return value


def sync_buffers(module: torch.nn.Module, rt: Runtime) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics). After the last step each rank's
    statistics come from its own batches; validating with rank 0's means every rank scores the
    weights that rank 0 saves."""
    if rt.world > 1:
        for b in module.buffers():
            dist.broadcast(b, 0)


def to_device(batch, rt: Runtime):
    """uint8 images go over as uint8 (pinned, non-blocking on CUDA); the model normalises them there."""
    images, targets, mask = (t.to(rt.device, non_blocking=True) for t in batch)
    if rt.cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets, mask


