"""Label conventions: Stanford's CSVs (1 positive, 0 negative, -1 uncertain) and the CS 156b files
(1 positive, 0 uncertain, -1 negative) read onto one scale, detection and its override, the
per-label count table, and what train.py records."""
import json
import re

import numpy as np
import pytest
from PIL import Image

import dataset
import train
from common import UserError
from dataset import (CHEXPERT_LABELS, PATHOLOGIES, describe_convention, detect_convention, label_counts, read_train_csv,
                     uncertain_targets)

CS156B_FRONT = ["Unnamed: 0.1", "Unnamed: 0", "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
STANFORD_FRONT = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]

# The underlying findings of six images: P positive, U uncertain, N negative, . not mentioned.
FINDINGS = {
    "No Finding": "..P..P", "Enlarged Cardiomediastinum": "UN.N..", "Cardiomegaly": "PPNNNU",
    "Lung Opacity": "PU.PN.", "Lung Lesion": "..N.U.", "Edema": "NPUU..", "Consolidation": "UUN.N.",
    "Pneumonia": "UUUPN.", "Atelectasis": "UPUNU.", "Pneumothorax": "NNNN.P", "Pleural Effusion": "PNUPN.",
    "Pleural Other": ".U....", "Fracture": "N..U.P", "Support Devices": "PPPN.U",
}
N_ROWS = 6
CS156B_TEXT = {"P": "1.0", "U": "0.0", "N": "-1.0", ".": ""}
STANFORD_TEXT = {"P": "1.0", "U": "-1.0", "N": "0.0", ".": ""}  # Stanford's own convention
POLICY_UNCERTAIN = {"keep": 0.0, "ignore": np.nan, "ones": 1.0, "zeros": -1.0}


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(str(c) for c in r) for r in [header, *rows]) + "\n")
    return path


def cs156b_path(i):
    return f"train/pid{50000 + i}/study1/view1_frontal.jpg"


def cs156b_csv(path, n_stray=0, unnamed=True):
    """The findings in CS 156b's layout and convention; n_stray extra 'CheXpert-v1.0/' rows first."""
    rows = [[i, i, f"CheXpert-v1.0/train/patient{i:05d}/study1/view1_frontal.jpg", "Male", 50, "Frontal", "AP",
             *["1.0"] * len(PATHOLOGIES)] for i in range(n_stray)]
    rows += [[i, i, cs156b_path(i), "Female", 60, "Frontal", "AP", *[CS156B_TEXT[FINDINGS[n][i]] for n in PATHOLOGIES]]
             for i in range(N_ROWS)]
    front = CS156B_FRONT if unnamed else CS156B_FRONT[2:]
    return write_csv(path, front + PATHOLOGIES, [r if unnamed else r[2:] for r in rows])


def stanford_csv(path, prefix="CheXpert-v1.0-small"):
    """The same findings in Stanford's layout and convention, all 14 labels."""
    rows = [[f"{prefix}/train/patient{i + 1:05d}/study1/view1_frontal.jpg", "Female", 60, "Frontal", "AP",
             *[STANFORD_TEXT[FINDINGS[n][i]] for n in CHEXPERT_LABELS]] for i in range(N_ROWS)]
    return write_csv(path, STANFORD_FRONT + CHEXPERT_LABELS, rows)


def expected(names, policy="keep"):
    """(N_ROWS, len(names)) float32 on the project's scale under the uncertain policy."""
    value = {"P": 1.0, "U": POLICY_UNCERTAIN[policy], "N": -1.0, ".": np.nan}
    return np.array([[value[FINDINGS[n][i]] for n in names] for i in range(N_ROWS)], np.float32)


def expected_counts(names):
    return [{"label": n, "positive": FINDINGS[n].count("P"), "uncertain": FINDINGS[n].count("U"),
             "negative": FINDINGS[n].count("N"), "blank": FINDINGS[n].count(".")} for n in names]


# ---------------------------------------------------------------------------------------------
# Both layouts read onto one scale

@pytest.mark.parametrize("policy", ["keep", "ignore", "ones", "zeros"])
def test_both_layouts_give_the_same_internal_labels(tmp_path, policy):
    cs = read_train_csv(cs156b_csv(tmp_path / "train2023.csv"))
    st = read_train_csv(stanford_csv(tmp_path / "train.csv"))
    targets = lambda df, names: uncertain_targets(df[names].to_numpy(np.float32), policy)
    np.testing.assert_array_equal(targets(cs, PATHOLOGIES), expected(PATHOLOGIES, policy))
    np.testing.assert_array_equal(targets(st, PATHOLOGIES), expected(PATHOLOGIES, policy))
    np.testing.assert_array_equal(targets(st, CHEXPERT_LABELS), expected(CHEXPERT_LABELS, policy))
    assert cs.attrs["label_convention"] == "cs156b" and st.attrs["label_convention"] == "chexpert"


