"""Data: CSV reading, labels and policies, patient splits, the grayscale uint8 image cache, the demo
dataset and the Dataset that serves training batches.

    python dataset.py --data-root DIR [--csv FILE] [--image-size N] [--cache-dir DIR] [--workers N]
    python dataset.py --csv FILE --labels-only [--label-convention auto|cs156b|chexpert]

builds (or finishes) the image cache for one CSV and prints a summary, ending, for a train CSV, with
the per-label counts (positive, uncertain, negative, blank on the project's scale) and the label
convention it was read with. --labels-only prints just those counts and reads no image. With no
--data-root it uses the demo dataset, made on first use under ./demo_data.

Cache layout (never under the data root): CACHE_DIR/<csv stem>-<size>px-<key>/
    meta.json            the key's inputs: image paths (row order = slot order), size, square mode
    shard_00000.pt ...   {"images": uint8 (n, S, S)}, shard_size images each (default 1024,
                         --shard-size), loaded with torch.load(mmap=True). Written to a temporary
                         name and renamed, so a shard file that exists is complete.
    shard_00000.json     {"ok": [bool], "errors": [str]} for that shard, written just before it.
The key hashes everything that changes pixels: the data root, the ordered image paths, the size, the
square mode and CACHE_VERSION (not the shard size, which only changes the layout: a cache built with
any shard size is found by every script). Augmented copies (experiments/) live beside it as
<folder>+<name>. A build killed mid-write leaves a '.NAME.tmp-HOST-PID' file; the next build on that
host removes it once that process is gone.

torch is imported inside the functions that need it: `python dataset.py` on a complete cache then
returns in well under a second, which matters when a SLURM array starts hundreds of jobs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

# The one list of pathology names: the CS 156b labels, in the submission's column order.
PATHOLOGIES = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Pneumonia",
    "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices",
]
# Stanford CheXpert's 14 labels (the nine above plus five more), in its CSV order.
CHEXPERT_LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]
ALL_LABELS = PATHOLOGIES + [n for n in CHEXPERT_LABELS if n not in PATHOLOGIES]
VIEWS = ("frontal", "lateral")
UNCERTAIN_POLICIES = ("keep", "ignore", "ones", "zeros")  # zeros = U-Zeros: uncertain -> -1
LABEL_CONVENTIONS = ("auto", "cs156b", "chexpert")  # how a source CSV writes its labels (see detect_convention)
LABEL_COUNT_COLUMNS = ["label", "positive", "uncertain", "negative", "blank"]
SQUARE_MODES = ("resize", "crop")
STRAY_PREFIX = "CheXpert-v1.0/"  # rows in train2023.csv whose files do not exist
CACHE_VERSION = 1
SHARD_SIZE = 1024
LOCK_STALE_S = 600  # a build lock untouched this long is taken over: its builder hung, or its host died
LOCK_POLL_S = 1.0   # how often a process waiting on another's build looks again
N_NAMED = 10  # bad images named in a warning; the count covers them all
DEMO_ROOT = Path("demo_data")
IMAGE_MEAN, IMAGE_STD = 0.449, 0.226  # ImageNet's RGB statistics averaged to one gray channel


class UserError(Exception):
    """An error the user caused (bad path, bad value): scripts print it as one line and exit 2."""


def run_cli(main: Callable, argv=None) -> int:
    """Run a script's main(); a UserError becomes one 'error: ...' line on stderr and exit code 2."""
    warnings.formatwarning = lambda msg, category, *a, **k: f"warning: {msg}\n"
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def slug(name: str, view: str = "all") -> str:
    """'Pleural Effusion' -> 'pleural_effusion'; a one-view model adds it: 'pleural_effusion_lateral'."""
    s = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return s if view == "all" else f"{s}_{view}"


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table; floats get 4 decimals, NaN/None print as '-'."""
    def cell(v):
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what SLURM gave this job, not the whole node
    except AttributeError:
        return os.cpu_count() or 1


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) then rename tmp to path: path is either the old file or the new one, whole.
    A failed write (disk full, read-only folder) leaves the old file as it was and raises UserError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise UserError(f"could not write {path}: {e.strerror or e}") from e
    except BaseException:
        _discard(tmp)
        raise


def _discard(path: Path) -> None:
    """Remove a temporary file if it is there; never raise (its folder may not even exist)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def save_torch(obj, path: Path) -> None:
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------------------------------------
# CSVs and labels

def read_csv_text(csv_path: Path, what: str = "", nrows: int | None = None) -> pd.DataFrame:
    """A CSV with every cell as text ('' for empty), nrows rows (all by default). A missing or
    unreadable file is a UserError naming it, after `what` (e.g. '--labels ')."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{what}{csv_path}: no such CSV file")
    try:
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False, nrows=nrows)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{what}{csv_path}: not a readable CSV ({str(e).splitlines()[0]})") from e


def read_header(csv_path: Path, what: str = "") -> list[str]:
    """A CSV's column names, without reading its rows; errors as read_csv_text's."""
    return list(read_csv_text(csv_path, what, nrows=0).columns)


def _require(df: pd.DataFrame, columns, csv_path) -> None:
    for c in columns:
        if c not in df.columns:
            raise UserError(f"{csv_path}: missing required column '{c}' (has: {', '.join(df.columns)})")


def _ids_from_paths(paths: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Patient ('pid50512' or 'patient00001') and study ('pid50512/study1') from each path."""
    m = paths.str.extract(r"((?:pid|patient)\d+)/(study\d+)/")
    fallback = paths.map(lambda p: "/".join(Path(p).parts[-3:-1]))
    patient = m[0].fillna(fallback.map(lambda s: s.split("/")[0]))
    study = (m[0] + "/" + m[1]).fillna(fallback)
    return patient, study


def view_from_filename(paths: pd.Series) -> pd.Series:
    """'…/view1_frontal.jpg' -> 'frontal' (test CSVs have no view column)."""
    v = paths.str.extract(r"_(frontal|lateral)\.\w+$", flags=re.IGNORECASE)[0].str.lower()
    return v.fillna("frontal")


_CONVENTION_TEXT = {"cs156b": "CS 156b (1 positive, 0 uncertain, -1 negative",
                    "chexpert": "Stanford CheXpert (1 positive, 0 negative, -1 uncertain"}
_CONVENTION_HOW = {"given": "set by --label-convention", "detected": "detected from the layout",
                   "default": "the layout does not tell, so assumed: "
                              "pass --label-convention chexpert if this is a Stanford CSV"}


def detect_convention(columns, paths) -> str | None:
    """The label convention a CSV's layout implies, or None when it cannot tell.

    Columns first: any 'Unnamed: …' index column means CS 156b ('cs156b'; Stanford's CSVs have
    none). Otherwise the majority of paths: 'train/pid50512/…' is CS 156b, 'CheXpert-v1.0…/' or
    'patient00001/…' is Stanford ('chexpert'). A few stray 'CheXpert-v1.0/' rows in a CS 156b file
    do not outvote its own; no paths, or as many of each, is None."""
    if any(str(c).startswith("Unnamed") for c in columns):
        return "cs156b"
    paths = pd.Series(list(paths), dtype=object).astype(str).str.strip()
    n_cs156b = int(paths.str.contains(r"(?:^|/)pid\d+/").sum())
    n_chexpert = int(paths.str.contains(r"^CheXpert-v1\.0|(?:^|/)patient\d+/").sum())
    if n_cs156b == n_chexpert:
        return None
    return "cs156b" if n_cs156b > n_chexpert else "chexpert"


