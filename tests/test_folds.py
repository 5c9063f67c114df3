"""K-fold training: patient-grouped folds, one model folder per fold, per-fold resume, and the
out-of-fold predictions of every training row."""
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import train
from common import UserError
from dataset import patient_folds
from model import Checkpoint


def test_patient_folds_are_whole_patients_deterministic_and_cover_every_row():
    rng = np.random.default_rng(0)
    patients = rng.choice([f"pid{i}" for i in range(60)], 400)
    fold = patient_folds(patients, 5, seed=3)
    assert set(fold) == set(range(5))
    by_patient = pd.Series(fold).groupby(patients).nunique()
    assert (by_patient == 1).all()  # no patient on two sides
    assert (patient_folds(patients, 5, seed=3) == fold).all()  # the same seed, the same folds
    order = rng.permutation(len(patients))
    assert (patient_folds(patients[order], 5, seed=3) == fold[order]).all()  # whatever the row order
    assert not (patient_folds(patients, 5, seed=4) == fold).all()
    sizes = np.bincount(pd.Series(fold).groupby(patients).first(), minlength=5)
    assert sizes.max() - sizes.min() <= 1  # patients dealt out evenly


@pytest.fixture(scope="module")
def kfold_run(demo_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("kfold")
    from tests.conftest import TINY
    argv = ["--data-root", str(demo_root), "--cache-dir", str(work / "cache"), "--out-dir", str(work / "ckpt"), *TINY,
            "--pathology", "Cardiomegaly", "--folds", "3", "--fold", "all"]
    return work, argv, train.main(argv)


def test_each_fold_validates_other_patients_and_oof_covers_every_row_once(kfold_run, demo_root):
    work, argv, summaries = kfold_run
    folder = work / "ckpt" / "cardiomegaly"
    assert sorted(p.name for p in folder.iterdir()) == ["fold0", "fold1", "fold2", "oof_predictions.csv",
                                                        "oof_summary.json"]
    assert [s["split"]["fold"] for s in summaries] == [0, 1, 2]
    assert len({s["split"]["folds_sha1"] for s in summaries}) == 1
    vals = [set(pd.read_csv(folder / f"fold{i}" / "val_predictions.csv")["patient"]) for i in range(3)]
    assert not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])
    ckpt = Checkpoint.load(folder / "fold1" / "best.pt")
    assert ckpt.split["folds"] == 3 and ckpt.split["fold"] == 1
    oof = pd.read_csv(folder / "oof_predictions.csv")
    args, rt = train.parse_args(argv), train.Runtime(torch.device("cpu"))
    table, root, csv_path = train.read_table(args, rt)
    table, _ = train.load_images(table, root, csv_path, args)
    labelled = table[table["Cardiomegaly"].notna()]
    assert sorted(oof["path"]) == sorted(labelled["path"])  # every labelled training row exactly once
    assert set(oof["fold"]) == {0, 1, 2} and oof["calibrated"].between(-1, 1).all()
    for i in range(3):  # each row predicted by the model of the fold that held it out
        val = pd.read_csv(folder / f"fold{i}" / "val_predictions.csv")
        assert (oof[oof["fold"] == i].set_index("path").loc[val["path"], "raw"].to_numpy() == val["raw"].to_numpy()).all()


def test_a_finished_fold_is_skipped_and_one_fold_resumes_alone(kfold_run, capsys):
    work, argv, _ = kfold_run
    capsys.readouterr()
    [s] = train.main(argv[:-1] + ["2", "--resume"])  # --fold 2, as one SLURM array task
    out = capsys.readouterr().out
    assert "fold 2: already finished" in out and s["split"]["fold"] == 2
    assert re.search(r"^Cardiomegaly\s+all\s+oof\s", out, re.M)  # all three folds there: the out-of-fold row


def test_fold_flags_are_checked(tiny_args, capsys):
    for flags, message in [(["--folds", "1"], "--folds must be at least 2"), (["--fold", "2"], "--fold needs --folds"),
                           (["--folds", "3", "--fold", "3"], "--fold must be 0..2 or all")]:
        with pytest.raises(SystemExit):
            train.parse_args(tiny_args("--pathology", "Cardiomegaly", *flags))
        assert message in capsys.readouterr().err


def test_folds_of_another_assignment_are_refused_when_merged(kfold_run, tmp_path):
    """A fold trained with another --split-seed cannot join the out-of-fold predictions."""
    work, argv, _ = kfold_run
    out = tmp_path / "ckpt"
    shutil.copytree(work / "ckpt", out)
    (out / "cardiomegaly" / "oof_predictions.csv").unlink()
    shutil.rmtree(out / "cardiomegaly" / "fold1")
    other = [a if a != str(work / "ckpt") else str(out) for a in argv]
    with pytest.raises(UserError, match=r"fold1: its folds \(3 folds, hash \w+\) are not those of .*fold0"):
        train.main(other[:-1] + ["1", "--split-seed", "7"])
    assert not (out / "cardiomegaly" / "oof_predictions.csv").exists()


def test_a_single_split_model_and_folds_never_share_a_folder(kfold_run, tmp_path):
    work, argv, _ = kfold_run
    single = argv[:-4]  # the same run without --folds 3 --fold all
    with pytest.raises(UserError, match=r"cardiomegaly holds a K-fold run; train without --folds into another"):
        train.main(single)


def test_a_lone_last_row_is_left_out_of_the_epoch():
    """BatchNorm cannot train on a batch of one row (a fold of 337 rows at batch 16 crashed): 33 rows
    in batches of 16 make 16 + 16, the 33rd left out of this epoch's draw as drop_last would; 34 make
    16 + 16 + 2."""
    from sampler import EpochSampler
    s = EpochSampler(None, 33, 16, seed=0)
    batches = list(s)
    assert [len(b) for b in batches] == [16, 16] and len(s) == 2
    assert sorted(i for b in batches for i in b) == sorted(s.draw()[:32].tolist())
    assert [len(b) for b in EpochSampler(None, 34, 16, seed=0)] == [16, 16, 2]


def test_the_out_of_fold_row_of_a_finding_without_labels_says_dash_not_nan(demo_root, tiny_args, tmp_path, capsys):
    """nih_dev has findings no row labels (Fracture): their out-of-fold row showed 'nan (nan-nan)'."""
    table = pd.read_csv(demo_root / "student_labels" / "train2023.csv")
    table["Pleural Other"] = np.nan
    table.to_csv(tmp_path / "train.csv", index=False)
    train.main(tiny_args("--pathology", "Cardiomegaly", "Pleural Other", "--multi-head", "--folds", "2",
                         "--train-csv", str(tmp_path / "train.csv")))
    out = capsys.readouterr().out
    assert re.search(r"^Pleural Other\s+all\s+oof\s+-\s+0\s+-\s+-\s+-\s+-\s+-\s+-\s+-\s*$", out, re.M), out[-1500:]
    assert re.search(r"^Cardiomegaly\s+all\s+oof\s+-\s+\d+\s+-\s+-\s+0\.\d{4} \(0\.\d{3}-\d\.\d{3}\)", out, re.M)
    assert "nan" not in out.split("pathology", 1)[-1]
