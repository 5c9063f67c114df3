"""Out-of-sample calibration: calibrated_oos (each validation row calibrated by a map fitted without
its patient) in val_predictions.csv, oof_predictions.csv and oof_summary.json, and the validation
score of a split too small to cross-validate."""
import json
import re

import numpy as np
import pandas as pd
import pytest

import train
from calibration import apply_calibration, calibrate_out_of_sample, fit_calibration
from common import run_cli
from model import Checkpoint
from runs import PREDICTION_COLUMNS, merge_oof, read_predictions
from tests.conftest import TINY

NAME = "Cardiomegaly"


def noisy_patients(rng, n_patients=60, per=3):
    """Raw outputs with some signal, many tied (rounded), patients of `per` rows sharing a label."""
    label = np.where(rng.random(n_patients) < 0.35, 1.0, -1.0)
    t = np.repeat(label, per)
    y = np.round(np.clip(0.5 * t + rng.normal(0, 0.4, len(t)), -1, 1), 1)
    t[rng.random(len(t)) < 0.1] = np.nan  # some rows unlabelled
    return y, t, np.repeat(np.arange(n_patients), per)


@pytest.mark.parametrize("kind", ["affine", "isotonic"])
def test_a_rows_out_of_sample_value_never_sees_its_patients_labels(kind):
    """Flip one patient's labels: its calibrated_oos rows stay the same to the last bit (no map they
    went through saw them), while the in-sample calibration (the map that ships) moves."""
    rng = np.random.default_rng(0)
    y, t, groups = noisy_patients(rng)
    prior = -0.3
    oos = calibrate_out_of_sample(kind, y, t, prior, groups)
    assert np.isfinite(oos).all() and (np.abs(oos) <= 1).all()
    lab = ~np.isnan(t)
    in_sample = apply_calibration(fit_calibration(kind, y[lab], t[lab], prior, groups[lab]), y)
    moved = 0
    for p in range(0, 60, 7):
        own = groups == p
        flipped = t.copy()
        flipped[own] = -flipped[own]
        again = calibrate_out_of_sample(kind, y, flipped, prior, groups)
        np.testing.assert_array_equal(again[own], oos[own])
        lab_f = ~np.isnan(flipped)
        shipped = apply_calibration(fit_calibration(kind, y[lab_f], flipped[lab_f], prior, groups[lab_f]), y)
        moved += not np.array_equal(shipped[own], in_sample[own])
    assert moved >= 5  # the in-sample values do see their own labels
    order = np.random.default_rng(1).permutation(len(y))  # and any row order gives the same values
    np.testing.assert_array_equal(calibrate_out_of_sample(kind, y[order], t[order], prior, groups[order]), oos[order])


def test_out_of_sample_without_a_map_to_fit_is_the_raw_output():
    y, t = np.array([-1.5, -0.2, 0.4, 0.9]), np.array([-1.0, 1.0, np.nan, 1.0])
    for kind in ("none", "affine", "isotonic"):  # one patient: nothing is fitted without it
        np.testing.assert_array_equal(calibrate_out_of_sample(kind, y, t, 0.2, np.zeros(4)), np.clip(y, -1, 1))
    np.testing.assert_array_equal(calibrate_out_of_sample("none", y, t), np.clip(y, -1, 1))
    with pytest.raises(ValueError, match="do not match"):
        calibrate_out_of_sample("affine", y, t[:3])


# ---------------------------------------------------------------------------------------------
# A K-fold run with --calibration isotonic