def choose_convention(convention: str, columns, paths) -> tuple[str, str]:
    """(name, how) for a CSV: an explicit 'cs156b' / 'chexpert' wins (how 'given'); 'auto' detects
    it from the layout ('detected'), falling back to 'cs156b' when the layout cannot tell ('default')."""
    if convention not in LABEL_CONVENTIONS:
        raise UserError(f"unknown label convention {convention!r} (choose from {', '.join(LABEL_CONVENTIONS)})")
    if convention != "auto":
        return convention, "given"
    found = detect_convention(columns, paths)
    return (found, "detected") if found else ("cs156b", "default")


def describe_convention(name: str, how: str = "detected") -> str:
    """One line for people, e.g. 'labels read as Stanford CheXpert (1 positive, 0 negative,
    -1 uncertain; detected from the layout)'."""
    return f"labels read as {_CONVENTION_TEXT[name]}; {_CONVENTION_HOW[how]})"


def to_internal_labels(values: np.ndarray, convention: str) -> np.ndarray:
    """Map a source's label values onto the project's scale: 1 positive, 0 uncertain, -1 negative,
    NaN blank. 'cs156b' is that scale already; 'chexpert' (1 positive, 0 negative, -1 uncertain)
    swaps 0 and -1. values: float array of 1, 0, -1, NaN; returns a float64 array of the same shape."""
    values = np.asarray(values, dtype=np.float64)
    if convention == "chexpert":
        return np.where(values == 0.0, -1.0, np.where(values == -1.0, 0.0, values))
    return values.copy()


def parse_label_column(raw: pd.DataFrame, col: str, convention: str, where: str, line: pd.Series) -> np.ndarray:
    """One label column of a CSV read as text -> float64 on the project's scale (NaN = blank).
    Anything but 1, 0, -1 (1.0, -1.0, ...) or blank is an error naming `where`, the line (line[i]
    for row i) and the column."""
    text = raw[col].str.strip()
    values = pd.to_numeric(text, errors="coerce")
    bad = (text != "") & ~values.isin([-1.0, 0.0, 1.0])
    if bad.any():
        i = bad.idxmax()
        raise UserError(f"{where}: line {line[i]}, column '{col}': invalid label {raw[col][i]!r} "
                        f"(expected 1, 0, -1 or blank)")
    return to_internal_labels(values.to_numpy(np.float64), convention)


def label_counts(df: pd.DataFrame) -> list[dict]:
    """Per label column of a table from read_train_csv (df.attrs['labels']): how many rows are
    positive (1), uncertain (0), negative (-1) and blank (NaN), on the project's scale, that is
    after the convention mapping and the uncertain policy. Rows have LABEL_COUNT_COLUMNS."""
    rows = []
    for name in df.attrs["labels"]:
        v = df[name].to_numpy(np.float64)
        rows.append({"label": name, "positive": int((v == 1).sum()), "uncertain": int((v == 0).sum()),
                     "negative": int((v == -1).sum()), "blank": int(np.isnan(v).sum())})
    return rows


def read_train_csv(csv_path: Path, uncertain: str = "keep", convention: str = "auto") -> pd.DataFrame:
    """Read a CS 156b train2023.csv or a Stanford CheXpert train.csv/valid.csv.

    Returns one row per image with columns path, patient, study, view and one float32 column per
    label (those after 'AP/PA' in the header) on [-1, 1], NaN = blank (never filled). The labels are
    first mapped onto the project's scale (1 positive, 0 uncertain, -1 negative) from the source's
    convention: `convention` 'cs156b' or 'chexpert', or 'auto' to detect it (choose_convention).
    Then the uncertain policy maps the uncertain 0: keep (0), ignore (NaN), ones (1), zeros (-1).
    df.attrs: 'labels' lists the label columns; 'label_convention' the convention used and
    'label_convention_how' how it was chosen (describe_convention makes a line of the two);
    'n_stray' counts the stray 'CheXpert-v1.0/…' rows of train2023.csv, dropped with one warning
    (a CSV whose every path starts so, Stanford's full-size set, has none)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise UserError(f"unknown uncertain policy {uncertain!r} (choose from {', '.join(UNCERTAIN_POLICIES)})")
    raw = read_csv_text(csv_path)
    name, how = choose_convention(convention, raw.columns, raw["Path"] if "Path" in raw.columns else [])
    _require(raw, ["Path", "AP/PA"], csv_path)
    labels = list(raw.columns[raw.columns.get_loc("AP/PA") + 1:])
    if not labels:
        raise UserError(f"{csv_path}: no label columns after 'AP/PA'")
    line = pd.Series(np.arange(len(raw)) + 2, index=raw.index)  # header is line 1

    stray = raw["Path"].str.strip().str.startswith(STRAY_PREFIX)
    if stray.all():  # Stanford's full-size CheXpert: every path is under CheXpert-v1.0/, none stray
        stray[:] = False
    if stray.any():
        warnings.warn(f"{csv_path}: dropped {int(stray.sum())} stray rows whose path starts "
                      f"'{STRAY_PREFIX}' (no such files)", stacklevel=2)
    raw, line = raw[~stray], line[~stray]
    n_stray = int(stray.sum())

    out = pd.DataFrame({"path": raw["Path"].str.strip()})
    out["patient"], out["study"] = _ids_from_paths(out["path"])
    if "Frontal/Lateral" in raw.columns:
        out["view"] = raw["Frontal/Lateral"].str.strip().str.lower()
        bad = ~out["view"].isin(VIEWS)
        out.loc[bad, "view"] = view_from_filename(out.loc[bad, "path"])
    else:
        out["view"] = view_from_filename(out["path"])
    mapping = {"keep": 0.0, "ignore": np.nan, "ones": 1.0, "zeros": -1.0}[uncertain]
    for col in labels:
        values = parse_label_column(raw, col, name, str(csv_path), line)
        values = np.where(values == 0.0, mapping, values) if uncertain != "keep" else values
        out[col] = values.astype(np.float32)
    out = out.reset_index(drop=True)
    out.attrs.update(labels=labels, n_stray=n_stray, label_convention=name, label_convention_how=how)
    return out


def read_test_csv(csv_path: Path) -> pd.DataFrame:
    """Read an 'Id, Path' test CSV (test_ids.csv, solution_ids.csv). Returns columns Id (int), path,
    patient, study, view; the view comes from the file name (viewN_frontal.jpg / viewN_lateral.jpg)."""
    raw = read_csv_text(csv_path)
    _require(raw, ["Id", "Path"], csv_path)
    ids = pd.to_numeric(raw["Id"].str.strip(), errors="coerce")
    bad = ids.isna() | (ids != ids.round())
    if bad.any():
        i = bad.idxmax()
        raise UserError(f"{csv_path}: line {i + 2}, column 'Id': {raw['Id'][i]!r} is not an integer")
    dup = ids.duplicated()
    if dup.any():
        i = dup.idxmax()
        raise UserError(f"{csv_path}: line {i + 2}: Id {int(ids[i])} appears more than once")
    out = pd.DataFrame({"Id": ids.astype(np.int64), "path": raw["Path"].str.strip()})
    out["patient"], out["study"] = _ids_from_paths(out["path"])
    out["view"] = view_from_filename(out["path"])
    return out


def check_pathologies(names: list[str], available: list[str] | None = None) -> list[str]:
    """Expand 'all' and check each name; 'all' means the CSV's labels that are known pathologies."""
    available = list(available) if available is not None else PATHOLOGIES
    if [n.lower() for n in names] == ["all"]:
        return [n for n in ALL_LABELS if n in available]
    by_lower = {n.lower(): n for n in ALL_LABELS}
    out = []
    for n in names:
        canon = by_lower.get(n.lower()) or by_lower.get(n.lower().replace("_", " "))
        if canon is None:
            raise UserError(f"unknown pathology {n!r}; valid names: {', '.join(available)} (or 'all')")
        if canon not in available:
            raise UserError(f"pathology {canon!r} is not a label column of this CSV; "
                            f"its labels are: {', '.join(available)}")
        if canon not in out:
            out.append(canon)
    return out


