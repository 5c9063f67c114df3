"""blend.json, written by experiments/blend.py and read by make_submission.py --blend, in one place:
its version and what it records of each member, so that a member retrained after the blend was
fitted is refused instead of silently given weights and a calibration fitted on another model's
outputs.

A member's fingerprint is what the blend was fitted on: each best.pt's epoch and validation loss
(a K-fold member's K folds, in fold order) and the SHA-256 of the validation predictions the blend
read (val_predictions.csv, or a K-fold member's oof_predictions.csv). blend.json keeps them as
    "fingerprints": {member: {"checkpoints": [{"epoch": 3, "val_loss": 0.41}, ...],
                              "predictions": "val_predictions.csv", "sha256": "9f86d0..."}}
No torch here: blend.py loads the checkpoints, make_submission.py has them loaded already.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from common import UserError, jsonable
from dataset import PATHOLOGIES

# 2: "fingerprints" added (a version 1 file, which has none, is refused: rerun experiments/blend.py)
BLEND_VERSION = 2


def predictions_file(folder: Path, kfold: bool) -> Path:
    """The validation predictions a blend member is fitted on: a K-fold model's
    oof_predictions.csv, else its val_predictions.csv."""
    return Path(folder) / ("oof_predictions.csv" if kfold else "val_predictions.csv")


def file_sha256(path: Path) -> str | None:
    """SHA-256 of a file's bytes (hex), read in 1 MiB pieces; None when there is no such file."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def fingerprint(models: list[tuple[int, float | None]], predictions: Path) -> dict:
    """A member's fingerprint, JSON-ready: models are (epoch, validation loss) of each best.pt (a
    K-fold member's in fold order), predictions its predictions_file."""
    return jsonable({"checkpoints": [{"epoch": epoch, "val_loss": loss} for epoch, loss in models],
                     "predictions": Path(predictions).name, "sha256": file_sha256(predictions)})


def checkpoint_record(ckpt) -> tuple[int, float | None]:
    """(epoch, validation loss) of a loaded model.Checkpoint, as fingerprint takes them."""
    return ckpt.epoch, (ckpt.metrics or {}).get("val_loss")


def changes(old: dict, new: dict) -> str:
    """What differs between two fingerprints, in words: 'best.pt epoch 3 -> 5, val_predictions.csv differs'."""
    def show(v):
        return f"{v:.6g}" if isinstance(v, float) else str(v)
    was, now = [c if isinstance(c, dict) else {} for c in old.get("checkpoints") or []], new["checkpoints"]
    out = [f"{len(was)} -> {len(now)} checkpoints"] if len(was) != len(now) else []
    for i, (a, b) in enumerate(zip(was, now)):
        out += [f"{f'fold{i}/' if len(now) > 1 else ''}best.pt {key.replace('_', ' ')} {show(a.get(key))} -> "
                f"{show(b[key])}" for key in ("epoch", "val_loss") if a.get(key) != b[key]]
    if old.get("sha256") != new["sha256"]:
        out.append(f"{new['predictions']} " + ("is gone" if new["sha256"] is None else "differs"))
    return ", ".join(out) or "its record differs"


def check_fingerprints(path: Path, recorded, members: dict[str, tuple[list, bool]], folder: Path) -> None:
    """Every member is the model the blend at `path` was fitted on. recorded: blend.json's
    "fingerprints"; members: name -> (its loaded model.Checkpoint objects, in fold order; whether
    K-fold), found at folder/<name>. A UserError naming the first member that changed, and how."""
    if not isinstance(recorded, dict):
        raise UserError(f"--blend {path}: records no fingerprints of its members (written by an older "
                        f"experiments/blend.py), so a retrained member would go unnoticed; rerun experiments/blend.py")
    for name, (ckpts, kfold) in sorted(members.items()):
        now = fingerprint([checkpoint_record(c) for c in ckpts], predictions_file(Path(folder) / name, kfold))
        was = recorded.get(name)
        if was != now:
            what = changes(was if isinstance(was, dict) else {}, now)
            raise UserError(f"--blend {path}: member {name} changed since the blend was fitted ({what}), and its "
                            f"weights and calibration were fitted on the old one's outputs; rerun experiments/blend.py "
                            f"on its runs")


@dataclass
class Blend:
    """One pathology of blend.json: its members as (source index, output column), in the entry's
    order, and the entry itself (weights, lambda, a, b, w_frontal), which calibration.apply_blend reads."""
    members: list[tuple[int, int]]
    params: dict


def load_blend(path: Path, sources: list, folder: Path) -> dict[str, Blend]:
    """make_submission.py --blend: blend.json's pathologies with their members among the loaded
    checkpoints (make_submission.Source: folder, kfold, ckpts, pathologies): member
    'run_a/cardiomegaly' is folder/run_a/cardiomegaly/best.pt, or the K-fold model of its
    fold<I>/best.pt. A missing member, one that does not predict the pathology, or one that changed
    since the blend was fitted (check_fingerprints) is an error naming it; a pathology that is no
    submission column is left out with a warning."""
    try:
        data = json.loads(Path(path).read_text())
        entries = data["pathologies"]
        wanted = {name: (list(e["members"]), len(e["weights"])) for name, e in entries.items()}
    except FileNotFoundError as e:
        raise UserError(f"--blend {path}: no such file") from e
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--blend {path}: not a blend file of experiments/blend.py ({type(e).__name__}: {e})") from e
    # a folder holding both a best.pt and fold<I>/ folders: blend.py took the K-fold model
    index = {src.folder: s for s, src in sorted(enumerate(sources), key=lambda e: e[1].kfold)}
    missing = sorted({m for members, _ in wanted.values() for m in members if m not in index})
    if missing:
        raise UserError(f"--blend {path}: no checkpoint for member{'s' * (len(missing) > 1)} {', '.join(missing)} "
                        f"(no {Path(folder) / missing[0] / 'best.pt'}); pass --checkpoints the folder that holds the "
                        f"runs blend.py was given")
    check_fingerprints(path, data.get("fingerprints"), {m: (sources[index[m]].ckpts, sources[index[m]].kfold)
                                                        for members, _ in wanted.values() for m in members}, folder)
    blends = {}
    for name, (members, n_weights) in wanted.items():
        if name not in PATHOLOGIES:
            warnings.warn(f"--blend {path}: ignoring {name}: not a submission column", stacklevel=2)
            continue
        if n_weights != len(members):
            raise UserError(f"--blend {path}: {name} has {n_weights} weights for {len(members)} members")
        found = []
        for m in members:
            src = sources[index[m]]
            if name not in src.pathologies:
                raise UserError(f"--blend {path}: member {m} does not predict {name} (it predicts "
                                f"{', '.join(src.pathologies)})")
            found.append((index[m], src.pathologies.index(name)))
        blends[name] = Blend(found, entries[name])
    return blends