def test_stanford_negatives_and_uncertain_cases_are_not_swapped(tmp_path):
    """Pneumonia 'UUUPN.' is written -1,-1,-1,1,0,'' by Stanford: three uncertain, one negative."""
    st = read_train_csv(stanford_csv(tmp_path / "train.csv"))
    np.testing.assert_array_equal(st["Pneumonia"].to_numpy(), np.array([0, 0, 0, 1, -1, np.nan], np.float32))
    # U-Ones must not turn Stanford's negatives (0) into positives
    ones = uncertain_targets(st["Cardiomegaly"].to_numpy(), "ones")
    np.testing.assert_array_equal(ones, np.array([1, 1, -1, -1, -1, 1], np.float32))


def test_full_size_stanford_paths_read_as_stanford(tmp_path):
    """Stanford's full-size set has every path under CheXpert-v1.0/: not stray, Stanford's convention."""
    st = read_train_csv(stanford_csv(tmp_path / "train.csv", prefix="CheXpert-v1.0"))
    assert len(st) == N_ROWS and st.attrs["n_stray"] == 0 and st.attrs["label_convention"] == "chexpert"
    np.testing.assert_array_equal(st[CHEXPERT_LABELS].to_numpy(np.float32), expected(CHEXPERT_LABELS))


def test_bad_stanford_value_names_line_and_column(tmp_path):
    csv = stanford_csv(tmp_path / "train.csv")
    lines = csv.read_text().splitlines()
    cells = lines[2].split(",")
    cells[5 + CHEXPERT_LABELS.index("Edema")] = "2"
    lines[2] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=re.escape("train.csv: line 3, column 'Edema': invalid label '2' "
                                                  "(expected 1, 0, -1 or blank)")):
        read_train_csv(csv)


# ---------------------------------------------------------------------------------------------
# Detection and the override

def test_detection_from_the_layout(tmp_path):
    assert read_train_csv(cs156b_csv(tmp_path / "a.csv")).attrs["label_convention_how"] == "detected"
    assert read_train_csv(stanford_csv(tmp_path / "b.csv")).attrs["label_convention_how"] == "detected"
    assert detect_convention(CS156B_FRONT, [cs156b_path(0)]) == "cs156b"
    assert detect_convention(STANFORD_FRONT, ["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"]) \
        == "chexpert"
    # the paths decide when they tell; an Unnamed index column only when they do not
    assert detect_convention(CS156B_FRONT, ["CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"]) == "chexpert"
    assert detect_convention(CS156B_FRONT, ["images/a.jpg"]) == "cs156b"
    assert detect_convention(CS156B_FRONT, [cs156b_path(0), "CheXpert-v1.0-small/train/patient00001/s/v.jpg"]) \
        == "cs156b"
    assert detect_convention(STANFORD_FRONT, ["images/a.jpg"]) is None
    assert detect_convention(STANFORD_FRONT, []) is None


@pytest.mark.parametrize("unnamed", [True, False], ids=["with-unnamed-columns", "paths-only"])
def test_cs156b_file_with_stray_stanford_rows_reads_as_cs156b(tmp_path, unnamed):
    """train2023.csv carries rows whose path starts 'CheXpert-v1.0/': they do not make it Stanford."""
    csv = cs156b_csv(tmp_path / "train2023.csv", n_stray=2, unnamed=unnamed)
    with pytest.warns(UserWarning, match="dropped 2 stray rows"):
        df = read_train_csv(csv)
    assert df.attrs["label_convention"] == "cs156b" and df.attrs["label_convention_how"] == "detected"
    assert df.attrs["n_stray"] == 2 and len(df) == N_ROWS
    np.testing.assert_array_equal(df[PATHOLOGIES].to_numpy(np.float32), expected(PATHOLOGIES))


def test_undetectable_layout_falls_back_to_cs156b_and_says_so(tmp_path):
    csv = write_csv(tmp_path / "mine.csv", STANFORD_FRONT + ["Cardiomegaly", "PatientID"],
                    [[f"images/{i}.jpg", "", "", "Frontal", "", "0", f"P{i}"] for i in range(3)])
    df = read_train_csv(csv)
    assert df.attrs["label_convention"] == "cs156b" and df.attrs["label_convention_how"] == "default"
    assert (df["Cardiomegaly"] == 0).all()
    line = describe_convention("cs156b", "default")
    assert line.startswith("labels read as CS 156b (1 positive, 0 uncertain, -1 negative;")
    assert "does not tell" in line and "--label-convention chexpert" in line