def split_by_patient(patients: pd.Series, val_frac: float, seed: int) -> np.ndarray:
    """Boolean mask, True = validation. Whole patients go to one side; the same seed and patients
    give the same split whatever the row order (patients are sorted before the shuffle)."""
    if not 0.0 < val_frac < 1.0:
        raise UserError(f"--val-frac must be between 0 and 1, got {val_frac}")
    unique = np.array(sorted(patients.unique()))
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(val_frac * len(unique)))) if len(unique) > 1 else 0
    val_patients = set(rng.permutation(unique)[:n_val])
    return patients.isin(val_patients).to_numpy()


# ---------------------------------------------------------------------------------------------
# Image decoding and the cache

def load_image(path: Path, size: int, square: str = "resize") -> np.ndarray:
    """Decode one image to uint8 (size, size) grayscale.

    JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT, to the smallest scale
    that keeps both sides >= size; a 2300 x 2750 X-ray at 256 px decodes at 1/8, about 20x faster
    than a full decode. Non-square images are made square by `square`: 'resize' squashes the whole
    image to size x size (aspect ratio not kept, nothing cut off: the default, as in the original);
    'crop' takes the central square of side min(w, h), then resizes."""
    with Image.open(path) as im:
        im.draft("L", (size, size))
        im = im.convert("L")
        w, h = im.size
        box = None
        if square == "crop":
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return np.asarray(im, dtype=np.uint8)