@pytest.fixture(scope="module")
def kfold(demo_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("oos")
    argv = ["--data-root", str(demo_root), "--cache-dir", str(work / "cache"), "--out-dir", str(work / "ckpt"), *TINY,
            "--pathology", NAME, "--folds", "2", "--fold", "all", "--calibration", "isotonic"]
    train.main(argv)
    return work / "ckpt" / "cardiomegaly", argv


def test_oof_summary_scores_calibrated_oos_not_the_in_sample_fit(kfold, capsys):
    folder, argv = kfold
    oof = pd.read_csv(folder / "oof_predictions.csv")
    assert list(oof.columns) == [*PREDICTION_COLUMNS, "fold"]
    lab = oof[oof["target"].notna()]
    summary = json.loads((folder / "oof_summary.json").read_text())
    assert list(summary) == [NAME] and set(summary[NAME]) == {"n", "mse", "mse_ci", "nmse", "auc", "auc_ci"}
    s = summary[NAME]
    assert s["n"] == len(lab) and s["mse"] == pytest.approx(np.mean((lab["calibrated_oos"] - lab["target"]) ** 2),
                                                            rel=1e-12)
    assert s["mse_ci"][0] <= s["mse"] <= s["mse_ci"][1] and len(s["auc_ci"]) == 2
    assert s["nmse"] == pytest.approx(s["mse"] / lab["target"].var(ddof=0))
    for i in range(2):
        fold = folder / f"fold{i}"
        val = pd.read_csv(fold / "val_predictions.csv")
        d = val[val["target"].notna()]
        y, t, g = d["raw"].to_numpy(), d["target"].to_numpy(), d["patient"].to_numpy()
        # the shipped map is still the one fitted on all the fold's validation rows
        ckpt = Checkpoint.load(fold / "best.pt")
        np.testing.assert_array_equal(val["calibrated"], apply_calibration(ckpt.calibration[NAME], val["raw"]))
        # calibrated_oos is not the isotonic map fitted in sample on these rows, and scores worse
        in_sample = apply_calibration(fit_calibration("isotonic", y, t, groups=g), y)
        assert not np.allclose(d["calibrated_oos"], in_sample)
        assert np.mean((d["calibrated_oos"] - t) ** 2) > np.mean((in_sample - t) ** 2)
        # it is calibrate_out_of_sample of the fold's rows, with the run's kind and training mean
        prior = json.loads((fold / "summary.json").read_text())["per_pathology"][NAME]["train_mean"]
        np.testing.assert_array_equal(val["calibrated_oos"], calibrate_out_of_sample(
            "isotonic", val["raw"], val["target"], prior, val["patient"].to_numpy()))
    # the oof row of the final table is that number
    capsys.readouterr()
    train.main(argv[:-3] + ["0", "--calibration", "isotonic", "--resume"])
    row = re.search(rf"^{NAME}\s+all\s+oof\s+.*$", capsys.readouterr().out, re.M).group(0)
    assert f"{s['mse']:.4f} ({s['mse_ci'][0]:.3f}-{s['mse_ci'][1]:.3f})" in row


def test_an_old_val_predictions_csv_without_the_column_still_merges_to_the_same_numbers(kfold, tmp_path):
    """A fold written before calibrated_oos existed: read with the column empty, and merge_oof
    computes it from the file's raw outputs and the fold's summary.json, as train.py does."""
    folder, _ = kfold
    old = tmp_path / "cardiomegaly"
    for i in range(2):
        (old / f"fold{i}").mkdir(parents=True)
        for f in ("summary.json", "val_predictions.csv"):
            (old / f"fold{i}" / f).write_bytes((folder / f"fold{i}" / f).read_bytes())
    path = old / "fold1" / "val_predictions.csv"
    pd.read_csv(path).drop(columns="calibrated_oos").to_csv(path, index=False)
    assert read_predictions(path)["calibrated_oos"].isna().all()
    merged = merge_oof(old, 2)
    new = pd.read_csv(folder / "oof_predictions.csv")
    np.testing.assert_array_equal(merged["calibrated_oos"], new["calibrated_oos"])


# ---------------------------------------------------------------------------------------------
# A validation set too small for a cross-validated score

def test_a_30_row_csv_with_a_tiny_validation_split_trains_and_never_blames_the_lr(demo_root, tmp_path, capsys):
    """30 rows, --val-frac 0.1: Lung Opacity's validation rows come from one labelled patient, so
    no calibration fold can be scored. The run finishes, val_mse_cv is the raw MSE (one notice says
    so), and no line mentions --lr."""
    csv = tmp_path / "tiny30.csv"
    pd.read_csv(demo_root / "student_labels" / "train2023.csv").head(30).to_csv(csv, index=False)
    argv = ["--data-root", str(demo_root), "--train-csv", str(csv), "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "ckpt"), *TINY, "--epochs", "2", "--pathology", "Lung Opacity",
            "--val-frac", "0.1", "--seed", "0"]
    assert run_cli(train.main, argv) == 0
    out = capsys.readouterr()
    assert "--lr" not in out.out + out.err
    assert out.out.count("too few validation patients to cross-validate the calibration") == 1
    summary = json.loads((tmp_path / "ckpt" / "lung_opacity" / "summary.json").read_text())
    per = summary["per_pathology"]["Lung Opacity"]
    assert per["val_mse_cv_fallback"] == "raw" and per["val_mse_cv"] == per["val_mse"] == summary["val_loss"]
    val = pd.read_csv(tmp_path / "ckpt" / "lung_opacity" / "val_predictions.csv")
    np.testing.assert_array_equal(val["calibrated_oos"], val["raw"].clip(-1, 1))  # no map without its patient
