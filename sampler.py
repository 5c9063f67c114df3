"""What a training epoch draws: inverse-frequency row weights (bounded), the epoch's batches for one
rank (the distributed form of a WeightedRandomSampler, resumable at any sample position on any
number of processes), and the loader.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler

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
    """What each rank trains on, from a position counted in samples, so that a run saved on N
    processes resumes on M. An epoch is one global draw of n indices (a generator seeded by seed and
    epoch: the WeightedRandomSampler, or RandomSampler, it wraps), the same whatever the number of
    processes. From position `pos` on, the draw is cut into chunks of world x batch_size samples;
    rank r trains on the r-th batch of each chunk. A last chunk too small to give every rank two
    rows (BatchNorm cannot train on one) is left out, as drop_last does: at most 2 x world - 1
    samples an epoch. set_epoch(epoch, pos) makes the next iteration start at that position."""

    def __init__(self, weights: np.ndarray | None, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.pos = 0, 0
        if not self.chunks(0):
            raise UserError(f"{n} training rows make no batch of at least 2 rows for each of the {world} processes "
                            f"(--batch-size {batch_size}): lower --batch-size or start fewer processes")

    def set_epoch(self, epoch: int, pos: int = 0) -> None:
        self.epoch, self.pos = epoch, pos

    def chunks(self, pos: int) -> list[tuple[int, int]]:
        """(start, end) positions of the chunks from pos to the epoch's end: one step of every rank each."""
        size, out = self.world * self.batch_size, []
        while self.n - pos >= 2 * self.world:
            out.append((pos, min(pos + size, self.n)))
            pos = out[-1][1]
        return out

    def draw(self) -> torch.Tensor:
        """The epoch's n indices, in order (the same on every rank and for any number of ranks)."""
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        base = (RandomSampler(range(self.n), generator=g) if self.weights is None
                else WeightedRandomSampler(self.weights, self.n, replacement=True, generator=g))
        return torch.tensor(list(base))

    def __iter__(self):
        order = self.draw()
        for start, end in self.chunks(self.pos):
            mine = np.array_split(np.arange(start, end), self.world)[self.rank]
            yield order[mine].tolist()

    def __len__(self) -> int:
        return len(self.chunks(self.pos))


def train_loader(dataset: XrayDataset, sampler: Sampler, workers: int | None, rt: Runtime) -> DataLoader:
    """The training loader: whole uint8 batches from the sampler, `workers` processes (None: 4 on
    CUDA, 0 on CPU) that stay up between epochs and ignore SIGTERM, pinned memory on CUDA."""
    workers = workers if workers is not None else (4 if rt.cuda else 0)
    # its own generator: making an iterator draws a seed for the workers, and must not draw it from
    # the global stream that dropout and augmentation use (a run resumed mid-epoch makes its iterator
    # at another point of that stream than the run it continues)
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers, pin_memory=rt.cuda,
                      persistent_workers=workers > 0, worker_init_fn=ignore_sigterm, generator=torch.Generator())


