"""Data: the pathology names, the CSV reader (lines as an editor counts them; a row cut short, a
column twice or an image with two sets of labels stops in one line), both CSV layouts and their
label conventions (detected from the paths first), Ids (parse_ids), patient splits and folds (who
is a patient: patients.py), and the Dataset that serves training batches from the image cache
(cache.py). read_train_csv returns the source labels; the label policies that make training
targets of them (--uncertain, --blank) are policies.py's.

    python dataset.py --data-root DIR [--csv FILE] [--image-size N] [--cache-dir DIR] [--workers N]
    python dataset.py --csv FILE --labels-only [--label-convention auto|cs156b|chexpert] [--patient-col NAME]

builds (or finishes) the image cache for one CSV and prints a summary, ending, for a train CSV, with
the patients (how many, and how they were told apart), the per-label counts (positive, uncertain,
negative, blank on the project's scale: the source labels) and the label convention it was read
with. --labels-only prints just those counts and reads
no image. Without --csv it reads the first of TRAIN_CSVS under DATA_ROOT (the course's
train2023.csv, else Stanford's train.csv) and says which. With no --data-root it uses the demo
dataset, made on first use under ./demo_data (demo.py).

torch is imported inside the functions that need it: `python dataset.py` on a complete cache then
returns in well under a second, which matters when a SLURM array starts hundreds of jobs.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cache import N_NAMED, SHARD_SIZE, ImageCache, build_cache
from common import Parser, UserError, add_data_flags, check_common_flags, format_table, run_cli
import config
from patients import PATIENT_COLUMNS, add_patient_col_flag, describe_patients, identify_patients, ids_from_paths

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
# the fixed-target uncertain policies (uncertain_targets); policies.UNCERTAIN adds soft and three-class ones
UNCERTAIN_POLICIES = ("keep", "ignore", "ones", "zeros")  # zeros = U-Zeros: uncertain -> -1
LABEL_CONVENTIONS = ("auto", "cs156b", "chexpert")  # how a source CSV writes its labels (see detect_convention)
LABEL_COUNT_COLUMNS = ["label", "positive", "uncertain", "negative", "blank"]
STRAY_PREFIX = "CheXpert-v1.0/"  # rows in train2023.csv whose files do not exist
# The default train CSV under a data root, in order of preference: the course's, then Stanford's
# downsampled set, then its full-size one (their paths are relative to the folder holding them).
TRAIN_CSVS = ("student_labels/train2023.csv", "CheXpert-v1.0-small/train.csv", "CheXpert-v1.0/train.csv")


def slug(name: str, view: str = "all") -> str:
    """'Pleural Effusion' -> 'pleural_effusion'; a one-view model adds it: 'pleural_effusion_lateral'."""
    s = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return s if view == "all" else f"{s}_{view}"


# ---------------------------------------------------------------------------------------------
# CSVs and labels

def _walk(reader, n: int | None = None) -> tuple[list[list[str]], list[int]]:
    """The first n records of a csv.reader (all: None) and the line each starts on."""
    records, starts, start = [], [], reader.line_num + 1
    for record in reader:
        records.append(record)
        starts.append(start)
        start = reader.line_num + 1
        if n is not None and len(records) >= n:
            break
    return records, starts


def read_csv_lines(csv_path: Path, what: str = "", nrows: int | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """A CSV with every cell as text ('' for empty), nrows rows (all by default), and the file line
    each row starts on, (N,) int64, 1-based as an editor shows it (the header is line 1; blank lines
    are skipped, a quoted cell may span lines). Python's csv module parses it rather than pandas,
    which pads a row cut short with blanks and renames a repeated column 'X.1' without a word.

    Each of these is a UserError naming the file (after `what`, e.g. '--labels ') and the line: a
    missing or unreadable file, a row with fewer or more fields than the header (a file cut short
    mid-row), a column named twice. An empty header cell is named 'Unnamed: I', as pandas names it."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"{what}{csv_path}: no such CSV file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            if nrows is not None:
                records, starts = _walk(reader := csv.reader(f, strict=True), nrows + 1)
            else:
                text = f.read()
                records = list(reader := csv.reader(io.StringIO(text, newline=""), strict=True))
                starts = range(1, len(records) + 1)
                if text.count("\n") + (not text.endswith("\n") and bool(text)) != len(records):  # a cell spans
                    records, starts = _walk(reader := csv.reader(io.StringIO(text, newline=""), strict=True))  # lines
    except OSError as e:
        raise UserError(f"{what}{csv_path}: cannot be read ({e.strerror or e})") from e
    except (csv.Error, UnicodeDecodeError) as e:
        line = f"line {reader.line_num}: " if isinstance(e, csv.Error) else ""
        raise UserError(f"{what}{csv_path}: {line}not a readable CSV ({str(e).splitlines()[0]})") from e
    lengths = np.fromiter(map(len, records), np.int64, len(records))
    kept = lengths > 1
    kept[lengths == 1] = [bool(records[i][0].strip()) for i in np.flatnonzero(lengths == 1)]  # a blank line is no row
    if not kept.any():
        raise UserError(f"{what}{csv_path}: not a readable CSV (no header line)")
    records = records if kept.all() else [r for r, k in zip(records, kept) if k]
    starts, lengths = np.asarray(starts, dtype=np.int64)[kept], lengths[kept]
    header = [h if h else f"Unnamed: {i}" for i, h in enumerate(records[0])]
    for i, name in enumerate(header):
        if name in header[:i]:
            raise UserError(f"{what}{csv_path}: line {starts[0]}: column '{name}' appears twice (columns "
                            f"{header.index(name) + 1} and {i + 1}); rename or remove one")
    bad = np.flatnonzero(lengths[1:] != len(header))
    if len(bad):
        n, cut = lengths[bad[0] + 1], "cut short" if lengths[bad[0] + 1] < len(header) else "with a stray separator"
        raise UserError(f"{what}{csv_path}: line {starts[bad[0] + 1]}: {n} fields where the header has "
                        f"{len(header)} (a row {cut}?); fix or remove that line")
    rows = records[1:]
    table = pd.DataFrame(rows, columns=header, dtype=str) if rows else pd.DataFrame(columns=header, dtype=str)
    return table, starts[1:]


