"""Patients: a patient column wins (PatientID, Patient ID, patient_id, or --patient-col), then the
known path layouts (CS 156b, Stanford, MIMIC), then, with a warning, the first folder of each path
(a PACS export of DICOM files, written here with pydicom); otherwise one line naming --patient-col.
Splits and K folds then keep every patient on one side and in one fold."""
import json
import re
import warnings

import numpy as np
import pandas as pd
import pytest

import dataset
import train
from common import UserError, run_cli
from conftest import TINY
from dataset import patient_folds, patient_splits, read_test_csv, read_train_csv
from patients import FIRST_FOLDER, describe_patients, identify_patients
from test_images import write_dicom

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Cardiomegaly", "Pleural Effusion"]
N_PATIENTS, N_STUDIES = 100, 2


def uid(*parts) -> str:
    """A DICOM-style UID ('1.2.826.0.1.3680043.8.498.' then numbers), as PACS exports name folders."""
    return "1.2.826.0.1.3680043.8.498." + ".".join(str(p) for p in parts)


def patient_id(p: int) -> str:
    return f"{7301 + 37 * p:08d}"  # what a hospital's PatientID looks like: no 'pid', no 'patient'


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """N_PATIENTS x N_STUDIES frontal DICOMs (16 x 16) in two exports of the same images:
    'by_patient/PatientID/StudyInstanceUID/SeriesInstanceUID/1.dcm' (the first folder is the
    patient) and 'by_study/export/StudyInstanceUID/SeriesInstanceUID/1.dcm' (it is not). Returns
    (root, rows): rows as dicts with the patient and both paths."""
    root, rng = tmp_path_factory.mktemp("pacs"), np.random.default_rng(0)
    rows = []
    for p in range(N_PATIENTS):
        for s in range(N_STUDIES):
            study, series = uid(p, s), uid(p, s, 1)
            pixels = rng.integers(0, 4096, (16, 16)).astype(np.uint16)
            by_patient = f"{patient_id(p)}/{study}/{series}/1.dcm"
            by_study = f"export/{study}/{series}/1.dcm"
            write_dicom(root / "by_patient" / by_patient, pixels, bits_stored=12)
            write_dicom(root / "by_study" / by_study, pixels, bits_stored=12)
            rows.append({"patient": patient_id(p), "study": study, "by_patient": by_patient, "by_study": by_study,
                         "Cardiomegaly": rng.choice(["1", "-1", "0", ""]), "Pleural Effusion": rng.choice(["1", "-1"])})
    return root, rows