def _decode_chunk(task):
    """Worker: decode one chunk. Returns (start, uint8 (n, S, S), ok (n,), errors [str])."""
    start, paths, size, square = task
    time.sleep(float(os.environ.get("CXR_TEST_DECODE_DELAY", "0")))  # tests: a build slower than a collective's timeout
    images = np.zeros((len(paths), size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    errors = [""] * len(paths)
    for i, p in enumerate(paths):
        try:
            images[i] = load_image(p, size, square)
            ok[i] = True
        except FileNotFoundError:
            errors[i] = "missing"
        except Exception as e:  # truncated JPEG, random bytes, empty file, not an image
            errors[i] = f"unreadable ({type(e).__name__}: {e})"[:200]
    return start, images, ok, errors


class ImageCache:
    """A built image cache: get(slots) -> uint8 (B, 1, S, S). Shards load lazily, memory-mapped, so
    a DataLoader worker or another rank shares the OS page cache rather than a copy."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            meta = json.loads((self.folder / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{self.folder / 'meta.json'}: unreadable cache index ({e}); delete {self.folder} "
                            f"and rerun dataset.py") from e
        self.meta = meta
        self.paths: list[str] = meta["paths"]
        self.size: int = meta["size"]
        self.square: str = meta["square"]
        self.shard_size: int = meta["shard_size"]
        self._shards: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_shards(self) -> int:
        return -(-len(self.paths) // self.shard_size)

    def shard_path(self, k: int) -> Path:
        return self.folder / f"shard_{k:05d}.pt"

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.n_shards)
                if not (self.shard_path(k).is_file() and self.shard_path(k).with_suffix(".json").is_file())]

    def shard(self, k: int) -> dict:
        if k not in self._shards:
            import torch
            try:
                self._shards[k] = torch.load(self.shard_path(k), mmap=True, weights_only=True)
            except FileNotFoundError as e:
                raise UserError(f"{self.shard_path(k)}: cache shard missing; rerun dataset.py to finish the cache") from e
            except Exception as e:
                raise UserError(f"{self.shard_path(k)}: corrupt cache shard ({e}); delete it and rerun dataset.py") from e
        return self._shards[k]

    def status(self) -> tuple[np.ndarray, list[str]]:
        """ok (N,) bool and the error text of each slot ('' when ok); reads no pixels."""
        ok, errors = [], []
        for k in range(self.n_shards):
            s = _read_status(self, k)
            ok += s["ok"]
            errors += s["errors"]
        return np.array(ok, dtype=bool), errors

    def get(self, slots) -> "torch.Tensor":
        """uint8 (B, 1, S, S) for the given slot numbers."""
        import torch
        slots = np.asarray(slots, dtype=np.int64)
        out = torch.empty((len(slots), 1, self.size, self.size), dtype=torch.uint8)
        shard_of = slots // self.shard_size
        for k in np.unique(shard_of):
            sel = np.nonzero(shard_of == k)[0]
            out[torch.from_numpy(sel), 0] = self.shard(int(k))["images"][torch.from_numpy(slots[sel] % self.shard_size)]
        return out


def cache_folder(cache_dir: Path, name: str, data_root: Path, paths: list[str], size: int,
                 square: str, shard_size: int = SHARD_SIZE) -> tuple[Path, dict]:
    """The cache folder for these inputs, and the meta that keys it (shard_size is recorded, not keyed)."""
    meta = {"version": CACHE_VERSION, "data_root": str(Path(data_root).resolve()), "size": int(size),
            "square": square, "paths": list(paths)}
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{name}-{size}px-{key}", {**meta, "shard_size": int(shard_size)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BuildLock:
    """This process's claim, by lock file, to build what other processes wait for (see claim_build).
    touch() as the work goes on (a heartbeat); release() (or leaving a `with`) removes the file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def touch(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self) -> None:
        if _lock_owner(self.path) == _lock_text():  # not a lock that another process has taken over since
            _discard(self.path)

    def __enter__(self) -> "BuildLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_text() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _lock_owner(path: Path) -> str | None:
    """'HOST PID' from a lock file; None when there is none (or it is not written yet)."""
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _lock_stale(path: Path) -> bool:
    """A lock whose builder is gone: a dead process on this host, or no heartbeat for LOCK_STALE_S
    (the builder hung, or its host died: another host's pid cannot be checked)."""
    owner = _lock_owner(path)
    try:
        age = time.time() - Path(path).stat().st_mtime
    except OSError:
        return False  # released meanwhile
    host, _, pid = (owner or "").partition(" ")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return True
    return age > LOCK_STALE_S


def claim_build(lock: Path, done: Callable[[], bool], what: str) -> BuildLock | None:
    """For work that several processes need at once (torchrun's ranks, the nodes of a job, array
    tasks): returns None once done() holds, or a BuildLock when this process is to do the work.

    A process that finds the work undone tries to create `lock` (O_CREAT | O_EXCL: exactly one
    wins, on one host or on many sharing the folder); the others wait on the files, polling with
    no timeout, never inside a torch.distributed collective (whose timeout a long build outlasts).
    A dead builder's lock is taken over (see _lock_stale). Correctness never rests on the lock:
    every file is written atomically, so a second builder could only waste time."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while not done():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_stale(lock):
                print(f"taking over {what} from {_lock_owner(lock)}, which is gone", file=sys.stderr, flush=True)
                _discard(lock)
                continue
            if not told:
                print(f"waiting for {what}, being built by {_lock_owner(lock) or 'another process'}",
                      file=sys.stderr, flush=True)
                told = True
            while lock.exists() and not _lock_stale(lock):
                time.sleep(LOCK_POLL_S)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_lock_text() + "\n")
        return BuildLock(lock)
    return None


def _remove_stale_tmp(folder: Path) -> None:
    """Remove the temporary files that killed writers on this host left in folder (see atomic_write).
    Another host's are left alone: its process may still be writing (shared cluster filesystem)."""
    host = socket.gethostname()
    for f in Path(folder).glob(".*.tmp-*"):
        h, _, pid = f.name.rsplit(".tmp-", 1)[1].rpartition("-")
        if h == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _discard(f)


def _write_shards(cache: ImageCache, chunks, n_images: int, desc: str, progress: bool,
                  tick: Callable[[], None] = lambda: None) -> None:
    """Assemble ordered (start, images, ok, errors) chunks into shards; save each one as it fills.
    tick() after every chunk (the build lock's heartbeat)."""
    import torch
    buf: dict[int, list] = {}
    with tqdm(total=n_images, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start, images, ok, errors in chunks:
            tick()
            k = start // cache.shard_size
            buf.setdefault(k, []).append((images, ok, errors))
            bar.update(len(ok))
            n_k = min(cache.shard_size, len(cache) - k * cache.shard_size)
            if sum(len(o) for _, o, _ in buf[k]) == n_k:
                parts = buf.pop(k)
                status = {"ok": [bool(o) for p in parts for o in p[1]], "errors": [e for p in parts for e in p[2]]}
                _save_shard(cache, k, torch.from_numpy(np.concatenate([p[0] for p in parts])), status)


def _save_shard(cache: ImageCache, k: int, images, status: dict) -> None:
    """Status first, pixels second: a shard whose .pt exists is complete, with its status."""
    write_text(cache.shard_path(k).with_suffix(".json"), json.dumps(status))
    save_torch({"images": images}, cache.shard_path(k))


def build_cache(paths: list[str], data_root: Path, size: int, cache_dir: Path, name: str = "images",
                square: str = "resize", workers: int | None = None, progress: bool = True,
                chunk: int = 8, shard_size: int | None = None) -> ImageCache:
    """Build, or finish, the cache of `paths` (relative to data_root). Returns it complete.

    Only the shards that are missing are decoded, in parallel over `workers` processes; a killed
    build therefore keeps every shard it finished. Nothing is written under data_root. shard_size
    (images per shard file, default SHARD_SIZE) applies to a new cache; an existing one keeps its own.
    A complete shard with an image that failed before (missing, unreadable) but decodes now is redone."""
    if size < 8:
        raise UserError(f"--image-size must be at least 8, got {size}")
    if square not in SQUARE_MODES:
        raise UserError(f"unknown square mode {square!r} (choose from {', '.join(SQUARE_MODES)})")
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    data_root = Path(data_root)
    folder, meta = cache_folder(cache_dir, name, data_root, paths, size, square, shard_size or SHARD_SIZE)
    _refuse_inside(folder, data_root)
    if not (folder / "meta.json").is_file():
        write_text(folder / "meta.json", json.dumps(meta))
    cache = ImageCache(folder)
    claim = claim_build(folder / "build.lock", lambda: not _todo(cache, data_root), f"the image cache {folder}")
    if claim is None:  # complete, or completed meanwhile by another process
        return cache
    with claim:
        _build_shards(cache, _todo(cache, data_root), data_root, workers, chunk, f"caching {name} at {size}px",
                      progress, claim.touch)
    return cache


def _todo(cache: ImageCache, data_root: Path) -> list[int]:
    """The shards to (re)build: missing ones, and complete ones with an image that decodes now."""
    todo = cache.missing_shards()
    return todo + _recovered_shards(cache, data_root, skip=todo)


def _build_shards(cache: ImageCache, todo: list[int], data_root: Path, workers: int | None, chunk: int, desc: str,
                  progress: bool, tick: Callable[[], None]) -> None:
    """Decode the images of shards `todo` over `workers` processes and save each shard as it fills."""
    if not todo:
        return
    paths, size, square = cache.paths, cache.size, cache.square
    _remove_stale_tmp(cache.folder)
    tasks = []
    for k in todo:
        lo, hi = k * cache.shard_size, min((k + 1) * cache.shard_size, len(paths))
        for s in range(lo, hi, chunk):
            tasks.append((s, [data_root / p for p in paths[s:min(s + chunk, hi)]], size, square))
    n_images = sum(len(t[1]) for t in tasks)
    workers = max(1, min(workers or default_workers(), len(tasks)))
    if workers == 1:
        _write_shards(cache, map(_decode_chunk, tasks), n_images, desc, progress, tick)
    else:
        import multiprocessing as mp
        # fork: workers start at once and need nothing pickled but the task (paths, size).
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(workers) as pool:
            _write_shards(cache, pool.imap(_decode_chunk, tasks), n_images, desc, progress, tick)


def _read_status(cache: ImageCache, k: int) -> dict:
    return json.loads(cache.shard_path(k).with_suffix(".json").read_text())


def _recovered_shards(cache: ImageCache, data_root: Path, skip: list[int]) -> list[int]:
    """Complete shards holding an image that failed before but decodes now (a missing file copied
    in, a broken one replaced): they are redone, so fixing the data needs no cache surgery. Only the
    failed images are tried, so a rerun on a complete cache stays quick."""
    redo = []
    for k in range(cache.n_shards):
        if k in skip:
            continue
        for j, ok in enumerate(_read_status(cache, k)["ok"]):
            path = Path(data_root) / cache.paths[k * cache.shard_size + j]
            if not ok and path.is_file():
                try:
                    load_image(path, cache.size, cache.square)
                except Exception:
                    continue
                redo.append(k)
                break
    return redo


def derive_cache(base: ImageCache, name: str, transform: Callable, progress: bool = True) -> ImageCache:
    """Build, or finish, an augmented copy of `base`: slot i is transform(base slot i).
    `transform` maps uint8 (n, S, S) -> uint8 (n, S, S). It lives beside base as <folder>+<name>."""
    import torch
    folder = base.folder.with_name(f"{base.folder.name}+{name}")
    if not (folder / "meta.json").is_file():
        write_text(folder / "meta.json", json.dumps({**base.meta, "transform": name, "base": base.folder.name}))
    cache = ImageCache(folder)
    todo = cache.missing_shards()
    # a base shard redone since (an image that failed before reads now) is redone here too
    todo += [k for k in range(cache.n_shards) if k not in todo
             and _read_status(cache, k) != _read_status(base, k)]
    if todo:
        _remove_stale_tmp(folder)
    for k in tqdm(todo, desc=f"building {name} copies", unit="shard", disable=not progress):
        images = transform(base.shard(k)["images"].clone()).to(torch.uint8).contiguous()
        status = json.loads(base.shard_path(k).with_suffix(".json").read_text())
        _save_shard(cache, k, images, status)
    return cache


def find_augmented(base: ImageCache, name: str) -> ImageCache:
    """The built augmented copy 'name' of base ('flip', 'contrast' or an exact 'contrast1.5')."""
    exact = base.folder.with_name(f"{base.folder.name}+{name}")
    found = [exact] if exact.is_dir() else sorted(base.folder.parent.glob(f"{base.folder.name}+{name}*"))
    if len(found) > 1:
        raise UserError(f"several '{name}' copies are built ({', '.join(f.name.split('+')[-1] for f in found)}); "
                        f"name one exactly, e.g. --augmented {found[0].name.split('+')[-1]}")
    if not found or ImageCache(found[0]).missing_shards():
        raise UserError(f"augmented copy '{name}' is not built for {base.folder}; run "
                        f"python experiments/{name.rstrip('0123456789.')}_images.py with the same "
                        f"--data-root, --csv, --image-size and --cache-dir")
    return ImageCache(found[0])


def _refuse_inside(folder: Path, data_root: Path) -> None:
    f, r = Path(folder).resolve(), Path(data_root).resolve()
    if f == r or r in f.parents:
        raise UserError(f"--cache-dir {folder.parent} is inside the data root {data_root}; "
                        f"nothing is ever written there: choose another --cache-dir")


def flip_images(x):
    """Horizontal flip of uint8 (..., S, S)."""
    return x.flip(-1)


def adjust_contrast(x, factor: float):
    """Scale contrast by `factor` around each image's mean, clipped to [0, 255]; uint8 (..., S, S)."""
    import torch
    f = x.float()
    mean = f.mean(dim=(-2, -1), keepdim=True)
    return ((f - mean) * factor + mean).round_().clamp_(0, 255).to(torch.uint8)


# On-the-fly augmentation presets for train.py --augment. Ranges are drawn uniformly, per sample:
#   scale       area of the random crop, as a fraction of the image (then resized to the full S x S)
#   ratio       the crop's width / height, drawn log-uniformly (the crop is clipped to the image)
#   degrees     rotation, counter-clockwise as displayed
#   brightness  multiplies every pixel
#   contrast    scales the distance from the image's mean
#   flip        probability of a horizontal mirror (the heart is on one side: a choice, not a default)
#   erase       probability of one random rectangle filled with the gray of IMAGE_MEAN,
#               whose area (erase_scale, fraction of the image) and width/height (erase_ratio) are drawn
_STANDARD = {"scale": (0.8, 1.0), "ratio": (3 / 4, 4 / 3), "degrees": (-10.0, 10.0),
             "brightness": (0.9, 1.1), "contrast": (0.9, 1.1)}
AUGMENT_PRESETS = {
    "none": {},                                   # the input itself, untouched
    "standard": _STANDARD,                        # crop + rotation + brightness/contrast
    "flip": {**_STANDARD, "flip": 0.5},           # standard + horizontal flip of half the samples
    "strong": {**_STANDARD, "flip": 0.5, "erase": 0.5, "erase_scale": (0.02, 0.2), "erase_ratio": (0.3, 3.3)},
}
_AUGMENT_KEYS = {"scale", "ratio", "degrees", "brightness", "contrast", "flip", "erase", "erase_scale", "erase_ratio"}


def augment_batch(images, preset: str | dict, generator=None):
    """Random per-sample augmentation of uint8 (B, 1, S, S) images on their own device (CPU or CUDA).

    preset: a name in AUGMENT_PRESETS or a dict of the same keys (see the comment above it):
      none      the input itself, no work
      standard  random resized crop (area 0.8-1.0, width/height 3/4-4/3), rotation (+-10 degrees),
                brightness x0.9-1.1, contrast x0.9-1.1
      flip      standard + horizontal flip of half the samples (the heart is on one side: opt in)
      strong    flip + random erasing of half the samples (2-20% of the image, IMAGE_MEAN gray)
    Returns uint8 (B, 1, S, S) on the same device; 'none' (or {}) returns `images` itself. Every
    sample draws its own crop, angle, flip, brightness, contrast and erased rectangle, from the
    `generator` when given (reproducible; on any device), else from torch's default RNG of the
    images' device (seeded by torch.manual_seed, saved in last.pt for --resume).
    Crop, rotation and flip are one affine map per sample, applied in a single bilinear
    grid_sample (outside the image reads 0, black); brightness and contrast act on that float
    result; one rounding to uint8 at the end. Batched ops only: no per-sample Python loop."""
    import torch
    p = AUGMENT_PRESETS[preset] if isinstance(preset, str) else preset
    unknown = set(p) - _AUGMENT_KEYS
    if unknown:
        raise ValueError(f"unknown augmentation parameter(s): {', '.join(sorted(unknown))}")
    if not p:
        return images
    # every random number of the batch in one draw, on the images' device unless the generator lives
    # elsewhere: no host-device copy, so no sync point per training step on CUDA
    u = torch.rand(len(images), 13, generator=generator,
                   device=images.device if generator is None else generator.device).to(images.device)

    def draw(key, col, default, log=False):
        lo, hi = p.get(key, (default, default))
        if log:
            return lo * torch.exp(math.log(hi / lo) * u[:, col])  # log-uniform: r as likely as 1/r
        return lo + (hi - lo) * u[:, col]
    x = images.float()
    if any(k in p for k in ("scale", "ratio", "degrees", "flip")):
        x = _affine(x, draw("scale", 0, 1.0), draw("ratio", 1, 1.0, log=True), draw("degrees", 2, 0.0) * (math.pi / 180),
                    u[:, 3:5], u[:, 5] < p.get("flip", 0.0))
    if "brightness" in p or "contrast" in p:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * draw("contrast", 7, 1.0).view(-1, 1, 1, 1) + mean) * draw("brightness", 6, 1.0).view(-1, 1, 1, 1)
    if p.get("erase", 0.0) > 0:
        x = _erase(x, u[:, 8] < p["erase"], draw("erase_scale", 9, 0.1), draw("erase_ratio", 10, 1.0, log=True), u[:, 11:13])
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _affine(x, scale, ratio, angle, shift, flip):
    """One grid_sample for crop + rotation + flip. x (B, 1, S, S) float; the rest (B,) per sample,
    shift (B, 2) in [0, 1). The output's normalized coordinates p (x right, y down, [-1, 1]) read
    the input at centre + R(angle) @ diag(+-w, h) @ p: w, h are the crop's side fractions, and
    the centre keeps the unrotated crop inside the image."""
    import torch
    import torch.nn.functional as F
    w = (scale * ratio).sqrt().clamp(max=1.0)
    h = (scale / ratio).sqrt().clamp(max=1.0)
    cx, cy = (2 * shift[:, 0] - 1) * (1 - w), (2 * shift[:, 1] - 1) * (1 - h)
    cos, sin = angle.cos(), angle.sin()
    sx = torch.where(flip, -w, w)
    # [[cos, -sin], [sin, cos]] turns the content counter-clockwise on screen (y points down)
    theta = torch.stack([torch.stack([cos * sx, -sin * h, cx], 1), torch.stack([sin * sx, cos * h, cy], 1)], 1)
    # align_corners=False: -1 and 1 are the outer edges of the image, so the identity map is exact
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _erase(x, on, area, ratio, pos):
    """Fill one rectangle per selected sample with the gray of IMAGE_MEAN. x (B, 1, S, S) float;
    on (B,) bool; area (fraction of the image), ratio (width / height) (B,); pos (B, 2) in [0, 1)."""
    import torch
    s = x.shape[-1]
    h = ((area / ratio).sqrt() * s).round().clamp(1, s)
    w = ((area * ratio).sqrt() * s).round().clamp(1, s)
    top, left = ((s - h) * pos[:, 0]).floor(), ((s - w) * pos[:, 1]).floor()
    idx = torch.arange(s, device=x.device, dtype=x.dtype)
    rows = (idx >= top[:, None]) & (idx < (top + h)[:, None])
    cols = (idx >= left[:, None]) & (idx < (left + w)[:, None])
    mask = rows[:, :, None] & cols[:, None, :] & on[:, None, None]
    return x.masked_fill(mask[:, None], round(IMAGE_MEAN * 255))


def attach_cache(df: pd.DataFrame, cache: ImageCache, on_bad: str = "drop", what: str = "image") -> pd.DataFrame:
    """Add the 'slot' column (row -> cache slot). Rows whose image was missing or unreadable are
    dropped with one warning (count and first paths), or, with on_bad='error', are an error."""
    slot_of = {p: i for i, p in enumerate(cache.paths)}
    df = df.copy()
    df["slot"] = df["path"].map(slot_of).astype(np.int64)
    ok, errors = cache.status()
    bad = ~ok[df["slot"].to_numpy()]
    if bad.any():
        first = [f"{p} ({errors[s]})" for p, s in zip(df["path"][bad][:N_NAMED], df["slot"][bad][:N_NAMED])]
        if on_bad == "error":
            raise UserError(f"{int(bad.sum())} {what}(s) missing or unreadable under {cache.meta['data_root']}: "
                            + "; ".join(first))
        warnings.warn(f"dropped {int(bad.sum())} rows whose image is missing or unreadable: "
                      + "; ".join(first) + (" ..." if bad.sum() > N_NAMED else ""), stacklevel=2)
    df = df[~bad].reset_index(drop=True)
    df.attrs["n_bad_images"] = int(bad.sum())
    return df


def cached_table(df: pd.DataFrame, data_root: Path, size: int, cache_dir: Path, name: str,
                 square: str = "resize", workers: int | None = None, on_bad: str = "drop",
                 progress: bool = True) -> tuple[pd.DataFrame, ImageCache]:
    """Cache the images of a table read by read_train_csv/read_test_csv; return (table with 'slot', cache)."""
    attrs = dict(df.attrs)
    paths = list(dict.fromkeys(df["path"]))
    cache = build_cache(paths, data_root, size, cache_dir, name, square, workers, progress)
    out = attach_cache(df, cache, on_bad)
    out.attrs = {**attrs, **out.attrs}
    return out, cache


class XrayDataset:
    """Serves batches from one or more caches (the base cache first, augmented copies after).

    ds[i] -> (uint8 (1, S, S), target float32 (K,), mask bool (K,)); ds[list] -> the same batched
    (B, 1, S, S), (B, K), (B, K). Index i reads source i // n at row i % n, so an augmented copy of
    row r is row r again with the copy's pixels: it inherits labels and patient. Targets are on
    [-1, 1] with NaN (blank) replaced by 0 and mask False there. Float conversion and normalisation
    happen on the training device, not here."""

    def __init__(self, sources: list[ImageCache], slots: np.ndarray, targets: np.ndarray):
        import torch
        self.sources = sources
        self.slots = np.asarray(slots, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.float32).reshape(len(self.slots), -1)
        self.mask = torch.from_numpy(~np.isnan(targets))
        self.targets = torch.from_numpy(np.nan_to_num(targets, nan=0.0))

    def __len__(self) -> int:
        return len(self.sources) * len(self.slots)

    def __getitem__(self, index):
        import torch
        single = np.ndim(index) == 0
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        src, row = idx // len(self.slots), idx % len(self.slots)
        images = torch.empty((len(idx), 1, self.sources[0].size, self.sources[0].size), dtype=torch.uint8)
        for s in np.unique(src):
            sel = np.nonzero(src == s)[0]
            images[torch.from_numpy(sel)] = self.sources[int(s)].get(self.slots[row[sel]])
        rows = torch.from_numpy(row)
        out = images, self.targets[rows], self.mask[rows]
        return tuple(t[0] for t in out) if single else out


# ---------------------------------------------------------------------------------------------
# The demo dataset

def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _line(img, yy, xx, y0, x0, y1, x1, width, value):
    """Add `value` along the segment (y0, x0)-(y1, x1), `width` pixels wide."""
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx), 0, 1)
    d = np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx))
    img += value * (d <= width / 2)