def read_csv_text(csv_path: Path, what: str = "", nrows: int | None = None) -> pd.DataFrame:
    """read_csv_lines without the line numbers."""
    return read_csv_lines(csv_path, what, nrows)[0]


def read_header(csv_path: Path, what: str = "") -> list[str]:
    """A CSV's column names, without reading its rows; errors as read_csv_text's."""
    return list(read_csv_text(csv_path, what, nrows=0).columns)


def _require(df: pd.DataFrame, columns, csv_path) -> None:
    for c in columns:
        if c not in df.columns:
            raise UserError(f"{csv_path}: missing required column '{c}' (has: {', '.join(df.columns)})")


def view_from_filename(paths: pd.Series, default: str | None = "frontal") -> pd.Series:
    """'…/view1_frontal.jpg' -> 'frontal', '…/view2_Lateral.jpg' -> 'lateral' (test CSVs have no
    view column); a name with neither gets `default` (None: NaN)."""
    v = paths.str.extract(r"_(frontal|lateral)\.\w+$", flags=re.IGNORECASE)[0].str.lower()
    return v if default is None else v.fillna(default)


_NO_VIEW = {"test": "no _frontal/_lateral in the file name",
            "train": "no 'Frontal/Lateral' value and no _frontal/_lateral in the file name"}


def views_from_filenames(paths: pd.Series, csv_path: Path, kind: str) -> pd.Series:
    """view_from_filename, where a path that names no view is read as frontal and counted in one
    warning naming a few (kind 'test' or 'train' words it): never routed as frontal without a word."""
    views = view_from_filename(paths, default=None)
    unnamed = paths[views.isna()]
    if len(unnamed):
        warnings.warn(f"{csv_path}: {len(unnamed)} {kind} images name no view ({_NO_VIEW[kind]}): treated as "
                      f"frontal, e.g. {', '.join(unnamed[:3])}", stacklevel=3)
    return views.fillna("frontal")


_CONVENTION_TEXT = {"cs156b": "CS 156b (1 positive, 0 uncertain, -1 negative",
                    "chexpert": "Stanford CheXpert (1 positive, 0 negative, -1 uncertain"}


_CONVENTION_HOW = {"given": "set by --label-convention", "detected": "detected from the layout",
                   "default": "the layout does not tell, so assumed: "
                              "pass --label-convention chexpert if this is a Stanford CSV"}