def write_csv(path, rows, layout: str, patient_col: str | None = None):
    """A training CSV of rows with Path from `layout` ('by_patient' or 'by_study'), and a patient
    column named patient_col when given (before AP/PA, as a hospital export might put it)."""
    front = HEADER[:4] + ([patient_col] if patient_col else []) + HEADER[4:]
    table = pd.DataFrame({"Path": [r[layout] for r in rows], "Sex": "F", "Age": 60, "Frontal/Lateral": "Frontal",
                          "AP/PA": "AP", "Cardiomegaly": [r["Cardiomegaly"] for r in rows],
                          "Pleural Effusion": [r["Pleural Effusion"] for r in rows]})
    if patient_col:
        table[patient_col] = [r["patient"] for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    table[front].to_csv(path, index=False)
    return path


def assert_patient_disjoint(patients: pd.Series, groups: np.ndarray) -> None:
    """Every patient's rows in one group (one side of a split, one fold)."""
    per_patient = pd.Series(groups).groupby(patients.to_numpy()).nunique()
    assert (per_patient == 1).all(), per_patient[per_patient > 1].index[:5].tolist()


def assert_splits_keep_patients_whole(df: pd.DataFrame) -> None:
    for folds in (None, 5):
        for fold, is_val, _ in patient_splits(df["patient"], seed=0, val_frac=0.2, folds=folds):
            assert_patient_disjoint(df["patient"], is_val)
    assert_patient_disjoint(df["patient"], patient_folds(df["patient"].to_numpy(), 5, seed=0))
    # the studies of one patient (different StudyInstanceUID folders) never split up
    assert df.groupby("patient")["study"].nunique().eq(N_STUDIES).all()


# ---------------------------------------------------------------------------------------------
# A PACS export of DICOM files

def test_pacs_layout_without_a_column_takes_the_first_folder_and_says_so(pacs, tmp_path):
    root, rows = pacs
    csv = write_csv(tmp_path / "train.csv", rows, "by_patient")
    with pytest.warns(UserWarning, match=re.escape(f"{FIRST_FOLDER} is taken as its patient ({N_PATIENTS} patients, "
                                                   f"e.g. '{patient_id(0)}'); if it is not, name the patient column "
                                                   f"with --patient-col NAME")):
        df = read_train_csv(csv)
    assert df.attrs["patient_rule"] == FIRST_FOLDER and df.attrs["n_patients"] == N_PATIENTS
    assert df["patient"].tolist() == [r["patient"] for r in rows]
    assert df["study"].tolist() == [f"{r['patient']}/{r['study']}" for r in rows]  # the study, not the series
    assert describe_patients(df) == f"patients: {N_PATIENTS} ({FIRST_FOLDER})"
    assert_splits_keep_patients_whole(df)


@pytest.mark.parametrize("column", ["PatientID", "Patient ID", "patient_id"])
def test_a_patient_column_wins_over_the_folders(pacs, tmp_path, column):
    """The export's first folder is 'export' for every image: the column tells the patients apart."""
    root, rows = pacs
    csv = write_csv(tmp_path / "train.csv", rows, "by_study", column)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice: nothing is guessed
        df = read_train_csv(csv)
    assert df.attrs["patient_rule"] == f"column '{column}'" and df.attrs["n_patients"] == N_PATIENTS
    assert df["patient"].tolist() == [r["patient"] for r in rows]
    assert df.attrs["labels"] == ["Cardiomegaly", "Pleural Effusion"]
    assert df["study"].nunique() == N_PATIENTS * N_STUDIES
    assert_splits_keep_patients_whole(df)


def test_without_the_column_an_unknown_layout_stops_naming_patient_col(pacs, tmp_path, capsys):
    root, rows = pacs
    csv = write_csv(tmp_path / "train.csv", rows, "by_study")
    with pytest.raises(UserError, match=r"train.csv: cannot tell patients apart: no patient column \(PatientID, "
                                        r"Patient ID, patient_id\), paths in no known layout .*first folder names at "
                                        r"most one patient \(line 2: 'export/.*/1.dcm'\); add a patient column and "
                                        r"name it with --patient-col NAME"):
        read_train_csv(csv)
    # the same through the scripts: one line, exit 2
    assert run_cli(dataset.main, ["--csv", str(csv), "--labels-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--patient-col NAME" in err[0]


def test_patient_col_names_any_column(pacs, tmp_path, capsys):
    root, rows = pacs
    csv = write_csv(tmp_path / "train.csv", rows, "by_study", "MRN")
    df = read_train_csv(csv, patient_col="MRN")
    assert df.attrs["patient_rule"] == "column 'MRN'" and df["patient"].nunique() == N_PATIENTS
    dataset.main(["--csv", str(csv), "--labels-only", "--patient-col", "MRN"])
    assert f"patients: {N_PATIENTS} (column 'MRN')" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"--patient-col MRN2: .*train.csv has no such column \(has: Path, Sex, Age, "
                                        r"Frontal/Lateral, MRN, AP/PA"):
        read_train_csv(csv, patient_col="MRN2")


def test_a_blank_patient_id_names_its_line(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("Path,PatientID,AP/PA,Cardiomegaly\na/1.dcm,P1,AP,1\nb/2.dcm, ,AP,1\n")
    with pytest.raises(UserError, match=r"train.csv: line 3, column 'PatientID': no patient id"):
        read_train_csv(csv)


@pytest.mark.slow
def test_k_folds_on_a_pacs_export_keep_every_patient_in_one_fold(pacs, tmp_path):
    """train.py --folds 5 on the DICOM export (20 of its patients: five trainings), patients from the
    PatientID column: each patient's images are validated in exactly one fold (oof_predictions.csv
    holds every row once)."""
    root, rows = pacs
    rows, data = rows[:20 * N_STUDIES], root / "by_study"
    csv = write_csv(tmp_path / "train.csv", rows, "by_study", "PatientID")
    train.main(["--data-root", str(data), "--train-csv", str(csv), "--cache-dir", str(tmp_path / "cache"),
                "--out-dir", str(tmp_path / "ckpt"), *TINY, "--pathology", "Pleural Effusion", "--folds", "5"])
    oof = pd.read_csv(tmp_path / "ckpt/pleural_effusion/oof_predictions.csv")
    patient_of = {r["by_study"]: r["patient"] for r in rows}
    assert sorted(oof["path"]) == sorted(patient_of)
    assert_patient_disjoint(oof["path"].map(patient_of), oof["fold"].to_numpy())
    assert oof.groupby(oof["path"].map(patient_of))["fold"].first().value_counts().tolist() == [4] * 5
    summary = json.loads((tmp_path / "ckpt/pleural_effusion/fold0/summary.json").read_text())
    assert summary["n_train"] + summary["n_val"] == len(rows)


# ---------------------------------------------------------------------------------------------
# Known layouts, and what is never guessed

def ids(paths, **kw):
    paths = pd.Series(paths)
    raw = pd.DataFrame({"Path": paths, **{k: pd.Series(v) for k, v in kw.items()}})
    return identify_patients(raw, paths, pd.Series(np.arange(len(paths)) + 2), "x.csv")


def test_known_layouts_name_patient_and_study():
    patient, study, rule = ids(["train/pid50512/study1/view1_frontal.jpg",
                                "CheXpert-v1.0-small/valid/patient64541/study2/view1_frontal.jpg",
                                "files/p10/p10000032/s50414267/02aa804e.jpg"])
    assert patient.tolist() == ["pid50512", "patient64541", "p10000032"]
    assert study.tolist() == ["pid50512/study1", "patient64541/study2", "p10000032/s50414267"]
    assert rule == "path layout pNN/p…/s… and patient…/studyN and pid…/studyN"


def test_a_column_keeps_the_layouts_study():
    patient, study, rule = ids(["train/pid1/study2/view1_frontal.jpg", "train/pid1/study3/view1_frontal.jpg"],
                               PatientID=["A", "A"])
    assert patient.tolist() == ["A", "A"] and study.tolist() == ["A/study2", "A/study3"]
    assert rule == "column 'PatientID'"


def test_one_path_outside_the_layout_of_the_rest_stops_naming_its_line():
    with pytest.raises(UserError, match=r"x.csv: line 3: path 'train/view1_frontal.jpg' is not in the layout of the "
                                        r"other rows \(pid…/studyN\), .*--patient-col NAME"):
        ids(["train/pid1/study1/view1_frontal.jpg", "train/view1_frontal.jpg", "train/pid2/study1/view1_frontal.jpg"])


def test_files_without_folders_stop():
    with pytest.raises(UserError, match=r"cannot tell patients apart.*\(line 2: 'a.png'\).*--patient-col NAME"):
        ids(["a.png", "b.png"])


def test_test_csvs_take_the_same_rule_without_stopping(tmp_path):
    """read_test_csv: patients only group studies there, so an unknown layout never stops it."""
    csv = tmp_path / "test.csv"
    csv.write_text("Id,Path\n1,P1/S1/SE1/1_frontal.dcm\n2,P1/S1/SE2/1_lateral.dcm\n3,x.png\n"
                   "4,train/pid7/study1/view1_frontal.jpg\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # x.png names no view
        df = read_test_csv(csv)
    assert df["patient"].tolist() == ["P1", "P1", "x.png", "pid7"]
    assert df["study"].tolist() == ["P1/S1", "P1/S1", "x.png", "pid7/study1"]  # one study: both series
