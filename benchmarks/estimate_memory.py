"""Estimate what batch size fits on a 24 GB and an 80 GB GPU, per backbone and image size, on a CPU.

    python benchmarks/estimate_memory.py                          # ResNet-50, DenseNet-121, ConvNeXt-T
    python benchmarks/estimate_memory.py --archs resnet50 timm/convnext_tiny --sizes 224 384 512

An estimate, not a GPU measurement (benchmarks/gpu_check.py measures the real peak on a card):
- activations: the bytes autograd keeps for the backward pass of one training forward (the model in
  train mode, under bf16 autocast as train.py runs it on an A100/H100), counted tensor by tensor
  through torch.autograd.graph.saved_tensors_hooks (storages counted once), at batch 2 and 4: the
  difference over 2 is the cost of an image, the rest (autocast's bf16 copies of the weights) is
  fixed. With
  --grad-checkpointing a checkpointed step keeps only its input and recomputes the rest in the
  backward pass, one step at a time: the count is then what lies outside the checkpointed steps, plus
  their inputs, plus the largest step's own activations (measured by letting each checkpointed call
  run plainly while counting what it saves);
- the fixed part: weights, gradients and AdamW's two moments in float32 (16 bytes a parameter), the
  bf16 weight copies, plus
  a workspace allowance (--workspace-gb, default 2: cuDNN workspaces, the allocator's fragmentation,
  the CUDA context) that this count cannot see;
- batch that fits = (card - fixed) / activations per image, rounded down.
Prints a table per card; numbers are GB and images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm.models._manipulate
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import format_table, run_cli  # noqa: E402
import model as model_module  # noqa: E402
from model import build_model, model_config, set_grad_checkpointing  # noqa: E402

GB = 1024 ** 3


def saved_bytes(model, size: int, batch: int = 2) -> int:
    """Bytes autograd keeps for backward after one forward of `batch` images of size px; with
    checkpointed steps, their inputs plus the largest step's activations instead of all of theirs."""
    seen, total, steps = set(), [0], []

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += storage.nbytes()
        return t

    def measured(fn, *args, **kwargs):  # a checkpoint that runs plainly and counts what the step saves
        before = total[0]
        out = fn(*args)
        steps.append((sum(a.untyped_storage().nbytes() for a in args if torch.is_tensor(a)), total[0] - before))
        return out
    x = torch.randint(0, 255, (batch, 1, size, size), dtype=torch.uint8)
    model.train()
    real = model_module.checkpoint, timm.models._manipulate.checkpoint
    model_module.checkpoint = timm.models._manipulate.checkpoint = measured
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    finally:
        model_module.checkpoint, timm.models._manipulate.checkpoint = real
    if not steps:
        return total[0]
    return total[0] - sum(d for _, d in steps) + sum(i for i, _ in steps) + max(d for _, d in steps)


def estimate(arch: str, size: int, checkpointing: bool, workspace_gb: float) -> dict:
    model = build_model(model_config(["Cardiomegaly"], arch=arch, image_size=size))
    if checkpointing:
        set_grad_checkpointing(model)
    params = sum(p.numel() for p in model.parameters())
    small, large = saved_bytes(model, size, 2), saved_bytes(model, size, 4)
    per_image = (large - small) / 2  # what grows with the batch; the rest (bf16 copies of the weights) does not
    fixed = 16 * params + (small - 2 * per_image) + workspace_gb * GB
    return {"arch": arch, "px": size, "grad_ckpt": "on" if checkpointing else "off",
            "params_M": round(params / 1e6, 1), "act_MB_per_image": round(per_image / 2**20, 1),
            "fixed_GB": round(fixed / GB, 1),
            **{f"batch_{c}GB": max(0, int((c * GB - fixed) // per_image)) for c in (24, 80)}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet50", "densenet121", "timm/convnext_tiny"])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512])
    p.add_argument("--workspace-gb", type=float, default=2.0)
    args = p.parse_args(argv)
    rows = [estimate(a, s, c, args.workspace_gb) for a in args.archs for s in args.sizes for c in (False, True)]
    print(format_table(rows, list(rows[0])))
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