_PATH_EVIDENCE = {"cs156b": "pid… folders", "chexpert": "patient… folders"}


def convention_from_paths(paths) -> str | None:
    """The convention the majority of paths implies: 'train/pid50512/…' is CS 156b ('cs156b'),
    'CheXpert-v1.0…/' or 'patient00001/…' Stanford ('chexpert'); None when no path is of either
    kind or as many are of each. A few stray 'CheXpert-v1.0/' rows of train2023.csv do not outvote
    its own paths."""
    paths = pd.Series(list(paths), dtype=object).astype(str).str.strip()
    n_cs156b = int(paths.str.contains(r"(?:^|/)pid\d+/").sum())
    n_chexpert = int(paths.str.contains(r"^CheXpert-v1\.0|(?:^|/)patient\d+/").sum())
    if n_cs156b == n_chexpert:
        return None
    return "cs156b" if n_cs156b > n_chexpert else "chexpert"


def index_column(columns) -> str | None:
    """The first 'Unnamed: …' column (an index pandas wrote, as in train2023.csv), or None."""
    return next((str(c) for c in columns if str(c).startswith("Unnamed")), None)


def detect_convention(columns, paths) -> str | None:
    """The label convention a CSV's layout implies, or None when it cannot tell.

    The paths decide when they tell (convention_from_paths). Only when they do not do the columns:
    an 'Unnamed: …' index column means CS 156b. It is weak evidence, since any CSV that pandas
    saved with its default to_csv(index=True) has one, Stanford's too."""
    return convention_from_paths(paths) or ("cs156b" if index_column(columns) else None)


def choose_convention(convention: str, columns, paths) -> tuple[str, str]:
    """(name, how) for a CSV: an explicit 'cs156b' / 'chexpert' wins (how 'given'); 'auto' detects
    it from the layout ('detected'), falling back to 'cs156b' when the layout cannot tell ('default').
    When the paths overrule an index column, how is instead the phrase saying so (for
    describe_convention): "detected from the paths (patient… folders), although the CSV has an
    'Unnamed: 0' index column"."""
    if convention not in LABEL_CONVENTIONS:
        raise UserError(f"unknown label convention {convention!r} (choose from {', '.join(LABEL_CONVENTIONS)})")
    if convention != "auto":
        return convention, "given"
    found = detect_convention(columns, paths)
    if found is None:
        return "cs156b", "default"
    index = index_column(columns)
    if found == "chexpert" and index:
        return found, (f"detected from the paths ({_PATH_EVIDENCE[found]}), "
                       f"although the CSV has an '{index}' index column")
    return found, "detected"


