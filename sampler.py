"""What a training epoch draws: inverse-frequency row weights (bounded), the epoch's batches for one
rank (the distributed form of a WeightedRandomSampler, resumable at any batch), and the loader.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler, WeightedRandomSampler

from common import UserError
from runtime import Runtime, ignore_sigterm

SAMPLER_CAP = 5.0  # see sample_weights, and docs/results.md for the measurement


def sample_weights(targets: np.ndarray, cap: float = 0.0) -> np.ndarray:
    """Inverse-frequency row weights over the label values (-1, 0, 1), bounded. targets (N, K), NaN = blank.

    For pathology k, a row with value v gets N_k / (L_k * count_k(v)): N_k labelled rows, L_k values
    present. Each present value then carries the same total weight and the mean weight is 1 (a
    uniform draw gives every row 1). A row labelled for several pathologies (--multi-head) gets the
    mean of its weights over them. cap > 0 bounds the over-sampling: no row weighs more than cap
    times uniform (the weights are capped and the rest rescaled to mean 1 again, until both hold),
    so a value that is 0.5% of the rows is drawn about cap times per epoch per row, not 67 times."""
    targets = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    w = np.zeros_like(targets)
    for k in range(targets.shape[1]):
        col = targets[:, k]
        labelled = ~np.isnan(col)
        values, counts = np.unique(col[labelled], return_counts=True)
        for v, c in zip(values, counts):
            w[col == v, k] = labelled.sum() / (len(values) * c)
    n = (~np.isnan(targets)).sum(1)
    w = np.where(n > 0, w.sum(1) / np.maximum(n, 1), 0.0)
    if cap > 0 and (n > 0).any():
        cap = max(cap, 1.0)  # below uniform no weighting can stay at mean 1
        for _ in range(100):  # water-filling: converges in a few rounds
            w = np.minimum(w, cap)
            w *= (n > 0).sum() / w.sum()
            if w.max() <= cap * (1 + 1e-9):
                break
    return w


class EpochSampler(Sampler):
    """Batches of indices for one rank. Every rank draws the same sample for an epoch (a generator
    seeded by seed and epoch), then keeps every world-th batch: the distributed form of the weighted
    draw, and with one process exactly the WeightedRandomSampler (or RandomSampler) it wraps.
    set_epoch(epoch, start) makes the next iteration yield that epoch's batches from batch `start`
    on: a run resumed in the middle of an epoch sees exactly the batches it had not trained on."""

    def __init__(self, weights: np.ndarray | None, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.start = 0, 0
        n_batches = math.ceil(n / batch_size)
        if n % batch_size == 1 and n_batches > 1:  # a lone last row joins the batch before it: BatchNorm
            n_batches -= 1                         # cannot train on a batch of one
        if world > 1 and n_batches < world:
            raise UserError(f"{n} training rows make {n_batches} batch(es) of {batch_size} per epoch, fewer than the "
                            f"{world} processes: lower --batch-size or start fewer processes")
        self.batches_per_epoch = n_batches // world  # equal batch counts keep DDP ranks in step

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        base = (RandomSampler(range(self.n), generator=g) if self.weights is None
                else WeightedRandomSampler(self.weights, self.n, replacement=True, generator=g))
        batches = list(BatchSampler(base, self.batch_size, drop_last=False))
        if len(batches) > 1 and len(batches[-1]) == 1:
            lone = batches.pop()
            batches[-1] = batches[-1] + lone
        return batches[:self.batches_per_epoch * self.world][self.rank::self.world]

    def __iter__(self):
        return iter(self._batches()[self.start:])

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


def train_loader(dataset: XrayDataset, sampler: Sampler, workers: int | None, rt: Runtime) -> DataLoader:
    """The training loader: whole uint8 batches from the sampler, `workers` processes (None: 4 on
    CUDA, 0 on CPU) that stay up between epochs and ignore SIGTERM, pinned memory on CUDA."""
    workers = workers if workers is not None else (4 if rt.cuda else 0)
    # its own generator: making an iterator draws a seed for the workers, and must not draw it from
    # the global stream that dropout and augmentation use (a run resumed mid-epoch makes its iterator
    # at another point of that stream than the run it continues)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=rt.cuda,
                      persistent_workers=workers > 0, worker_init_fn=ignore_sigterm, generator=torch.Generator())