def _demo_image(rng, view: str, signal: dict, h: int = 384, w: int = 320) -> np.ndarray:
    """One synthetic radiograph, uint8 (h, w). signal[name] in [0, 1] is how strongly each finding
    is drawn (1 positive, 0.5 uncertain, 0 absent). Lateral views have their own anatomy and their
    own places for each finding."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w), 0.08, np.float32)
    jx, jy = rng.normal(0, 0.02 * w), rng.normal(0, 0.02 * h)
    s = lambda name: float(signal.get(name, 0.0))
    if view == "frontal":
        img += 0.30 * _ellipse(yy, xx, 0.55 * h + jy, 0.5 * w + jx, 0.45 * h, 0.46 * w)
        for side in (-1, 1):  # lungs
            img -= 0.18 * _ellipse(yy, xx, 0.48 * h + jy, (0.5 + side * 0.2) * w + jx, 0.30 * h, 0.15 * w)
        img += 0.20 * ((np.abs(xx - 0.5 * w - jx) < 0.035 * w) & (yy > 0.1 * h))  # spine
        med = 0.05 + 0.07 * s("Enlarged Cardiomediastinum")
        img += 0.28 * ((np.abs(xx - 0.5 * w - jx) < med * w) & (yy > 0.18 * h) & (yy < 0.5 * h))
        heart = 1.0 + 0.6 * s("Cardiomegaly")
        img += 0.30 * _ellipse(yy, xx, 0.64 * h + jy, 0.55 * w + jx, 0.10 * h * heart, 0.13 * w * heart)
        side = rng.choice([-1, 1])
        lung_x = (0.5 + side * 0.2) * w + jx
        if s("Lung Opacity"):
            cy, cx = rng.uniform(0.35, 0.6) * h, lung_x + rng.normal(0, 0.03 * w)
            img += 0.5 * s("Lung Opacity") * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.09 * w) ** 2)))
        if s("Pneumonia"):
            patch = _ellipse(yy, xx, 0.62 * h + jy, (0.5 - side * 0.2) * w + jx, 0.12 * h, 0.13 * w)
            img += 0.5 * s("Pneumonia") * patch * (rng.random((h, w)) > 0.4)
        if s("Pleural Effusion"):  # bright lung bases with a meniscus
            for sd in (-1, 1):
                cx = (0.5 + sd * 0.2) * w + jx
                base = _ellipse(yy, xx, 0.48 * h + jy, cx, 0.30 * h, 0.15 * w) & (yy > 0.62 * h + 0.05 * h * np.cos((xx - cx) / (0.15 * w) * np.pi / 2))
                img += 0.40 * s("Pleural Effusion") * base
        if s("Pleural Other"):
            img += 0.40 * s("Pleural Other") * ((np.abs(xx - (0.5 + side * 0.345) * w - jx) < 4) & (yy > 0.25 * h) & (yy < 0.65 * h))
        if s("Fracture"):
            cy = rng.uniform(0.3, 0.6) * h
            for k in range(3):
                _line(img, yy, xx, cy + 10 * k, (0.5 + side * 0.38) * w, cy + 10 * k + 12, (0.5 + side * 0.30) * w, 3, 0.5 * s("Fracture"))
        if s("Support Devices"):
            _line(img, yy, xx, 0.0, 0.47 * w + jx, 0.55 * h, 0.52 * w + jx, 4, 0.6 * s("Support Devices"))
            img += 0.5 * s("Support Devices") * _ellipse(yy, xx, 0.22 * h, (0.5 - side * 0.28) * w, 10, 10)
    else:  # lateral: one lung field, spine on the right (posterior), heart anterior (left)
        img += 0.30 * _ellipse(yy, xx, 0.55 * h + jy, 0.5 * w + jx, 0.44 * h, 0.42 * w)
        img -= 0.18 * _ellipse(yy, xx, 0.48 * h + jy, 0.52 * w + jx, 0.32 * h, 0.28 * w)
        img += 0.25 * ((np.abs(xx - 0.80 * w - jx) < 0.05 * w) & (yy > 0.1 * h))
        heart = 1.0 + 0.6 * s("Cardiomegaly")
        img += 0.30 * _ellipse(yy, xx, 0.65 * h + jy, 0.32 * w + jx, 0.11 * h * heart, 0.11 * w * heart)
        med = 0.06 + 0.07 * s("Enlarged Cardiomediastinum")
        img += 0.25 * ((np.abs(xx - 0.45 * w - jx) < med * w) & (yy > 0.15 * h) & (yy < 0.45 * h))
        if s("Lung Opacity"):
            cy, cx = rng.uniform(0.35, 0.6) * h, rng.uniform(0.4, 0.65) * w
            img += 0.5 * s("Lung Opacity") * np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.09 * w) ** 2)))
        if s("Pneumonia"):
            patch = _ellipse(yy, xx, 0.60 * h + jy, 0.62 * w + jx, 0.13 * h, 0.13 * w)
            img += 0.5 * s("Pneumonia") * patch * (rng.random((h, w)) > 0.4)
        if s("Pleural Effusion"):  # posterior costophrenic angle
            img += 0.40 * s("Pleural Effusion") * (_ellipse(yy, xx, 0.48 * h + jy, 0.52 * w + jx, 0.32 * h, 0.28 * w) & (yy > 0.68 * h) & (xx > 0.5 * w))
        if s("Pleural Other"):
            img += 0.40 * s("Pleural Other") * ((np.abs(yy - 0.2 * h - jy) < 4) & (xx > 0.3 * w) & (xx < 0.7 * w))
        if s("Fracture"):
            cy = rng.uniform(0.3, 0.6) * h
            for k in range(3):
                _line(img, yy, xx, cy + 10 * k, 0.70 * w, cy + 10 * k + 12, 0.76 * w, 3, 0.5 * s("Fracture"))
        if s("Support Devices"):
            _line(img, yy, xx, 0.0, 0.40 * w + jx, 0.55 * h, 0.45 * w + jx, 4, 0.6 * s("Support Devices"))
    img += rng.normal(0, 0.035, (h, w)).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


# (prevalence of positive, uncertain, negative; the rest is blank) per finding in the demo
_DEMO_RATES = {
    "Enlarged Cardiomediastinum": (0.25, 0.10, 0.45), "Cardiomegaly": (0.35, 0.08, 0.45),
    "Lung Opacity": (0.35, 0.08, 0.40), "Pneumonia": (0.20, 0.10, 0.45),
    "Pleural Effusion": (0.35, 0.10, 0.45), "Pleural Other": (0.10, 0.05, 0.60),
    "Fracture": (0.08, 0.03, 0.60), "Support Devices": (0.40, 0.03, 0.45),
}


def _demo_study_labels(rng) -> dict:
    labels = {}
    for name, (p, u, n) in _DEMO_RATES.items():
        r = rng.random()
        labels[name] = 1.0 if r < p else 0.0 if r < p + u else -1.0 if r < p + u + n else np.nan
    positive = any(v == 1.0 for v in labels.values())
    labels["No Finding"] = -1.0 if positive else (1.0 if rng.random() < 0.85 else np.nan)
    return labels


def _demo_signal(rng, labels: dict) -> dict:
    """How strongly each finding is drawn: positive 1, uncertain 0.5, blank (unmentioned) by chance."""
    return {k: 1.0 if v == 1.0 else 0.5 if v == 0.0 else float(rng.random() < 0.15) if np.isnan(v) else 0.0
            for k, v in labels.items() if k != "No Finding"}


def make_demo(root: Path, n_train_patients: int = 250, n_test_patients: int = 40, seed: int = 0,
              progress: bool = True) -> Path:
    """Write a small CS 156b-layout dataset under root and return root.

    root/train/pidN/studyM/viewK_{frontal,lateral}.jpg (320 x 384 JPEGs), root/test/…,
    root/student_labels/train2023.csv, test_ids.csv, solution_ids.csv, and test_labels.csv (the
    test images' true labels, which the real course data does not give, for measuring on unseen
    data). Every finding has a planted, learnable signal; the CSV has blanks, uncertain labels,
    lateral views, 4 stray 'CheXpert-v1.0/' rows, 3 rows whose file is missing and 1 unreadable file."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows, test_rows = [], []
    n_total = n_train_patients + n_test_patients
    with tqdm(total=n_total, desc="making demo dataset", unit="patient", disable=not progress) as bar:
        for p in range(n_total):
            is_test = p >= n_train_patients
            pid = f"pid{(90000 if is_test else 10000) + p * 7}"
            for st in range(1 + int(rng.random() < 0.4)):
                labels = _demo_study_labels(rng)
                views = ["frontal"] + (["lateral"] if rng.random() < 0.35 else [])
                for v_i, view in enumerate(views):
                    rel = f"{'test' if is_test else 'train'}/{pid}/study{st + 1}/view{v_i + 1}_{view}.jpg"
                    img = _demo_image(rng, view, _demo_signal(rng, labels))
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img).save(root / rel, quality=90)
                    (test_rows if is_test else rows).append(
                        {"Path": rel, "Sex": rng.choice(["Male", "Female"]), "Age": int(rng.integers(20, 90)),
                         "Frontal/Lateral": view.capitalize(), "AP/PA": "AP" if view == "frontal" else "",
                         **labels})
            bar.update()
    # the faults the real data has, so every code path runs on the demo
    for k in range(4):
        rows.append({**rows[k], "Path": f"CheXpert-v1.0/train/patient{k:05d}/study1/view1_frontal.jpg"})
    for k in range(3):
        rows.append({**rows[5 + k], "Path": f"train/pid{80000 + k}/study1/view1_frontal.jpg"})
    bad = "train/pid85000/study1/view1_frontal.jpg"
    (root / bad).parent.mkdir(parents=True, exist_ok=True)
    (root / bad).write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    rows.append({**rows[9], "Path": bad})

    labels_dir = root / "student_labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    train = pd.DataFrame(rows)[["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + PATHOLOGIES]
    train.insert(0, "Unnamed: 0", np.arange(len(train)))
    train.insert(0, "Unnamed: 0.1", np.arange(len(train)))
    train.to_csv(labels_dir / "train2023.csv", index=False)
    test = pd.DataFrame(test_rows)
    test.insert(0, "Id", 3 * np.arange(len(test)) + 1001)  # integers, not contiguous
    half = len(test) // 2
    test[["Id", "Path"]][:half].to_csv(labels_dir / "test_ids.csv", index=False)
    test[["Id", "Path"]][half:].to_csv(labels_dir / "solution_ids.csv", index=False)
    test[["Id", "Path"] + PATHOLOGIES].to_csv(labels_dir / "test_labels.csv", index=False)
    (root / "README.txt").write_text("Synthetic demo data made by dataset.py (make_demo). Not real X-rays.\n")
    return root