def describe_convention(name: str, how: str = "detected") -> str:
    """One line for people, e.g. 'labels read as Stanford CheXpert (1 positive, 0 negative,
    -1 uncertain; detected from the layout)'. how: 'given', 'detected', 'default', or a phrase of
    choose_convention's, written as it is."""
    return f"labels read as {_CONVENTION_TEXT[name]}; {_CONVENTION_HOW.get(how, how)})"


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
    positive (1), uncertain (0), negative (-1) and blank (NaN), on the project's scale (the source
    labels after the convention mapping; no uncertain policy). Rows have LABEL_COUNT_COLUMNS."""
    rows = []
    for name in df.attrs["labels"]:
        v = df[name].to_numpy(np.float64)
        rows.append({"label": name, "positive": int((v == 1).sum()), "uncertain": int((v == 0).sum()),
                     "negative": int((v == -1).sum()), "blank": int(np.isnan(v).sum())})
    return rows


def uncertain_targets(values: np.ndarray, policy: str) -> np.ndarray:
    """Training targets from source labels on the project's scale (1, 0 uncertain, -1, NaN blank):
    the uncertain 0 becomes 0 (keep), NaN (ignore: masked like a blank), 1 (ones) or -1 (zeros).
    values: any shape, float; returns a new float array of that shape (float64 unless values is
    floating already). Only training targets: validation and scoring keep the source labels.
    The fixed policies only (UNCERTAIN_POLICIES); policies.training_targets gives every policy, per
    pathology, with --blank, and builds on this."""
    if policy not in UNCERTAIN_POLICIES:
        raise UserError(f"unknown uncertain policy {policy!r} (choose from {', '.join(UNCERTAIN_POLICIES)})")
    values = np.asarray(values)
    out = values.astype(values.dtype if np.issubdtype(values.dtype, np.floating) else np.float64, copy=True)
    out[out == 0.0] = {"keep": 0.0, "ignore": np.nan, "ones": 1.0, "zeros": -1.0}[policy]
    return out


def drop_duplicate_rows(out: pd.DataFrame, raw: pd.DataFrame, line: pd.Series, labels: list[str],
                        where: str) -> pd.DataFrame:
    """out without the rows that repeat an earlier row's path and labels (label values compared
    on the project's scale, so '1' and '1.0' agree), dropped with one warning naming their lines
    (line: the file line of each row, indexed as out). A path given twice with other labels is a
    UserError naming both lines and the first label that differs (raw: the CSV's text, for it)."""
    exact = out.duplicated(["path", *labels], keep="first")
    first = pd.Series(out.index, index=out["path"])
    first = first[~first.index.duplicated()]  # path -> its first row
    if exact.any():
        named = [f"line {line[i]} (as line {line[first[out.at[i, 'path']]]})" for i in out.index[exact][:N_NAMED]]
        warnings.warn(f"{where}: dropped {int(exact.sum())} duplicate rows (the path and labels of an earlier line): "
                      + ", ".join(named) + (" ..." if exact.sum() > N_NAMED else ""), stacklevel=3)
        out = out[~exact]
    again = out["path"].duplicated(keep="first")
    if again.any():
        i = again.idxmax()
        j = first[out.at[i, "path"]]
        col = next(c for c in labels if not np.array_equal(out.at[i, c], out.at[j, c], equal_nan=True))
        raise UserError(f"{where}: lines {line[j]} and {line[i]} give the image {out.at[i, 'path']!r} different labels "
                        f"({col}: {raw.at[j, col]!r} vs {raw.at[i, col]!r}); keep the right one and remove the other")
    return out


def read_train_csv(csv_path: Path, convention: str = "auto", patient_col: str | None = None) -> pd.DataFrame:
    """Read a CS 156b train2023.csv, a Stanford CheXpert train.csv/valid.csv, or any CSV with
    'Path' and 'AP/PA' columns and labels after them.

    Returns one row per image with columns path, patient, study, view and one float32 column per
    label (those after 'AP/PA' in the header, but a patient column): the SOURCE labels on the
    project's scale, 1 positive, 0 uncertain, -1 negative, NaN blank (never filled), mapped from
    the source's convention: `convention` 'cs156b' or 'chexpert', or 'auto' to detect it
    (choose_convention). No uncertain policy is applied: policies.training_targets makes training
    targets from these. Patients and studies: identify_patients (a patient column, `patient_col`
    or one of PATIENT_COLUMNS, wins over the path layout). Rows that repeat an earlier path and its
    labels are dropped with one warning; one path with two sets of labels is an error
    (drop_duplicate_rows).
    df.attrs: 'labels' lists the label columns; 'label_convention' the convention used and
    'label_convention_how' how it was chosen (describe_convention makes a line of the two);
    'n_stray' counts the stray 'CheXpert-v1.0/…' rows of train2023.csv, dropped with one warning
    (a CSV whose every path starts so, Stanford's full-size set, has none); 'n_duplicates' the
    rows dropped as duplicates; 'patient_rule' how patients were told apart and 'n_patients' how
    many there are (describe_patients makes a line of the two)."""
    raw, lines = read_csv_lines(csv_path)
    name, how = choose_convention(convention, raw.columns, raw["Path"] if "Path" in raw.columns else [])
    _require(raw, ["Path", "AP/PA"], csv_path)
    not_labels = {patient_col, *PATIENT_COLUMNS}
    labels = [c for c in raw.columns[raw.columns.get_loc("AP/PA") + 1:] if c not in not_labels]
    if not labels:
        raise UserError(f"{csv_path}: no label columns after 'AP/PA'")
    line = pd.Series(lines, index=raw.index)

    stray = raw["Path"].str.strip().str.startswith(STRAY_PREFIX)
    if stray.all():  # Stanford's full-size CheXpert: every path is under CheXpert-v1.0/, none stray
        stray[:] = False
    if stray.any():
        warnings.warn(f"{csv_path}: dropped {int(stray.sum())} stray rows whose path starts "
                      f"'{STRAY_PREFIX}' (no such files)", stacklevel=2)
    raw, line = raw[~stray], line[~stray]
    n_stray = int(stray.sum())

    out = pd.DataFrame({"path": raw["Path"].str.strip()})
    for col in labels:
        out[col] = parse_label_column(raw, col, name, str(csv_path), line).astype(np.float32)
    n_rows = len(out)
    out = drop_duplicate_rows(out, raw, line, labels, str(csv_path))
    raw, line = raw.loc[out.index], line[out.index]
    patient, study, rule = identify_patients(raw, out["path"], line, str(csv_path), patient_col)
    out.insert(1, "patient", patient)
    out.insert(2, "study", study)
    # the view column decides; the file name only where it is missing, blank or odd
    out.insert(3, "view", raw.get("Frontal/Lateral", pd.Series("", index=raw.index)).str.strip().str.lower())
    bad = ~out["view"].isin(VIEWS)
    out.loc[bad, "view"] = views_from_filenames(out.loc[bad, "path"], csv_path, "train")
    out = out.reset_index(drop=True)
    out.attrs.update(labels=labels, n_stray=n_stray, label_convention=name, label_convention_how=how,
                     n_duplicates=n_rows - len(out),
                     patient_rule=rule, n_patients=int(out["patient"].nunique()))
    return out


# An Id as written: an integer, optionally with a zero fraction ('7.0': a column that went through a
# float in a spreadsheet, still exact). Read from the text, never through float64, which changes
# every integer above 2**53 (9007199254740993 -> ...992) and turns 20 digits into garbage.
_ID_TEXT = re.compile(r"\s*([+-]?[0-9]+)(?:\.0*)?\s*")  # [0-9]: int() would also take other scripts' digits


def _exact_id(cell: str) -> int | None:
    """The integer an Id cell holds exactly, or None (not an integer, or more digits than Python
    converts: sys.get_int_max_str_digits)."""
    m = _ID_TEXT.fullmatch(cell)
    try:
        return int(m.group(1)) if m else None
    except ValueError:
        return None


def parse_ids(text: pd.Series, where: str) -> np.ndarray:
    """A CSV's 'Id' column, read as text, -> (N,) exact integers: int64 when every Id fits in it,
    else an object array of Python ints (any size, unchanged): the one rule for Ids (test CSVs,
    --labels, the written submission). Each must be an integer ('7', ' 7 ', '-7', or '7.0' with a
    zero fraction; not '1e3', '7.5' or blank) and appear once; otherwise a UserError naming `where`
    (the file) and the line, row i being line i + 2 (the header is line 1)."""
    text = pd.Series(text, dtype=object).reset_index(drop=True).astype(str)
    values = [_exact_id(cell) for cell in text]
    if None in values:
        i = values.index(None)
        hint = " (a float's exponent form: digits may be lost; write the Ids as integers)" \
            if re.fullmatch(r"\s*[+-]?[\d.]+[eE][+-]?\d+\s*", text[i]) else ""
        raise UserError(f"{where}: line {i + 2}, column 'Id': {text[i]!r} is not an integer{hint}")
    int64 = np.iinfo(np.int64)
    fits = all(int64.min <= v <= int64.max for v in values)
    ids = np.array(values, dtype=np.int64 if fits else object)
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        i = int(np.argmax(dup))
        first = int(np.argmax(ids == ids[i]))
        raise UserError(f"{where}: line {i + 2}: Id {ids[i]} appears more than once (first on line {first + 2})")
    return ids


def read_test_csv(csv_path: Path) -> pd.DataFrame:
    """Read an 'Id, Path' test CSV (test_ids.csv, solution_ids.csv). Returns columns Id (parse_ids:
    int64, or Python ints where one does not fit int64, exactly as written), path, patient, study,
    view; the view comes from the file name (viewN_frontal.jpg / viewN_lateral.jpg), frontal with one
    warning where it names none."""
    raw = read_csv_text(csv_path)
    _require(raw, ["Id", "Path"], csv_path)
    out = pd.DataFrame({"Id": parse_ids(raw["Id"], str(csv_path)), "path": raw["Path"].str.strip()})
    out["patient"], out["study"] = ids_from_paths(out["path"])
    out["view"] = views_from_filenames(out["path"], csv_path, "test")
    return out


def canonical_pathology(name: str) -> str | None:
    """The name in ALL_LABELS that `name` means, case-insensitive, '_' for a space; None if none."""
    by_lower = {n.lower(): n for n in ALL_LABELS}
    key = name.strip().lower()
    return by_lower.get(key) or by_lower.get(key.replace("_", " "))


def check_pathologies(names: list[str], available: list[str] | None = None) -> list[str]:
    """Expand 'all' and check each name; 'all' means the CSV's labels that are known pathologies."""
    available = list(available) if available is not None else PATHOLOGIES
    if [n.lower() for n in names] == ["all"]:
        return [n for n in ALL_LABELS if n in available]
    out = []
    for n in names:
        canon = canonical_pathology(n)
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


def patient_folds(groups, k: int, seed: int, labelled=None) -> np.ndarray:
    """Fold of each row, (N,) int64 in 0..k-1, whole patients per fold: no patient has rows in two
    folds. groups (N,) patient ids (any sortable values); labelled (N,) bool, None = every row.
    Patients with a labelled row are dealt out first, round robin in a seeded random order, then the
    rest, so each fold gets its share of labelled patients. The same seed and groups give the same
    folds whatever the row order (patients are sorted before the shuffle)."""
    patients, inv = np.unique(np.asarray(groups), return_inverse=True)
    inv = inv.reshape(-1)
    labelled = np.ones(len(inv), dtype=bool) if labelled is None else np.asarray(labelled, dtype=bool)
    has = np.bincount(inv, labelled, minlength=len(patients)) > 0
    order = np.random.default_rng(seed).permutation(len(patients))
    order = order[np.argsort(~has[order], kind="stable")]
    fold = np.empty(len(patients), dtype=np.int64)
    fold[order] = np.arange(len(patients)) % k
    return fold[inv]


def sha1(lines) -> str:
    """A short fingerprint of some lines of text (patient ids, paths): sha1 of them joined by newlines."""
    return hashlib.sha1("\n".join(str(x) for x in lines).encode()).hexdigest()


def patient_splits(patients: pd.Series, seed: int, val_frac: float = 0.2, folds: int | None = None,
                   fold: str | int = "all") -> list[tuple[int | None, np.ndarray, dict]]:
    """(fold, is_val (N,) bool, split record) for each model train.py trains per pathology: one
    patient split (fold None), or with `folds` K the folds asked for (0..K-1, or "all"): patient
    groups from patient_folds, the same for every pathology and every run with the same seed, K
    and rows. The record goes into checkpoints and summary.json: seed, val_frac or folds and fold,
    val_patients_sha1 (the validation patients of the whole table: models of one split share it),
    folds_sha1 (the whole assignment: the folds of one K-fold run share it)."""
    def val_hash(is_val):
        return sha1(sorted(map(str, pd.unique(patients[is_val]))))
    if folds is None:
        is_val = split_by_patient(patients, val_frac, seed)
        return [(None, is_val, {"seed": seed, "val_frac": val_frac, "val_patients_sha1": val_hash(is_val)})]
    of = patient_folds(patients.to_numpy(), folds, seed)
    record = {"seed": seed, "folds": folds, "folds_sha1": sha1(sorted(f"{p} {f}" for p, f in set(zip(patients.astype(str), of))))}
    wanted = range(folds) if fold == "all" else [int(fold)]
    return [(i, of == i, {**record, "fold": i, "val_patients_sha1": val_hash(of == i)}) for i in wanted]


class XrayDataset:
    """Serves batches from one or more caches (the base cache first, augmented copies after).

    ds[i] -> (uint8 (1, S, S), target float32 (K,), mask bool (K,)); ds[list] -> the same batched
    (B, 1, S, S), (B, K), (B, K). Index i reads source i // n at row i % n, so an augmented copy of
    row r is row r again with the copy's pixels: it inherits labels and patient. Targets are on
    [-1, 1] with NaN (blank) replaced by 0 and mask False there. Float conversion and normalisation
    happen on the training device, not here.

    With `spread` (N, K) (high - low of policies.training_targets; targets is then low) each item
    gains a fourth tensor, spread float32 (K,) (0 where mask is False): the trainer draws the
    target low + spread * U(0, 1) on the device, from its own seeded generator, so a resume draws
    the same soft targets."""

    def __init__(self, sources: list[ImageCache], slots: np.ndarray, targets: np.ndarray,
                 spread: np.ndarray | None = None):
        import torch
        self.sources = sources
        self.slots = np.asarray(slots, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.float32).reshape(len(self.slots), -1)
        self.mask = torch.from_numpy(~np.isnan(targets))
        self.targets = torch.from_numpy(np.nan_to_num(targets, nan=0.0))
        self.spread = None
        if spread is not None:
            spread = np.asarray(spread, dtype=np.float32).reshape(targets.shape)
            self.spread = torch.from_numpy(np.where(np.isnan(targets), 0.0, np.nan_to_num(spread, nan=0.0)))

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
        if self.spread is not None:
            out += (self.spread[rows],)
        return tuple(t[0] for t in out) if single else out


# ---------------------------------------------------------------------------------------------

def add_label_convention_flag(p, what: str = "the CSV") -> None:
    p.add_argument("--label-convention", choices=LABEL_CONVENTIONS, default="auto",
                   help=f"how {what} writes labels: cs156b (1 positive, 0 uncertain, -1 negative), chexpert "
                   "(Stanford's: 1 positive, 0 negative, -1 uncertain), or auto: detected from the layout")


def parse_args(argv=None):
    p = Parser(description="Build (or finish) the grayscale uint8 image cache for one CSV.")
    add_data_flags(p, "--csv", "CSV to cache (default: the first of DATA_ROOT/student_labels/train2023.csv, "
                   "CheXpert-v1.0-small/train.csv, CheXpert-v1.0/train.csv); a train CSV or an 'Id, Path' test CSV")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE,
                   help="images per shard file of a new cache (only the layout: any size is found by every script)")
    add_label_convention_flag(p, "the train CSV")
    add_patient_col_flag(p)
    p.add_argument("--labels-only", action=argparse.BooleanOptionalAction, default=False,
                   help="only read the train CSV and print its per-label counts (no images read, no cache): "
                   "inspect a CSV whose images are elsewhere")
    config.add_config_flag(p)
    args = config.parse_args(p, argv)
    if args.image_size is None:
        args.image_size = 64 if args.data_root is None else 224
    check_common_flags(p, args)
    if args.shard_size < 1:
        p.error(f"--shard-size must be at least 1, got {args.shard_size}")
    return args


