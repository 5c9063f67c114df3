"""K-fold runs downstream of train.py: oof_predictions.csv, experiments/blend.py fitted on the
out-of-fold predictions of every row, make_submission.py averaging a K-fold model's folds, and
runs.merge_oof's checks.

Two tiny K = 3 Cardiomegaly runs are trained once for the module, 'a' (--seed 0) and 'b' (--seed 1
--split-seed 0: other weights, the same folds); the tests that need a run with other folds or a
single split train it themselves (one fold, or one model)."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import make_submission
import train
from cache import cached_table
from calibration import apply_blend, apply_calibration
from common import UserError, run_cli
from dataset import XrayDataset, patient_folds, read_test_csv, read_train_csv
from experiments import blend
from model import Checkpoint, load_checkpoint, predict
from runs import PREDICTION_COLUMNS, merge_oof, read_oof
from runtime import Runtime
from tests.conftest import TINY

K = 3
NAME = "Cardiomegaly"


def train_args(demo_root, work, out_dir, *extra) -> list[str]:
    return ["--data-root", str(demo_root), "--cache-dir", str(work / "cache"), "--out-dir", str(out_dir), *TINY,
            "--pathology", NAME, *extra]


@pytest.fixture(scope="module")
def work(demo_root, tmp_path_factory):
    """work/runs/{a,b}/cardiomegaly/fold{0,1,2}/ and their oof_predictions.csv; work/cache."""
    work = tmp_path_factory.mktemp("folds")
    train.main(train_args(demo_root, work, work / "runs" / "a", "--folds", str(K), "--fold", "all", "--seed", "0"))
    train.main(train_args(demo_root, work, work / "runs" / "b", "--folds", str(K), "--fold", "all", "--seed", "1",
                          "--split-seed", "0"))
    return work


@pytest.fixture(scope="module")
def fitted(work):
    """blend.json of runs a and b (both K-fold), and what blend.main returned."""
    out = work / "blend.json"
    made = blend.main(["--runs", str(work / "runs" / "a"), str(work / "runs" / "b"), "--out", str(out),
                       "--min-rows", "10", "--folds", "2", "--no-progress"])
    return out, made


def training_table(demo_root, work) -> pd.DataFrame:
    """The training rows exactly as train.py read them (bad images dropped)."""
    return cached_table(read_train_csv(demo_root / "student_labels" / "train2023.csv"), demo_root, 32,
                        work / "cache", "train2023", workers=1, progress=False)[0]


def labels_csv(demo_root):
    return demo_root / "student_labels" / "test_labels.csv"


@pytest.fixture(scope="module")
def fold_outputs(demo_root, work):
    """fold_outputs(folder), by hand: every fold model of a K-fold folder on every test image
    (test_labels.csv, in its row order) -> (the test table, raw Cardiomegaly outputs (N,) per fold,
    the fold checkpoints); computed once per folder."""
    table, cache = cached_table(read_test_csv(labels_csv(demo_root)), demo_root, 32, work / "cache", "test_labels",
                                workers=1, progress=False)
    data = XrayDataset([cache], table["slot"].to_numpy(), np.zeros((len(table), 0), np.float32))
    rt = Runtime(torch.device("cpu"), progress=False)
    done = {}

    def outputs(folder) -> tuple[pd.DataFrame, list[np.ndarray], list[Checkpoint]]:
        if folder not in done:
            raws, ckpts = [], []
            for i in range(K):
                model, ckpt = load_checkpoint(folder / f"fold{i}" / "best.pt")
                raws.append(predict(model, data, 16, rt)[:, ckpt.pathologies.index(NAME)])
                ckpts.append(ckpt)
            done[folder] = table, raws, ckpts
        return done[folder]
    return outputs


def submit(demo_root, work, checkpoints, out, *extra) -> dict:
    return make_submission.main(["--data-root", str(demo_root), "--test-csv", str(labels_csv(demo_root)),
                                 "--checkpoints", str(checkpoints), "--out", str(out), "--cache-dir",
                                 str(work / "cache"), "--fill-missing", "0", "--workers", "1", "--batch-size", "8",
                                 "--no-progress", *extra])


def written(out, ids) -> np.ndarray:
    return pd.read_csv(out).set_index("Id").loc[ids, NAME].to_numpy()


# ---------------------------------------------------------------------------------------------
# train.py's oof_predictions.csv

def test_oof_predictions_hold_every_labelled_training_row_once(work, demo_root):
    table = training_table(demo_root, work)
    folder = work / "runs" / "a" / "cardiomegaly"
    oof = pd.read_csv(folder / "oof_predictions.csv")
    assert list(oof.columns) == [*PREDICTION_COLUMNS, "fold"]
    labelled = table[table[NAME].notna()]
    assert not oof.duplicated(["path", "pathology"]).any() and (oof.pathology == NAME).all()
    assert sorted(oof.path) == sorted(labelled.path)  # every labelled row, once
    # each row in the fold whose model did not train on it: dataset.patient_folds of --split-seed 0
    fold_of = dict(zip(table.path, patient_folds(table.patient.to_numpy(), K, 0)))
    assert (oof.fold == oof.path.map(fold_of)).all() and set(oof.fold) == set(range(K))
    for i in range(K):
        val = pd.read_csv(folder / f"fold{i}" / "val_predictions.csv")
        mine = oof[oof.fold == i].set_index("path").loc[val.path]
        np.testing.assert_array_equal(mine.raw, val.raw)
        np.testing.assert_array_equal(mine.calibrated, val.calibrated)
    assert len(read_oof(folder)) == len(labelled)


# ---------------------------------------------------------------------------------------------
# experiments/blend.py

def test_blend_of_two_kfold_runs_is_fitted_on_every_out_of_fold_row(work, demo_root, fitted):
    _, made = fitted
    entry = made["pathologies"][NAME]
    assert entry["members"] == ["a/cardiomegaly", "b/cardiomegaly"]
    n_labelled = int(training_table(demo_root, work)[NAME].notna().sum())
    oof_b = pd.read_csv(work / "runs" / "b" / "cardiomegaly" / "oof_predictions.csv")
    assert entry["oof"]["n"] == n_labelled == len(oof_b)
    assert entry["fallback"] is False and sum(entry["weights"]) == pytest.approx(1)
    assert json.loads(fitted[0].read_text())["pathologies"][NAME]["oof"]["n"] == n_labelled


def test_blend_refuses_other_folds_and_unfinished_folds(work, demo_root, tmp_path, capsys):
    """Run c: other folds (--split-seed 1), only fold 0 trained. With run a the folds differ (that is
    said first: retraining is needed either way); alone its folds 1 and 2 are named as unfinished;
    its fold 0 alone is no member."""
    train.main(train_args(demo_root, work, tmp_path / "c", "--folds", str(K), "--fold", "0", "--split-seed", "1"))
    capsys.readouterr()
    out = tmp_path / "blend.json"
    assert run_cli(blend.main, ["--runs", str(work / "runs" / "a"), str(tmp_path / "c"), "--out", str(out),
                                "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: the K-fold runs do not share one set of folds: ")
    assert "a (split seed 0, 3 folds" in err and "c (split seed 1, 3 folds" in err and "--split-seed" in err
    with pytest.raises(UserError, match=r"c/cardiomegaly: 2 of its 3 folds not finished \(fold1, fold2 have no "
                                        r"summary.json\)"):
        blend.main(["--runs", str(tmp_path / "c"), "--out", str(out), "--no-progress"])
    with pytest.raises(UserError, match=r"cardiomegaly/fold0: one fold of a K-fold model; give its parent"):
        blend.main(["--runs", str(tmp_path / "c" / "cardiomegaly" / "fold0"), "--out", str(out), "--no-progress"])
    assert not out.exists()


def test_blend_of_kfold_and_single_split_runs_keeps_the_rows_they_share(work, demo_root, tmp_path, capsys):
    """The choice for a mix: the K-fold member's out-of-fold predictions on the single-split run's
    validation patients only, where both were validated, and a line that says so."""
    train.main(train_args(demo_root, work, tmp_path / "runs" / "s", "--seed", "0", "--val-frac", "0.5"))
    shutil.copytree(work / "runs" / "a", tmp_path / "runs" / "a")
    val = pd.read_csv(tmp_path / "runs" / "s" / "cardiomegaly" / "val_predictions.csv")
    capsys.readouterr()
    made = blend.main(["--runs", str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "s"), "--out",
                       str(tmp_path / "blend.json"), "--min-rows", "10", "--folds", "2", "--no-progress"])
    printed = capsys.readouterr().out
    entry = made["pathologies"][NAME]
    assert entry["members"] == ["a/cardiomegaly", "s/cardiomegaly"]
    assert entry["oof"]["n"] == int(val.target.notna().sum()) < len(pd.read_csv(tmp_path / "runs" / "a" / "cardiomegaly"
                                                                                  / "oof_predictions.csv"))
    line = next(ln for ln in printed.splitlines() if ln.startswith("K-fold and single-split members together"))
    assert f"{val.patient.nunique()} validation patients of s only" in line and "--folds" in line


# ---------------------------------------------------------------------------------------------
# make_submission.py

def test_submission_of_a_kfold_run_is_the_mean_of_its_folds_calibrated_outputs(work, demo_root, fold_outputs,
                                                                              tmp_path):
    table, raws, ckpts = fold_outputs(work / "runs" / "a" / "cardiomegaly")
    cals = [apply_calibration(c.calibration.get(NAME), r) for c, r in zip(ckpts, raws)]
    assert any(c.calibration.get(NAME) is not None for c in ckpts)  # some fold's map moves its outputs
    expected = np.mean(cals, axis=0)
    result = submit(demo_root, work, work / "runs" / "a", tmp_path / "sub.csv")  # no --ensemble needed
    make_submission.check_submission(tmp_path / "sub.csv", table.Id)
    np.testing.assert_allclose(written(tmp_path / "sub.csv", table.Id), expected, atol=1e-5)  # float32 sums
    assert np.abs(expected - cals[0]).max() > 1e-4  # the folds differ: the mean is not one fold's
    rows = [r for r in result["rows"] if r["pathology"] == NAME]
    assert {r["source"] for r in rows} == {"cardiomegaly/fold* (3 models)"}
    assert rows[0]["val_mse"] == pytest.approx(np.mean([c.metrics["per_pathology"][NAME]["val_mse"] for c in ckpts]))


def test_kfold_checkpoints_that_do_not_fit_are_errors_naming_them(work, demo_root, tmp_path):
    ckpts = tmp_path / "ckpt"
    shutil.copytree(work / "runs" / "a", ckpts)
    folder = ckpts / "cardiomegaly"
    (folder / "fold1" / "best.pt").unlink()
    with pytest.raises(UserError, match=rf"{folder}: a K-fold model of 3 folds without fold1/best.pt \(no "
                                        rf"{folder / 'fold1' / 'best.pt'}\): finish training it"):
        submit(demo_root, work, ckpts, tmp_path / "sub.csv")
    shutil.copy(work / "runs" / "a" / "cardiomegaly" / "fold1" / "best.pt", folder / "fold1" / "best.pt")
    other = Checkpoint.load(folder / "fold2" / "best.pt")
    other.split = {**other.split, "folds_sha1": "0123456789abcdef"}
    other.save(folder / "fold2" / "best.pt")
    with pytest.raises(UserError, match=rf"{folder / 'fold2' / 'best.pt'}: its folds \(3 folds, hash 01234567\) are "
                                        rf"not those of {folder / 'fold0' / 'best.pt'}"):
        submit(demo_root, work, ckpts, tmp_path / "sub.csv")
    assert not (tmp_path / "sub.csv").exists()


def test_blend_of_kfold_members_applies_to_their_fold_averaged_raw_outputs(work, demo_root, fitted, fold_outputs,
                                                                          tmp_path):
    blend_json, made = fitted
    entry = made["pathologies"][NAME]
    P = []
    for member in entry["members"]:
        table, raws, _ = fold_outputs(work / "runs" / member)
        P.append(np.mean(raws, axis=0))
    P = np.stack(P, axis=1)
    views = table.view.to_numpy()
    expected = apply_blend(entry, P, table.study.to_numpy(), views)
    result = submit(demo_root, work, work / "runs", tmp_path / "sub.csv", "--blend", str(blend_json))
    got = written(tmp_path / "sub.csv", table.Id)
    i = int(np.argmax(views == "lateral"))  # one value by hand: a lateral image, fused with its study
    assert got[i] == pytest.approx(expected[i], abs=1e-6)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert {r["source"] for r in result["rows"] if r["pathology"] == NAME} == {"a/cardiomegaly/fold* (3 models)",
                                                                              "b/cardiomegaly/fold* (3 models)"}


# ---------------------------------------------------------------------------------------------
# runs.merge_oof

def _fold(folder, i, paths, sha, k=2):
    """A finished fold as train.py leaves it, for merge_oof: val_predictions.csv and summary.json."""
    f = folder / f"fold{i}"
    f.mkdir(parents=True)
    pd.DataFrame({"path": paths, "patient": [p.split("/")[1] for p in paths],
                  "study": ["/".join(p.split("/")[1:3]) for p in paths], "view": "frontal", "pathology": NAME,
                  "target": 1.0, "raw": 0.5, "calibrated": 0.25}).to_csv(f / "val_predictions.csv", index=False)
    (f / "summary.json").write_text(json.dumps({"split": {"seed": 0, "folds": k, "fold": i, "folds_sha1": sha}}))


def test_merge_oof_checks_the_folds(tmp_path):
    p = [f"train/pid{i}/study1/view1_frontal.jpg" for i in range(4)]
    good = tmp_path / "good"
    _fold(good, 0, p[:2], "abc")
    assert merge_oof(good, 2) is None and not (good / "oof_predictions.csv").exists()  # fold 1 not there yet
    _fold(good, 1, p[2:], "abc")
    df = merge_oof(good, 2, pd.Series(p))
    assert sorted(df.path) == p and df.fold.tolist() == [0, 0, 1, 1]
    assert len(read_oof(good)) == 4
    with pytest.raises(UserError, match=r"1 training rows are in no fold's validation set \(e.g. train/pid9/"):
        merge_oof(good, 2, pd.Series([*p, "train/pid9/study1/view1_frontal.jpg"]))

    other = tmp_path / "other"
    _fold(other, 0, p[:2], "abc")
    _fold(other, 1, p[2:], "def")
    with pytest.raises(UserError, match=rf"{other / 'fold1'}: its folds \(2 folds, hash def\) are not those of "
                                        rf"{other / 'fold0'} \(2 folds, hash abc\)"):
        merge_oof(other, 2)
    with pytest.raises(UserError, match=rf"{other / 'fold1'}: its folds \(2 folds, hash def\)"):
        read_oof(other)  # blend.py's check, on the summaries alone

    twice = tmp_path / "twice"
    _fold(twice, 0, p[:3], "abc")
    _fold(twice, 1, p[2:], "abc")
    with pytest.raises(UserError, match=rf"{twice}: {p[2]} is predicted for Cardiomegaly by more than one fold"):
        merge_oof(twice, 2)
    assert not (other / "oof_predictions.csv").exists() and not (twice / "oof_predictions.csv").exists()
