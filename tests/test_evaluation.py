"""evaluation.py: AUC, the patient-grouped bootstrap of evaluate(), metrics files, and the PNGs."""
import csv
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dataset
import evaluation as ev


def test_auc_by_hand_with_ties_uncertain_and_blank_left_out():
    score = np.array([0.1, 0.4, 0.4, 0.8, 0.2, 0.5])
    target = np.array([-1, 1, -1, 1, 0, np.nan])
    # positive pairs against negatives: 0.4>0.1, 0.4=0.4 (half), 0.8>0.1, 0.8>0.4 -> 3.5 of 4
    assert ev.auc(score, target) == pytest.approx(0.875)
    assert ev.auc(-score, target) == pytest.approx(0.125)
    assert math.isnan(ev.auc(score, np.array([1, 1, 0, 0, 1, np.nan])))


def _old_auc(score, target):
    """evaluation.auc before roc_auc_score replaced it (a copy): Mann-Whitney on mean ranks."""
    pos, neg = target == 1, target == -1
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    keep = pos | neg
    ranks = pd.Series(score[keep]).rank().to_numpy()
    return float((ranks[pos[keep]].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _old_roc_points(score, target):
    """evaluation.roc_points before roc_curve replaced it (a copy)."""
    keep = (target == 1) | (target == -1)
    s, pos = score[keep], target[keep] == 1
    if pos.all() or not pos.any():
        return np.array([]), np.array([])
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    last = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(pos)[last], np.cumsum(~pos)[last]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


@pytest.mark.parametrize("n, decimals", [(5, 6), (40, 1), (300, 2), (3000, 6), (12, 0)])
def test_auc_and_roc_points_give_the_numbers_they_gave_before_scikit_learn(n, decimals):
    rng = np.random.default_rng(n)
    score = np.round(rng.normal(0, 1, n), decimals)  # few decimals: many ties
    target = rng.choice([-1.0, 0.0, 1.0, np.nan], n)
    assert ev.auc(score, target) == pytest.approx(_old_auc(score, target), abs=1e-12, nan_ok=True)
    for new, old in zip(ev.roc_points(score, target), _old_roc_points(score, target)):
        np.testing.assert_array_equal(new, old)
    assert np.isnan(ev.auc(score, np.ones(n)))  # one class only
    score[np.flatnonzero(np.abs(target) == 1)[0]] = np.nan
    assert np.isnan(ev.auc(score, target))  # a diverged model's NaN output


def _labels(rng, n, blank=0.2):
    t = rng.choice([-1.0, 0.0, 1.0], size=n, p=[0.5, 0.1, 0.4])
    t[rng.random(n) < blank] = np.nan
    return t


def test_evaluate_perfect_and_constant_predictors():
    rng = np.random.default_rng(0)
    n = 300
    groups = rng.integers(0, 60, n)
    target = np.stack([_labels(rng, n), _labels(rng, n), np.full(n, np.nan)], axis=1)
    names = ["Cardiomegaly", "Fracture", "Pneumonia"]
    const = {"Cardiomegaly": -0.2, "Fracture": 0.1, "Pneumonia": 0.0}

    m = ev.evaluate(np.nan_to_num(target), target, groups, names, const, n_boot=200)
    card = m["per_pathology"]["Cardiomegaly"]
    assert card["n"] == int((~np.isnan(target[:, 0])).sum())
    assert card["mse"] == 0 and card["mse_ci"] == [0, 0]
    assert card["auc"] == 1 and card["auc_ci"] == [1, 1]
    assert card["const_mse"] == pytest.approx(np.nanmean((target[:, 0] + 0.2) ** 2))
    pneu = m["per_pathology"]["Pneumonia"]
    assert pneu["n"] == 0 and math.isnan(pneu["mse"]) and math.isnan(pneu["auc"]) and math.isnan(pneu["mse_ci"][0])
    assert m["macro"] == {"mse": 0.0, "nmse": 0.0, "auc": 1.0}  # the blank pathology is left out, not averaged as NaN

    const_pred = np.tile([const[k] for k in names], (n, 1))
    m = ev.evaluate(const_pred, target, groups, names, const, n_boot=200)
    for k, name in enumerate(names[:2]):
        per = m["per_pathology"][name]
        assert per["mse"] == pytest.approx(per["const_mse"])
        assert per["auc"] == 0.5  # every score tied
    assert m["macro"]["mse"] == pytest.approx(np.mean([m["per_pathology"][k]["mse"] for k in names[:2]]))


def _noisy(rng, n_patients, rows_per_patient):
    """A noisy predictor of +-1 targets, rows_per_patient rows per patient."""
    groups = np.repeat(np.arange(n_patients), rows_per_patient)
    target = rng.choice([-1.0, 1.0], size=len(groups))
    pred = 0.5 * target + rng.normal(0, 0.5, len(groups))
    return np.clip(pred, -1, 1)[:, None], target[:, None], groups


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_more_patients():
    rng = np.random.default_rng(1)
    widths = {}
    for n_patients in (30, 1200):
        pred, target, groups = _noisy(rng, n_patients, 3)
        per = ev.evaluate(pred, target, groups, ["Fracture"], {"Fracture": 0.0}, n_boot=300)["per_pathology"]["Fracture"]
        assert per["mse_ci"][0] < per["mse"] < per["mse_ci"][1]
        assert per["auc_ci"][0] < per["auc"] < per["auc_ci"][1]
        widths[n_patients] = (per["mse_ci"][1] - per["mse_ci"][0], per["auc_ci"][1] - per["auc_ci"][0])
    # 40x the patients: about 6x narrower
    assert widths[1200][0] < widths[30][0] / 3 and widths[1200][1] < widths[30][1] / 3


def test_bootstrap_resamples_whole_patients():
    """Each patient has 20 identical rows: resampling patients is resampling 30 values, far more
    spread than resampling 600 rows as if independent (the same data with one 'patient' per row)."""
    pred, target, _ = _noisy(np.random.default_rng(2), 30, 1)
    pred, target, groups = np.repeat(pred, 20, axis=0), np.repeat(target, 20, axis=0), np.repeat(np.arange(30), 20)
    def width(g):
        per = ev.evaluate(pred, target, g, ["Fracture"], {"Fracture": 0.0}, n_boot=400)["per_pathology"]["Fracture"]
        return per["mse_ci"][1] - per["mse_ci"][0], per["auc_ci"][1] - per["auc_ci"][0]
    grouped, rows = width(groups), width(np.arange(len(groups)))
    assert grouped[0] > 2.5 * rows[0] and grouped[1] > 2.5 * rows[1]  # sqrt(20) = 4.5 expected


def test_bootstrap_auc_equals_auc_of_the_resampled_rows():
    """The weighted AUC of one resample equals auc() on the rows that resample would repeat."""
    rng = np.random.default_rng(3)
    pred, target, groups = _noisy(rng, 25, 4)
    pred = np.round(pred, 1)  # plenty of ties
    target[::7] = 0
    counts = ev._patient_counts(np.random.default_rng(4), 25, 3)
    levels = ev._auc_levels(pred[:, 0], target[:, 0], groups)
    fast = ev._weighted_auc(counts.astype(float), *levels)
    for b in range(3):
        rows = np.repeat(np.arange(len(groups)), counts[b][groups])
        assert fast[b] == pytest.approx(ev.auc(pred[rows, 0], target[rows, 0]))


def test_write_metrics_json_nulls_and_csv_table(tmp_path):
    rng = np.random.default_rng(5)
    target = np.stack([_labels(rng, 80), np.full(80, np.nan)], axis=1)
    m = ev.evaluate(np.clip(np.nan_to_num(target) * 0.5, -1, 1), target, np.arange(80) // 2,
                    ["Cardiomegaly", "Fracture"], {"Cardiomegaly": 0.0, "Fracture": 0.0}, n_boot=50)
    ev.write_metrics(m, tmp_path / "metrics.json", tmp_path / "metrics.csv")
    js = json.loads((tmp_path / "metrics.json").read_text())
    assert set(js) == {"per_pathology", "macro"} and set(js["macro"]) == {"mse", "nmse", "auc"}
    assert set(js["per_pathology"]["Cardiomegaly"]) == {"n", "mse", "mse_ci", "nmse", "const_mse", "auc", "auc_ci"}
    assert js["per_pathology"]["Fracture"]["mse"] is None and js["per_pathology"]["Fracture"]["auc_ci"] == [None, None]
    assert js["per_pathology"]["Cardiomegaly"]["mse"] == pytest.approx(m["per_pathology"]["Cardiomegaly"]["mse"])
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ev.METRIC_COLUMNS
    assert [r["pathology"] for r in rows] == ["Cardiomegaly", "Fracture", "macro"]
    assert float(rows[0]["mse_lo"]) == pytest.approx(m["per_pathology"]["Cardiomegaly"]["mse_ci"][0])
    assert rows[1]["mse"] == "" and rows[2]["n"] == rows[0]["n"]
    table = dataset.format_table(ev.metrics_rows(m), ev.METRIC_COLUMNS)
    assert table.splitlines()[-1].startswith("macro")


def _png(path, size):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == size
        im.load()


def test_plot_curves_writes_a_png_of_the_set_size_with_columns_missing(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_mse_cal": 0.5 / e, "const_mse": 0.6,
                "lr": 1e-3 / e, "val_auc": "" if e == 1 else 0.7} for e in (1, 2, 3)]  # no val_mse column
    path = ev.plot_curves(history, tmp_path / "m" / "curves.png", "Cardiomegaly")
    assert path == tmp_path / "m" / "curves.png"
    _png(path, ev.CURVES_SIZE)
    _png(ev.plot_curves([], tmp_path / "empty.png", "nothing yet"), ev.CURVES_SIZE)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["curves.png", "empty.png", "m"]  # no temp files left


def test_roc_points_and_reliability_bins_by_hand():
    fpr, tpr = ev.roc_points(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 1, -1, -1]))
    assert fpr.tolist() == [0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1]  # the tie moves both at once
    # 0.3 has no label (left out), 1.0 is the top edge (in the last bin), the empty bins are left out
    bins = ev.reliability_bins(np.array([-0.9, -0.8, 0.95, 1.0, 0.3]), np.array([-1, 0, 1, 1, np.nan]), bins=4)
    assert bins.n.tolist() == [2, 2] and bins.lo.tolist() == [-1.0, 0.5]
    assert bins.mean_pred.tolist() == pytest.approx([-0.85, 0.975]) and bins.mean_target.tolist() == [-0.5, 1.0]