def find_train_csv(root: Path) -> Path:
    """The first of TRAIN_CSVS under root; a UserError naming all of them when none exists."""
    for rel in TRAIN_CSVS:
        if (root / rel).is_file():
            return root / rel
    raise UserError(f"--data-root {root}: no train CSV found (looked for {', '.join(TRAIN_CSVS)}); "
                    f"pass the CSV with --csv / --train-csv")


def resolve_data(data_root: Path | None, csv: Path | None, default_csv: str,
                 log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(data root, CSV): the demo dataset when data_root is None; errors name a missing path.
    csv None means DATA_ROOT/student_labels/<default_csv>, except for the train CSV
    ('train2023.csv'): then the first of TRAIN_CSVS that exists (find_train_csv), named in one
    line through `log`."""
    from demo import ensure_demo  # demo.py imports this module's names
    root = ensure_demo() if data_root is None else Path(data_root)
    if not root.is_dir():
        raise UserError(f"--data-root {root}: no such directory")
    if csv is None and default_csv == Path(TRAIN_CSVS[0]).name:
        csv = find_train_csv(root)
        log(f"train CSV: {csv} (found under the data root; --csv / --train-csv to choose another)")
    csv = Path(csv) if csv is not None else root / "student_labels" / default_csv
    if not csv.is_file():
        raise UserError(f"{csv}: no such CSV file")
    return root, csv


def print_label_summary(df: pd.DataFrame) -> None:
    """The patients line, the per-label table (counts on the project's scale) and the line saying
    which convention was read."""
    print(describe_patients(df))
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
    df = read_test_csv(csv) if is_test else read_train_csv(csv, args.label_convention, args.patient_col)
    if args.labels_only:
        print(f"{'csv':<10} {csv}\n{'rows':<10} {len(df)} ({df.attrs['n_stray']} stray rows dropped)\n")
        print_label_summary(df)
        return None
    paths = list(dict.fromkeys(df["path"]))
    cache = build_cache(paths, root, args.image_size, args.cache_dir, csv.stem, args.square, args.workers,
                        shard_size=args.shard_size, equalize=args.equalize)
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