def test_explicit_convention_overrides_detection(tmp_path):
    st = read_train_csv(stanford_csv(tmp_path / "train.csv"), convention="cs156b")
    assert st.attrs["label_convention"] == "cs156b" and st.attrs["label_convention_how"] == "given"
    # read as CS 156b, Stanford's uncertain (-1) become negatives and its negatives (0) uncertain
    np.testing.assert_array_equal(st["Pneumonia"].to_numpy(), np.array([-1, -1, -1, 1, 0, np.nan], np.float32))
    cs = read_train_csv(cs156b_csv(tmp_path / "train2023.csv"), convention="chexpert")
    assert cs.attrs["label_convention"] == "chexpert"
    np.testing.assert_array_equal(cs["Pneumonia"].to_numpy(), np.array([-1, -1, -1, 1, 0, np.nan], np.float32))
    with pytest.raises(UserError, match="unknown label convention 'stanford'.*auto, cs156b, chexpert"):
        read_train_csv(cs156b_csv(tmp_path / "x.csv"), convention="stanford")


def test_describe_convention_lines():
    assert describe_convention("chexpert", "detected") == \
        "labels read as Stanford CheXpert (1 positive, 0 negative, -1 uncertain; detected from the layout)"
    assert describe_convention("cs156b", "given") == \
        "labels read as CS 156b (1 positive, 0 uncertain, -1 negative; set by --label-convention)"


# ---------------------------------------------------------------------------------------------
# The per-label table

def test_label_counts_match_the_findings(tmp_path):
    st = read_train_csv(stanford_csv(tmp_path / "train.csv"))
    cs = read_train_csv(cs156b_csv(tmp_path / "train2023.csv"))
    assert label_counts(st) == expected_counts(CHEXPERT_LABELS)
    assert label_counts(cs) == expected_counts(PATHOLOGIES)
    pneumonia = next(r for r in label_counts(st) if r["label"] == "Pneumonia")
    assert pneumonia == {"label": "Pneumonia", "positive": 1, "uncertain": 3, "negative": 1, "blank": 1}
    # the counts are the source labels: read_train_csv applies no uncertain policy


