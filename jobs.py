"""What one model trains and validates on (train.py's Job): its pathologies, the rows of each side
of the split after the label policies, the datasets, the sampler and the loader.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import UserError
from dataset import XrayDataset, sha1
from policies import policies_from_args, policy_counts, three_class_names, training_targets
from runtime import Runtime
from sampler import EpochSampler, sample_weights, train_loader


@dataclass
class Job:
    """What one model trains and validates on: its pathologies, rows, loaders and split."""
    names: list[str]
    folder: Path               # OUT_DIR/<slug>[/fold<I>]
    label: str                 # for messages
    head_type: str             # regression, or three-class (--head-type, or --uncertain NAME=three-class)
    policies: dict             # pathology -> its uncertain and blank policies and the training entries they give
    val_rows: pd.DataFrame     # path, patient, study, view of the validation rows
    train_targets: np.ndarray  # (n_train, K) float32 after the policies (the low end of a soft range), NaN = not in the loss
    val_targets: np.ndarray    # (n_val, K) the source labels on the project's scale (uncertain 0), NaN = blank
    train_means: np.ndarray    # (K,) the constant predictor's values
    train_set: XrayDataset
    val_set: XrayDataset
    sampler: EpochSampler
    loader: torch.utils.data.DataLoader
    split: dict                # seed, val_frac or folds, patient and row hashes: in checkpoints and summary.json
    runlog: object = None      # tracking.RunLog: TensorBoard events in folder/tb (rank 0)

    @property
    def n_train(self) -> int:
        return len(self.train_targets)

    @property
    def epoch_len(self) -> int:
        """Samples in an epoch's draw: the training rows times the image sources (--augmented)."""
        return self.sampler.n

    def n_train_of(self, k: int) -> int:
        """Training rows labelled for pathology k."""
        return int((~np.isnan(self.train_targets[:, k])).sum())


def prepare_job(names: list[str], folder: Path, table: pd.DataFrame, is_val: np.ndarray, split: dict,
                sources: list, args, rt: Runtime) -> Job | None:
    """Pick the rows labelled for any of `names` (and --view) on each side of the split and build the
    loaders; None (with one line) when either side is empty. Validation keeps the source labels;
    the --uncertain and --blank policies shape the training targets only (policies.training_targets:
    a range per entry, drawn from in train_step where it is a soft label)."""
    source = table[names].to_numpy(np.float32)
    uncertain, blank, lsr = policies_from_args(args, names)
    low, high = training_targets(source, names, uncertain, blank, lsr)
    in_view = np.ones(len(table), bool) if args.view == "all" else (table["view"] == args.view).to_numpy()
    # a training row needs a target after the policies (ignore masks, --blank negative adds); a
    # validation row a source label
    tr = np.flatnonzero(in_view & ~np.isnan(low).all(1) & ~is_val)
    va = np.flatnonzero(in_view & ~np.isnan(source).all(1) & is_val)
    label = (" + ".join(names) if len(names) <= 3 else f"{len(names)} pathologies") + (
        f" fold {split['fold']}" if "fold" in split else "")
    if len(tr) == 0 or len(va) == 0:
        rt.log(f"skipping {label} (view {args.view}): {len(tr)} training and {len(va)} validation rows are labelled")
        return None
    train_t, spread = low[tr], (high - low)[tr]
    # the constant predictor and the calibration's prior: the training rows' source labels, what the metric scores
    train_means = np.array([np.nanmean(c) if (~np.isnan(c)).any() else 0.0 for c in source[tr].T])
    slots = table["slot"].to_numpy()
    train_set = XrayDataset(sources, slots[tr], train_t, spread if np.nan_to_num(spread).any() else None)
    val_set = XrayDataset(sources[:1], slots[va], source[va])
    weights = np.tile(sample_weights(train_t, args.sampler_cap), len(sources)) if args.sampler else None
    sampler = EpochSampler(weights, len(train_set), args.batch_size, args.seed, rt.rank, rt.world)
    rows = table.iloc[np.r_[tr, va]]
    split = {**split, "rows_sha1": sha1([*rows["path"], source[np.r_[tr, va]].tobytes().hex(), len(tr)])}
    counts = policy_counts(source[tr], train_t, names, uncertain, blank)
    return Job(names, folder, label, head_type_of(names, uncertain, args.head_type, label), counts,
               table.iloc[va][["path", "patient", "study", "view"]].reset_index(drop=True),
               train_t, source[va], train_means, train_set, val_set, sampler,
               train_loader(train_set, sampler, args.loader_workers, rt), split)


def head_type_of(names: list[str], uncertain: dict, head_type: str, label: str) -> str:
    """The model's head type: --head-type, or three-class where --uncertain routes its pathologies
    there (a --multi-head model has one head type: all of its pathologies, or none)."""
    routed = three_class_names(uncertain)
    if head_type == "three-class" or not routed:
        return head_type
    if len(routed) < len(names):
        raise UserError(f"{label}: --uncertain routes {', '.join(routed)} to the three-class head and the others not; "
                        f"a --multi-head model has one head type: route all of them, or train one model each")
    return "three-class"
