"""CSVs as users' files arrive: cut short mid-row, a column named twice, rows given twice (dropped
with one warning) or twice with other labels (an error naming both lines), and line numbers as an
editor shows them, in both layouts (CS 156b, Stanford) and the 'Id, Path' test reader."""
import re
import warnings

import numpy as np
import pytest

import dataset
from common import UserError, run_cli
from dataset import PATHOLOGIES, read_csv_lines, read_test_csv, read_train_csv

CS156B_HEADER = ["Unnamed: 0.1", "Unnamed: 0", "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *PATHOLOGIES]
CARDIO = CS156B_HEADER.index("Cardiomegaly")


def cs156b_line(i, pid=None, cardio="1.0", sex="Female"):
    """One CS 156b row as a line of text: image i of patient pid (default i), Cardiomegaly = cardio."""
    cells = [str(i), str(i), f"train/pid{pid if pid is not None else i}/study1/view{i}_frontal.jpg", sex, "60",
             "Frontal", "AP", *[""] * len(PATHOLOGIES)]
    cells[CARDIO] = cardio
    return ",".join(cells)


def stanford_line(i, cardio="0.0"):
    labels = [""] * 14
    labels[2] = cardio  # Stanford's own order: No Finding, Enlarged Cardiomediastinum, Cardiomegaly, ...
    return ",".join([f"CheXpert-v1.0-small/train/patient{i:05d}/study1/view1_frontal.jpg", "Male", "70",
                     "Frontal", "AP", *labels])


STANFORD_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                   "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                   "Pleural Effusion,Pleural Other,Fracture,Support Devices")


def write(path, *lines, end="\n"):
    path.write_text("\n".join(lines) + end)
    return path


def cs156b_file(path, *lines, end="\n"):
    return write(path, ",".join(CS156B_HEADER), *lines, end=end)


# ---------------------------------------------------------------------------------------------
# Cut short, a column twice

def test_a_file_cut_short_mid_row_stops_naming_the_line(tmp_path):
    """pandas pads the partial last row with blanks and keeps it; the reader stops instead."""
    whole = cs156b_line(3)
    csv = cs156b_file(tmp_path / "train2023.csv", cs156b_line(1), cs156b_line(2), whole[:whole.index("Frontal")],
                      end="")
    with pytest.raises(UserError, match=re.escape("train2023.csv: line 4: 6 fields where the header has 16 "
                                                  "(a row cut short?); fix or remove that line")):
        read_train_csv(csv)


def test_a_file_cut_inside_a_quoted_cell_is_not_a_readable_csv(tmp_path):
    csv = cs156b_file(tmp_path / "train2023.csv", cs156b_line(1), '2,2,"train/pid2/stu', end="")
    with pytest.raises(UserError, match=r"train2023.csv: line 3: not a readable CSV \(unexpected end of data\)"):
        read_train_csv(csv)


def test_a_row_with_a_field_too_many_names_its_line(tmp_path):
    csv = cs156b_file(tmp_path / "train2023.csv", cs156b_line(1), cs156b_line(2) + ",1.0", cs156b_line(3))
    with pytest.raises(UserError, match=r"line 3: 17 fields where the header has 16 \(a row with a stray "
                                        r"separator\?\)"):
        read_train_csv(csv)


def test_a_column_named_twice_stops_naming_it(tmp_path):
    """pandas would rename the second 'Cardiomegaly.1' and read it as another label."""
    header = CS156B_HEADER[:-1] + ["Cardiomegaly"]
    csv = write(tmp_path / "train2023.csv", ",".join(header), cs156b_line(1))
    with pytest.raises(UserError, match=re.escape(f"train2023.csv: line 1: column 'Cardiomegaly' appears twice "
                                                  f"(columns {CARDIO + 1} and 16); rename or remove one")):
        read_train_csv(csv)


def test_the_test_csv_reader_shares_the_checks(tmp_path):
    cut = write(tmp_path / "test_ids.csv", "Id,Path", "1,test/pid1/study1/view1_frontal.jpg", "2", end="")
    with pytest.raises(UserError, match=r"test_ids.csv: line 3: 1 fields where the header has 2"):
        read_test_csv(cut)
    twice = write(tmp_path / "twice.csv", "Id,Path,Path", "1,a.jpg,b.jpg")
    with pytest.raises(UserError, match=r"twice.csv: line 1: column 'Path' appears twice"):
        read_test_csv(twice)


def test_dataset_cli_says_it_in_one_line(tmp_path, capsys):
    csv = cs156b_file(tmp_path / "train2023.csv", cs156b_line(1), cs156b_line(2)[:20], end="")
    assert run_cli(dataset.main, ["--csv", str(csv), "--labels-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "line 3: 3 fields where the header has 16" in err[0]


# ---------------------------------------------------------------------------------------------
# Line numbers are the editor's

def test_lines_count_blank_lines_and_cells_that_span_lines(tmp_path):
    """Row i is not line i + 2 when a quoted cell holds a line break or a blank line sits between rows."""
    csv = cs156b_file(tmp_path / "train2023.csv", cs156b_line(1, sex='"Fe\nmale"'), "", cs156b_line(2),
                      cs156b_line(3, cardio="maybe"))
    raw, lines = read_csv_lines(csv)
    assert lines.tolist() == [2, 5, 6] and raw["Sex"][0] == "Fe\nmale"
    with pytest.raises(UserError, match=r"line 6, column 'Cardiomegaly': invalid label 'maybe'"):
        read_train_csv(csv)


@pytest.mark.parametrize("end", ["\r\n", "\r"], ids=["windows", "old-mac"])
def test_other_line_ends_count_the_same(tmp_path, end):
    csv = tmp_path / "train2023.csv"
    csv.write_text(end.join(["\ufeff" + ",".join(CS156B_HEADER), cs156b_line(1), "", cs156b_line(2, cardio="x")]) + end,
                   newline="")
    raw, lines = read_csv_lines(csv)
    assert lines.tolist() == [2, 4] and raw.columns[0] == "Unnamed: 0.1"  # the byte-order mark is no part of it
    with pytest.raises(UserError, match=r"line 4, column 'Cardiomegaly': invalid label 'x'"):
        read_train_csv(csv)


# ---------------------------------------------------------------------------------------------
# Rows given twice

def test_exact_duplicate_rows_are_dropped_with_one_warning_naming_the_lines(tmp_path):
    """A row repeated (same path, same labels on the project's scale: '1' and '1.0' agree), even with
    another Sex or index, is the same image once; every other row is kept."""
    csv = cs156b_file(tmp_path / "train2023.csv", cs156b_line(1), cs156b_line(2), cs156b_line(1, cardio="1"),
                      cs156b_line(3, cardio=""), cs156b_line(3, cardio="", sex="Male"), cs156b_line(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = read_train_csv(csv)
    messages = [str(w.message) for w in caught]
    assert messages == [f"{csv}: dropped 3 duplicate rows (the path and labels of an earlier line): "
                        f"line 4 (as line 2), line 6 (as line 5), line 7 (as line 3)"]
    assert df["path"].tolist() == [f"train/pid{i}/study1/view{i}_frontal.jpg" for i in (1, 2, 3)]
    assert df.attrs["n_duplicates"] == 3 and df.attrs["n_patients"] == 3


def test_one_image_with_two_sets_of_labels_stops_naming_both_lines(tmp_path):
    csv = cs156b_file(tmp_path / "train2023.csv", cs156b_line(1), cs156b_line(2), cs156b_line(3),
                      cs156b_line(2, cardio="-1.0"))
    with pytest.raises(UserError, match=re.escape(
            "train2023.csv: lines 3 and 5 give the image 'train/pid2/study1/view2_frontal.jpg' different labels "
            f"(Cardiomegaly: '1.0' vs '-1.0'); keep the right one and remove the other")):
        read_train_csv(csv)


def test_a_blank_against_a_label_is_a_conflict_too(tmp_path):
    csv = cs156b_file(tmp_path / "train2023.csv", cs156b_line(1, cardio=""), cs156b_line(1, cardio="0"))
    with pytest.raises(UserError, match=r"lines 2 and 3 .* \(Cardiomegaly: '' vs '0'\)"):
        read_train_csv(csv)


def test_stanford_duplicates_follow_the_same_rules(tmp_path):
    """Stanford's convention: 0.0 negative, -1.0 uncertain; the comparison is on the project's scale."""
    csv = write(tmp_path / "train.csv", STANFORD_HEADER, stanford_line(1), stanford_line(2), stanford_line(1, "0"))
    with pytest.warns(UserWarning, match=r"dropped 1 duplicate rows .*: line 4 \(as line 2\)$"):
        df = read_train_csv(csv)
    assert len(df) == 2 and df["Cardiomegaly"].tolist() == [-1.0, -1.0]
    csv = write(tmp_path / "train.csv", STANFORD_HEADER, stanford_line(1), stanford_line(2), stanford_line(1, "-1.0"))
    with pytest.raises(UserError, match=r"lines 2 and 4 give the image 'CheXpert-v1.0-small/train/patient00001/"
                                        r"study1/view1_frontal.jpg' different labels "
                                        r"\(Cardiomegaly: '0.0' vs '-1.0'\)"):
        read_train_csv(csv)


def test_duplicates_are_counted_after_stray_rows(tmp_path):
    """Stray rows go first (their own warning); a duplicate's line is still the file's."""
    stray = "9,9,CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg,Male,50,Frontal,AP" + "," * 9
    csv = cs156b_file(tmp_path / "train2023.csv", stray, cs156b_line(1), stray, cs156b_line(1))
    with pytest.warns(UserWarning) as record:
        df = read_train_csv(csv)
    assert [str(w.message).split(": ", 1)[1] for w in record] == [
        "dropped 2 stray rows whose path starts 'CheXpert-v1.0/' (no such files)",
        "dropped 1 duplicate rows (the path and labels of an earlier line): line 5 (as line 3)"]
    assert len(df) == 1 and df.attrs["n_stray"] == 2 and df.attrs["n_duplicates"] == 1


def test_a_clean_file_reads_as_before(tmp_path):
    csv = cs156b_file(tmp_path / "train2023.csv", *[cs156b_line(i, pid=i // 2) for i in range(6)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_train_csv(csv)
    assert len(df) == 6 and df.attrs["n_duplicates"] == 0 and df.attrs["n_patients"] == 3
    np.testing.assert_array_equal(df["Cardiomegaly"].to_numpy(), np.ones(6, np.float32))