def ensure_demo(root: Path = DEMO_ROOT, progress: bool = True) -> Path:
    """The demo dataset's root, made on first use (atomically: built beside it, then renamed) by one
    process; others that want it at the same time (torchrun's ranks) wait for it (claim_build)."""
    root = Path(root)
    claim = claim_build(root.with_name(f".{root.name}.lock"), (root / "student_labels" / "train2023.csv").is_file,
                        f"the demo dataset {root}")
    if claim is None:
        return root
    with claim:
        tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
        make_demo(tmp, progress=progress)
        try:
            os.replace(tmp, root)
        except OSError:  # made meanwhile by a process that took over the lock of one that seemed gone
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Build (or finish) the grayscale uint8 image cache for one CSV.")
    p.add_argument("--data-root", type=Path, help="dataset root (default: the demo dataset in ./demo_data)")
    p.add_argument("--csv", type=Path, help="CSV to cache (default: DATA_ROOT/student_labels/train2023.csv); "
                   "a train CSV or an 'Id, Path' test CSV")
    p.add_argument("--image-size", type=int, help="side of the square cached images, px (default 224; 64 on the "
                   "demo data, as train.py)")
    p.add_argument("--square", choices=SQUARE_MODES, default="resize",
                   help="how non-square images become square: resize (squash) or crop (central square)")
    p.add_argument("--cache-dir", type=Path, default=Path("cache"), help="where caches live (never under the data root)")
    p.add_argument("--workers", type=int, default=default_workers(), help="decoding processes")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE,
                   help="images per shard file of a new cache (only the layout: any size is found by every script)")
    p.add_argument("--label-convention", choices=LABEL_CONVENTIONS, default="auto",
                   help="how the train CSV writes labels: cs156b (1 positive, 0 uncertain, -1 negative), chexpert "
                   "(Stanford's: 1 positive, 0 negative, -1 uncertain), or auto: detected from the layout")
    p.add_argument("--labels-only", action=argparse.BooleanOptionalAction, default=False,
                   help="only read the train CSV and print its per-label counts (no images read, no cache): "
                   "inspect a CSV whose images are elsewhere")
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = 64 if args.data_root is None else 224
    if args.image_size < 8:
        p.error(f"--image-size must be at least 8, got {args.image_size}")
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    if args.shard_size < 1:
        p.error(f"--shard-size must be at least 1, got {args.shard_size}")
    return args