def test_plot_evaluation_writes_roc_and_reliability_per_labelled_pathology(tmp_path):
    rng = np.random.default_rng(6)
    target = np.stack([_labels(rng, 120), np.full(120, np.nan)], axis=1)
    pred = np.clip(np.nan_to_num(target) * 0.6 + rng.normal(0, 0.3, target.shape), -1, 1)
    paths = ev.plot_evaluation(pred, target, ["Pleural Effusion", "Fracture"], tmp_path / "plots")
    assert [p.name for p in paths] == ["roc_pleural_effusion.png", "reliability_pleural_effusion.png"]
    for p in paths:
        _png(p, ev.PLOT_SIZE)


def test_normalised_mse_is_mse_over_the_label_variance():
    target = np.array([[1.0, np.nan], [-1.0, 1.0], [-1.0, 1.0], [0.0, 1.0]])
    pred = np.array([[0.5, 0.0], [-0.5, 0.5], [0.0, 0.9], [0.0, 0.2]])
    m = ev.evaluate(pred, target, np.arange(4), ["No Finding", "Fracture"], {}, n_boot=10)
    t = target[:, 0]
    assert m["per_pathology"]["No Finding"]["nmse"] == pytest.approx(np.mean((pred[:, 0] - t) ** 2) / t.var())
    assert np.isnan(m["per_pathology"]["Fracture"]["nmse"])  # every label the same: no variance to compare with
    assert m["macro"]["nmse"] == pytest.approx(m["per_pathology"]["No Finding"]["nmse"])
    assert ev.normalised_mse(np.full(3, 1 / 3), np.array([1.0, 1.0, -1.0])) == pytest.approx(1.0)  # the labels' mean