def table_rows(text: str) -> dict:
    """{label: [positive, uncertain, negative, blank]} from the printed table."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\D+?)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*", line)
        if m:
            out[m[1]] = [int(m[k]) for k in range(2, 6)]
    return out


def test_dataset_labels_only_prints_the_table_without_images(tmp_path, capsys):
    """A Stanford CSV whose images are elsewhere: the counts print, nothing is cached."""
    csv = stanford_csv(tmp_path / "train.csv")
    dataset.main(["--csv", str(csv), "--labels-only", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert table_rows(out) == {r["label"]: [r["positive"], r["uncertain"], r["negative"], r["blank"]]
                               for r in expected_counts(CHEXPERT_LABELS)}
    assert out.rstrip().splitlines()[-1] == describe_convention("chexpert", "detected")
    assert not (tmp_path / "cache").exists()
    dataset.main(["--csv", str(csv), "--labels-only", "--label-convention", "cs156b"])
    out = capsys.readouterr().out
    assert table_rows(out)["Pneumonia"] == [1, 1, 3, 1]
    assert out.rstrip().endswith("set by --label-convention)")


def test_dataset_summary_ends_with_the_table(tmp_path, capsys):
    root = tmp_path / "data"
    cs156b_csv(root / "student_labels" / "train2023.csv")
    for i in range(N_ROWS - 1):  # the last image is missing: its row still counts in the CSV's table
        (root / cs156b_path(i)).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 16), 40 * i, np.uint8)).save(root / cs156b_path(i))
    with pytest.warns(UserWarning, match="1 images missing"):
        dataset.main(["--data-root", str(root), "--image-size", "8", "--workers", "1",
                      "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "5 ok, 1 missing" in out
    assert table_rows(out) == {r["label"]: [r["positive"], r["uncertain"], r["negative"], r["blank"]]
                               for r in expected_counts(PATHOLOGIES)}
    assert out.rstrip().splitlines()[-1] == describe_convention("cs156b", "detected")


def test_labels_only_on_a_test_csv_is_an_error(tmp_path):
    csv = write_csv(tmp_path / "test_ids.csv", ["Id", "Path"], [[1, cs156b_path(0)]])
    with pytest.raises(UserError, match="--labels-only needs a train CSV"):
        dataset.main(["--csv", str(csv), "--labels-only"])


# ---------------------------------------------------------------------------------------------
# What train.py records

def test_train_prints_and_records_the_convention(tiny_args, tmp_path, capsys):
    train.main(tiny_args("--pathology", "Cardiomegaly", "--label-convention", "auto"))
    out = capsys.readouterr().out
    line = describe_convention("cs156b", "detected")
    assert out.count(line) == 1
    summary = json.loads((tmp_path / "ckpt" / "cardiomegaly" / "summary.json").read_text())
    assert summary["config"]["label_convention"] == "cs156b"
    from model import Checkpoint
    assert Checkpoint.load(tmp_path / "ckpt" / "cardiomegaly" / "best.pt").preprocess["label_convention"] == "cs156b"


# ---------------------------------------------------------------------------------------------
# Paths before columns: a Stanford CSV saved with pandas' index

def test_stanford_csv_with_a_pandas_index_reads_as_stanford(tmp_path, capsys):
    """pandas' to_csv(index=True) adds an 'Unnamed: 0' column to a Stanford CSV: its patient…
    paths still decide, and the printed line says the two disagreed."""
    import pandas as pd
    plain = pd.read_csv(stanford_csv(tmp_path / "plain.csv"), dtype=str, keep_default_na=False)
    csv = tmp_path / "valid.csv"
    plain.to_csv(csv)  # index=True, pandas' default
    assert pd.read_csv(csv, nrows=0).columns[0] == "Unnamed: 0"
    df = read_train_csv(csv)
    assert df.attrs["label_convention"] == "chexpert"
    np.testing.assert_array_equal(df[CHEXPERT_LABELS].to_numpy(np.float32), expected(CHEXPERT_LABELS))
    dataset.main(["--csv", str(csv), "--labels-only"])
    out = capsys.readouterr().out
    assert table_rows(out)["Atelectasis"] == [1, 3, 1, 1]
    assert out.rstrip().splitlines()[-1] == (
        "labels read as Stanford CheXpert (1 positive, 0 negative, -1 uncertain; detected from the paths "
        "(patient… folders), although the CSV has an 'Unnamed: 0' index column)")


# ---------------------------------------------------------------------------------------------
# --data-root alone on Stanford's layout

def stanford_root(root, folder="CheXpert-v1.0-small"):
    """A Stanford-layout data root: FOLDER/train.csv and a small JPEG for each of its rows."""
    csv = stanford_csv(root / folder / "train.csv", prefix=folder)
    for i in range(N_ROWS):
        image = root / folder / "train" / f"patient{i + 1:05d}" / "study1" / "view1_frontal.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 16), 40 * i, np.uint8)).save(image)
    return csv


def test_stanford_data_root_alone_finds_its_train_csv(tmp_path, capsys):
    root = tmp_path / "chexpert"
    csv = stanford_root(root)
    dataset.main(["--data-root", str(root), "--image-size", "8", "--workers", "1",
                  "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert f"train CSV: {csv}" in out.splitlines()[0]
    assert f"{N_ROWS} ok, 0 missing" in out
    assert table_rows(out)["Atelectasis"] == [1, 3, 1, 1]
    assert out.rstrip().splitlines()[-1] == describe_convention("chexpert", "detected")


def test_default_train_csv_prefers_cs156b_then_the_small_set(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(UserError, match=re.escape(
            f"--data-root {root}: no train CSV found (looked for student_labels/train2023.csv, "
            f"CheXpert-v1.0-small/train.csv, CheXpert-v1.0/train.csv)")):
        dataset.resolve_data(root, None, "train2023.csv")
    full = stanford_csv(root / "CheXpert-v1.0" / "train.csv", prefix="CheXpert-v1.0")
    assert dataset.resolve_data(root, None, "train2023.csv") == (root, full)
    small = stanford_csv(root / "CheXpert-v1.0-small" / "train.csv")
    assert dataset.resolve_data(root, None, "train2023.csv") == (root, small)
    course = cs156b_csv(root / "student_labels" / "train2023.csv")
    assert dataset.resolve_data(root, None, "train2023.csv") == (root, course)
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"train CSV: {course}")
    # a CSV that is given is read as given, without the line; other defaults (test_ids.csv) as before
    assert dataset.resolve_data(root, small, "train2023.csv") == (root, small)
    with pytest.raises(UserError, match=re.escape(f"{root / 'student_labels' / 'test_ids.csv'}: no such CSV file")):
        dataset.resolve_data(root, None, "test_ids.csv")
    assert capsys.readouterr().out == ""