def resolve_data(data_root: Path | None, csv: Path | None, default_csv: str) -> tuple[Path, Path]:
    """(data root, CSV): the demo dataset when data_root is None; errors name a missing path."""
    root = ensure_demo() if data_root is None else Path(data_root)
    if not root.is_dir():
        raise UserError(f"--data-root {root}: no such directory")
    csv = Path(csv) if csv is not None else root / "student_labels" / default_csv
    if not csv.is_file():
        raise UserError(f"{csv}: no such CSV file")
    return root, csv


def print_label_summary(df: pd.DataFrame) -> None:
    """The per-label table (counts on the project's scale) and the line saying which convention was read."""
    print(format_table(label_counts(df), LABEL_COUNT_COLUMNS))
    print(describe_convention(df.attrs["label_convention"], df.attrs["label_convention_how"]))


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if args.labels_only and args.csv is not None:  # reads no images: needs no data root
        root, csv = args.data_root, args.csv
    else:
        root, csv = resolve_data(args.data_root, args.csv, "train2023.csv")
    header = read_header(csv)
    is_test = "Id" in header and "AP/PA" not in header
    if is_test and args.labels_only:
        raise UserError(f"{csv}: --labels-only needs a train CSV (labels after 'AP/PA'); this is an 'Id, Path' test CSV")
    df = read_test_csv(csv) if is_test else read_train_csv(csv, convention=args.label_convention)
    if args.labels_only:
        print(f"{'csv':<10} {csv}\n{'rows':<10} {len(df)} ({df.attrs['n_stray']} stray rows dropped)\n")
        print_label_summary(df)
        return None
    paths = list(dict.fromkeys(df["path"]))
    cache = build_cache(paths, root, args.image_size, args.cache_dir, csv.stem, args.square, args.workers,
                        shard_size=args.shard_size)
    ok, errors = cache.status()
    bad = [f"{p} ({e})" for p, e, o in zip(cache.paths, errors, ok) if not o]
    if bad:
        warnings.warn(f"{len(bad)} images missing or unreadable (rows using them are dropped when training): "
                      + "; ".join(bad[:N_NAMED]) + (" ..." if len(bad) > N_NAMED else ""))
    nbytes = sum(cache.shard_path(k).stat().st_size for k in range(cache.n_shards))
    print(f"{'cache':<10} {cache.folder}\n{'csv':<10} {csv}\n{'images':<10} {len(cache)} ({int(ok.sum())} ok, "
          f"{len(bad)} missing or unreadable)\n{'size':<10} {cache.size} x {cache.size} px, uint8, {cache.square}\n"
          f"{'bytes':<10} {nbytes / 1e6:.1f} MB in {cache.n_shards} shards\n{'seconds':<10} {time.time() - t0:.2f}")
    if not is_test:
        print(f"\nlabels of all {len(df)} rows, before rows with a missing or unreadable image are dropped:")
        print_label_summary(df)
    return cache


if __name__ == "__main__":
    sys.exit(run_cli(main))
