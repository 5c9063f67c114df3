"""What the ranks' agreement costs: an all-reduced stop flag after every optimizer step, against the
time-based check train.py makes (the ranks agree at least every CHECK_SECONDS; the step count between
checks follows the measured step time).

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_agree.py --steps 60

Each rank trains --arch at --image-size on random uint8 batches of --batch-size under DDP (gloo on
CPU, nccl on GPUs), three ways, --steps steps each after a warm-up: no check at all, runtime.agree
after every step, and agree at the interval train.py uses. Rank 0 prints ms per step and each way's
overhead against no check.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import build_model, loss_terms, model_config  # noqa: E402
from runtime import agree, setup_runtime  # noqa: E402
from train import CHECK_SECONDS  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    args.amp, args.progress = True, False
    rt = setup_runtime(args)
    model = build_model(model_config(["Cardiomegaly"], hidden=64, arch=args.arch)).to(rt.device)
    net = DDP(model, device_ids=[rt.device.index] if rt.cuda else None) if rt.world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 255, (args.batch_size, 1, args.image_size, args.image_size), dtype=torch.uint8,
                      device=rt.device)
    y = torch.zeros(args.batch_size, 1, device=rt.device)
    mask = torch.ones(args.batch_size, 1, dtype=torch.bool, device=rt.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with rt.autocast():
            loss, n = loss_terms(net(x), y, mask)
        (loss / n).backward()
        opt.step()

    def run(check_every):  # check_every: 0 never, 1 every step, None the adaptive interval
        if rt.world > 1:
            dist.barrier()
        t0 = last = time.perf_counter()
        interval, since = 1, 0
        for i in range(args.steps):
            step()
            since += 1
            due = since >= (interval if check_every is None else check_every or args.steps + 1)
            if due or i == args.steps - 1:
                per = (time.perf_counter() - last) / since
                *_, interval = agree(rt, False, False, False, proposal=max(1, int(CHECK_SECONDS / max(per, 1e-6))))
                last, since = time.perf_counter(), 0
        if rt.cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps * 1000

    for _ in range(5):
        step()
    ms = {name: run(every) for name, every in (("none", 0), ("every_step", 1), ("adaptive", None), ("none2", 0))}
    base = (ms["none"] + ms["none2"]) / 2
    if rt.main:
        print(f"{args.arch} {args.image_size}px batch {args.batch_size} x{rt.world} on {rt.device}: "
              f"{base:.1f} ms/step without a check; all-reduced flag every step {ms['every_step']:.1f} ms "
              f"({ms['every_step'] / base - 1:+.1%}); every {CHECK_SECONDS:g} s {ms['adaptive']:.1f} ms "
              f"({ms['adaptive'] / base - 1:+.1%})")
    if rt.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
