"""Patients and studies: who each image of a training CSV belongs to, which decides the patient
split and the K folds (no patient on both sides), and which images make one study (study fusion).

A patient column in the CSV wins (`--patient-col NAME`, else the first of PATIENT_COLUMNS); else a
known path layout (PATIENT_LAYOUTS: CS 156b, Stanford CheXpert, MIMIC-CXR); else the first folder
of each path (a PACS export, PatientID/StudyInstanceUID/SeriesInstanceUID/1.dcm), said in a
warning, when that names more than one patient; else a one-line error naming --patient-col. A
layout is never guessed silently.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from common import UserError, must_keep

PATIENT_COLUMNS = ("PatientID", "Patient ID", "patient_id")  # a CSV column that names the patient wins
# Path layouts whose folders name the patient and the study: a regex with groups (patient, study)
PATIENT_LAYOUTS = {
    "pid…/studyN": r"(?:^|/)(pid\d+)/(study\d+)/",             # CS 156b
    "patient…/studyN": r"(?:^|/)(patient\d+)/(study\d+)/",     # Stanford CheXpert
    "pNN/p…/s…": r"(?:^|/)p\d\d/(p\d+)/(s\d+)/",                # MIMIC-CXR
}
FIRST_FOLDER = "the first folder of each path"


def _layout_ids(paths: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(patient folder, study folder, layout name) of each path in one of PATIENT_LAYOUTS; NaN
    where none fits."""
    patient, study, layout = (pd.Series(np.nan, index=paths.index, dtype=object) for _ in range(3))
    for name, pattern in PATIENT_LAYOUTS.items():
        rest = paths[patient.isna()]  # each layout reads only the paths the ones before it did not fit
        m = rest.str.extract(pattern).dropna()
        patient[m.index], study[m.index], layout[m.index] = m[0], m[1], name
        if patient.notna().all():
            break
    return patient, study, layout


def _first_folder_ids(paths: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(patient, study) of each path read as PATIENT/STUDY/...: the first folder is the patient
    (NaN for a path with no folder), the first two the study ('P/S' of 'P/S/SE/1.dcm'); a path with
    no second folder ('P/1.dcm') is a study by itself."""
    rel = paths.str.replace(r"^(?:\.?/)+", "", regex=True)
    patient = rel.str.extract(r"^([^/]+)/")[0]
    study = rel.str.extract(r"^([^/]+/[^/]+)/")[0].fillna(rel)
    return patient, study


def _study_under(path: str, patient: str) -> str:
    """The study of an image whose patient comes from a column: PATIENT/FOLDER, FOLDER being the one
    under the patient's own folder in the path; the image alone when the path has no such folder."""
    parts = path.split("/")[:-1]
    if patient in parts and parts.index(patient) + 1 < len(parts):
        return f"{patient}/{parts[parts.index(patient) + 1]}"
    return path


def ids_from_paths(paths: pd.Series) -> tuple[pd.Series, pd.Series]:
    """(patient, study) from the paths alone, never an error (test CSVs, whose patients only group
    studies): a known layout (PATIENT_LAYOUTS) where it fits, else the first folder (the path
    itself for a file with none)."""
    patient, study, _ = _layout_ids(paths)
    first, first_study = _first_folder_ids(paths)
    return patient.fillna(first).fillna(paths), (patient + "/" + study).fillna(first_study)


def identify_patients(raw: pd.DataFrame, paths: pd.Series, line: pd.Series, where: str,
                      patient_col: str | None = None) -> tuple[pd.Series, pd.Series, str]:
    """(patient, study, rule) of each row of a training CSV, the same rule for the table.

    In this order: the column `patient_col` (--patient-col) or the first of PATIENT_COLUMNS the CSV
    has; else, when every path is in a known layout (PATIENT_LAYOUTS), its patient folder; else the
    first folder of each path (a PACS export PatientID/StudyInstanceUID/SeriesInstanceUID/1.dcm),
    with one warning, when that names more than one patient; else a UserError naming --patient-col.
    The study is the patient and the folder under the patient's folder (pid50512/study1, P/S); an
    image whose path has none is a study by itself. raw: the CSV as text; paths, line (the file
    line of each row): indexed as raw; rule: e.g. "column 'PatientID'", "path layout pid…/studyN"."""
    col = patient_col or next((c for c in PATIENT_COLUMNS if c in raw.columns), None)
    folder, folder_study, layout = _layout_ids(paths)
    if col is not None:
        if col not in raw.columns:
            raise UserError(f"--patient-col {col}: {where} has no such column (has: {', '.join(raw.columns)})")
        patient = raw[col].str.strip()
        if (patient == "").any():
            raise UserError(f"{where}: line {line[(patient == '').idxmax()]}, column '{col}': no patient id; "
                            f"fill it in, or drop that row")
        study = pd.Series([_study_under(p, q) for p, q in zip(paths, patient)], index=paths.index)
        in_layout = study.eq(paths) & folder.notna()  # a layout names the study when the path has no patient folder
        study[in_layout] = patient[in_layout] + "/" + folder_study[in_layout]
        return patient, study, f"column '{col}'"
    if folder.notna().all():
        rule = "path layout " + " and ".join(sorted(set(layout))) if len(paths) else "no rows"
        return folder, folder + "/" + folder_study, rule
    if folder.notna().any():  # one layout, with exceptions: no rule fits them all
        odd = folder.isna().idxmax()
        raise UserError(f"{where}: line {line[odd]}: path {paths[odd]!r} is not in the layout of the other rows "
                        f"({', '.join(sorted(set(layout.dropna())))}), which names their patient; fix the path, or "
                        f"add a patient column and name it with --patient-col NAME")
    patient, study = _first_folder_ids(paths)
    if patient.notna().all() and patient.nunique() > 1:
        warnings.warn(f"{where}: no patient column ({', '.join(PATIENT_COLUMNS)}) and paths in no known layout "
                      f"({', '.join(PATIENT_LAYOUTS)}): {FIRST_FOLDER} is taken as its patient "
                      f"({patient.nunique()} patients, e.g. {patient.iloc[0]!r}); if it is not, name the "
                      f"patient column with --patient-col NAME", stacklevel=3)
        return patient, study, FIRST_FOLDER
    odd = patient.isna().idxmax() if patient.isna().any() else patient.index[0]
    raise UserError(f"{where}: cannot tell patients apart: no patient column ({', '.join(PATIENT_COLUMNS)}), paths in "
                    f"no known layout ({', '.join(PATIENT_LAYOUTS)}), and their first folder names at most one patient "
                    f"(line {line[odd]}: {paths[odd]!r}); add a patient column and name it with --patient-col NAME")


def describe_patients(df: pd.DataFrame) -> str:
    """One line for people: 'patients: 812 (path layout pid…/studyN)'; df from read_train_csv."""
    return f"patients: {df.attrs['n_patients']} ({df.attrs['patient_rule']})"


def add_patient_col_flag(g) -> None:
    """--patient-col NAME on a parser or group, must_keep (the patients decide the split)."""
    must_keep(g.add_argument("--patient-col", metavar="NAME",
                             help=f"the CSV column that names each image's patient (default: the first of "
                             f"{', '.join(PATIENT_COLUMNS)} the CSV has, else the path layout: "
                             f"{', '.join(PATIENT_LAYOUTS)}, else the first folder of each path)"))
