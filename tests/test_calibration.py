"""Calibration maps, their fit and guard, study fusion (calibration.py), and the metrics that report them."""
import numpy as np
import pandas as pd
import pytest
from sklearn.isotonic import IsotonicRegression, isotonic_regression

import evaluation
import train
from calibration import MIN_SLOPE, apply_calibration, fit_affine, fit_calibration, fuse_studies


def test_affine_fit_recovers_known_slope_and_intercept():
    rng = np.random.default_rng(0)
    y = rng.uniform(-1, 1, 20000)
    t = 0.6 * y - 0.3 + rng.normal(0, 0.05, y.shape)
    cal = fit_calibration("affine", y, t)
    assert cal["kind"] == "affine"
    assert cal["a"] == pytest.approx(0.6, abs=0.01) and cal["b"] == pytest.approx(-0.3, abs=0.01)


def test_affine_slope_stays_positive_when_the_fit_wants_it_negative():
    y = np.linspace(-1, 1, 50)
    cal = fit_calibration("affine", y, -y)
    assert cal["a"] > 0
    out = apply_calibration(cal, y)
    assert np.all(np.diff(out) > 0)


def test_fit_affine_least_squares_shrinkage_and_one_minimum_slope():
    rng = np.random.default_rng(10)
    x = rng.uniform(-1, 1, 500)
    t = 0.5 * x + 0.2 + rng.normal(0, 0.1, 500)
    a, b = fit_affine(x, t)
    assert (a, b) == pytest.approx(tuple(np.polyfit(x, t, 1)), rel=1e-9)
    a5, b5 = fit_affine(x, t, shrink_rows=5)
    assert a5 == pytest.approx(a * 500 / 505) and a5 * x.mean() + b5 == pytest.approx(t.mean())
    assert fit_affine(x, -t) == (MIN_SLOPE, pytest.approx(-t.mean() - MIN_SLOPE * x.mean()))  # wants < 0
    assert fit_affine(np.full(10, 0.3), t[:10]) == (MIN_SLOPE, pytest.approx(t[:10].mean() - MIN_SLOPE * 0.3))
    assert fit_affine(np.array([]), np.array([])) == (1.0, 0.0)
    # the per-model map and the guard's constant use the same fit and the same floor
    cal = fit_calibration("affine", x, -t)
    assert (cal["a"], cal["b"]) == fit_affine(x, -t, shrink_rows=5)


def pav(t, w=None) -> np.ndarray:
    """calibration.pav before scikit-learn's isotonic_regression replaced it (a copy): the
    non-decreasing sequence closest to t in (weighted) least squares."""
    t = np.asarray(t, dtype=np.float64)
    w = np.ones_like(t) if w is None else np.asarray(w, dtype=np.float64)
    values, weights, counts = [], [], []
    for ti, wi in zip(t, w):
        values.append(ti), weights.append(wi), counts.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            v, wt, c = values.pop(), weights.pop(), counts.pop()
            values[-1] = (values[-1] * weights[-1] + v * wt) / (weights[-1] + wt)
            weights[-1] += wt
            counts[-1] += c
    return np.repeat(values, counts)


def test_pav_matches_known_answers_and_scikit_learns_isotonic_regression():
    assert np.allclose(pav([1, 3, 2, 4]), [1, 2.5, 2.5, 4])
    assert np.allclose(pav([3, 2, 1]), [2, 2, 2])
    assert np.allclose(pav([-1, -1, 1, 0, 1]), [-1, -1, 0.5, 0.5, 1])
    assert np.allclose(pav([1, 2, 3]), [1, 2, 3])
    rng = np.random.default_rng(15)
    for n in (2, 7, 50, 1000):
        t, w = rng.choice([-1.0, 0.0, 1.0], n), rng.uniform(0.1, 3, n)
        np.testing.assert_allclose(isotonic_regression(t), pav(t), rtol=0, atol=1e-14)
        np.testing.assert_allclose(isotonic_regression(t, sample_weight=w), pav(t, w), rtol=0, atol=1e-14)


def test_isotonic_map_pools_tied_outputs_as_scikit_learns_isotonic_regression():
    """Tied outputs are one point, their targets' mean weighted by their count (the hand-written PAV
    on the pooled means, and scikit-learn's IsotonicRegression given the data as is): one step
    value per distinct output, never a step inside a tie."""
    rng = np.random.default_rng(16)
    y = np.round(rng.normal(0, 0.4, 600), 2)  # many tied outputs
    t = np.where(rng.random(600) < 0.2 + 0.4 * (y > 0), 1.0, -1.0)
    cal = fit_calibration("isotonic", y, t)
    xs, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    fitted = pav(np.bincount(inv, t) / counts, counts)
    edges = np.flatnonzero(np.diff(fitted))
    assert cal["right"] == pytest.approx(xs[edges].tolist(), abs=0)
    assert cal["values"] == pytest.approx(np.append(fitted[edges], fitted[-1]).tolist(), abs=1e-14)
    step = np.asarray(cal["values"])[np.searchsorted(cal["right"], xs, side="left")]
    np.testing.assert_allclose(step, IsotonicRegression().fit(y, t).predict(xs), rtol=0, atol=1e-12)


def saturated_head(rng, n):
    """Outputs of a saturated tanh head: most rows exactly -1 or 1 (ties), the rest spread between;
    targets that follow them loosely; patients of 1-3 rows."""
    y = np.where(rng.random(n) < 0.7, rng.choice([-1.0, 1.0], n), np.round(rng.uniform(-1, 1, n), 1))
    t = np.where(rng.random(n) < 0.3 + 0.4 * (y > 0), 1.0, np.where(rng.random(n) < 0.2, 0.0, -1.0))
    return y, t, rng.integers(0, n // 2, n)


@pytest.mark.parametrize("kind", ["affine", "isotonic"])
def test_the_map_is_the_same_for_any_row_order(kind):
    """Shuffling the rows (many ties, as a saturated head gives) changes neither the map, its
    guard's choice and score, nor any prediction, to the last bit."""
    rng = np.random.default_rng(17)
    y, t, groups = saturated_head(rng, 400)
    grid = np.linspace(-1.2, 1.2, 241)
    for prior in (None, -0.3):
        cal = fit_calibration(kind, y, t, prior=prior, groups=groups)
        for seed in range(5):
            order = np.random.default_rng(seed).permutation(len(y))
            shuffled = fit_calibration(kind, y[order], t[order], prior=prior, groups=groups[order])
            assert shuffled == cal
            np.testing.assert_array_equal(apply_calibration(shuffled, grid), apply_calibration(cal, grid))
    if kind == "isotonic":  # the fit really has steps, at the tied outputs among others
        assert len(cal["values"]) > 2 and cal["chosen"] == "map"


def test_isotonic_output_is_monotone_and_fits_the_step_on_sorted_inputs():
    rng = np.random.default_rng(1)
    y = np.sort(rng.uniform(-1, 1, 400))
    t = np.where(rng.random(400) < (y + 1) / 2, 1.0, -1.0)
    cal = fit_calibration("isotonic", y, t)
    out = apply_calibration(cal, y)
    inside = (out[:-1] > -1) & (out[1:] < 1)  # clipping to [-1, 1] is the only source of ties
    assert np.all(np.diff(out)[inside] > 0) and inside.sum() > 300
    w = cal["w"]
    affine = cal["a"] * y + cal["b"]
    assert np.allclose(out, np.clip(w * pav(t) + (1 - w) * affine, -1, 1))
    grid = np.linspace(-2, 2, 1000)
    assert np.all(np.diff(apply_calibration(cal, grid)) >= 0)


@pytest.mark.parametrize("kind", ["affine", "isotonic"])
def test_calibration_never_changes_the_ranking(kind):
    rng = np.random.default_rng(2)
    y = rng.normal(0, 0.5, 300)
    t = np.clip(np.round(y + rng.normal(0, 0.7, 300)), -1, 1)
    out = apply_calibration(fit_calibration(kind, y, t), y)
    assert np.array_equal(np.argsort(y, kind="stable"), np.argsort(out, kind="stable"))
    assert evaluation.auc(out, t) == pytest.approx(evaluation.auc(y, t))


def balanced_model_outputs(rng, t):
    """What a model trained on balanced batches outputs: unsure, so centred near 0 whatever the prior."""
    return np.clip(0.35 * t + rng.normal(0, 0.35, t.shape), -1, 1)


def test_rare_positives_sampler_alone_loses_to_the_constant_and_calibration_wins():
    rng = np.random.default_rng(3)
    t_train = np.where(rng.random(5000) < 0.03, 1.0, -1.0)
    t_val = np.where(rng.random(3000) < 0.03, 1.0, -1.0)
    t_test = np.where(rng.random(3000) < 0.03, 1.0, -1.0)  # held out: never used to fit
    y_val, y_test = balanced_model_outputs(rng, t_val), balanced_model_outputs(rng, t_test)
    for kind in ("affine", "isotonic"):
        cal = fit_calibration(kind, y_val, t_val)
        for y, t in ((y_val, t_val), (y_test, t_test)):
            m = train.pathology_metrics(y, t, float(t_train.mean()), cal)
            assert m["val_mse"] > m["const_mse"]          # raw outputs lose to the constant
            assert m["val_mse_cal"] <= m["const_mse"]     # calibrated ones do not
            assert m["val_auc"] > 0.8


@pytest.mark.parametrize("kind", ["affine", "isotonic"])
def test_calibrated_mse_is_at_most_the_constant_even_on_tiny_noisy_sets(kind):
    rng = np.random.default_rng(4)
    for n in (2, 5, 12, 40):
        y = rng.uniform(-1, 1, n)
        t = rng.choice([-1.0, 0.0, 1.0], n)
        m = train.pathology_metrics(y, t, float(t.mean()), fit_calibration(kind, y, t))
        assert m["val_mse_cal"] <= m["const_mse"] + 1e-5  # MIN_SLOPE costs at most ~1e-6


def test_none_and_too_few_rows_mean_no_map():
    assert fit_calibration("none", np.zeros(10), np.ones(10)) is None
    assert fit_calibration("affine", np.zeros(1), np.ones(1)) is None
    assert np.array_equal(apply_calibration(None, np.array([-3.0, 0.2, 3.0])), [-1.0, 0.2, 1.0])


def test_auc_counts_ties_as_half_and_ignores_uncertain_and_blank():
    t = np.array([1, -1, 1, -1, 0, np.nan])
    assert evaluation.auc(np.array([0.9, 0.1, 0.8, 0.2, 5.0, 5.0]), t) == 1.0
    assert evaluation.auc(np.array([0.5, 0.5, 0.5, 0.5, 0.0, 0.0]), t) == 0.5
    assert np.isnan(evaluation.auc(np.array([0.1, 0.2]), np.array([1.0, 1.0])))


@pytest.mark.parametrize("kind", ["affine", "isotonic"])
def test_a_model_without_signal_falls_back_to_the_constant(kind):
    """Outputs unrelated to the labels, 5% positives, 80 validation rows: the cross-validated guard
    falls back to the constant (the training mean) in most draws; on held-out rows the guarded map
    then costs at most a little over the constant on average, and less than the unguarded fit."""
    prior, fallbacks, guarded, unguarded = -0.9, 0, [], []
    for seed in range(20):
        r = np.random.default_rng(seed)
        t_val, t_test = (np.where(r.random(80) < 0.05, 1.0, -1.0) for _ in range(2))
        y_val, y_test = r.normal(0, 0.4, 80), r.normal(0, 0.4, 80)
        cal = fit_calibration(kind, y_val, t_val, prior=prior)
        fallbacks += cal["chosen"] == "constant"
        m_val = train.pathology_metrics(y_val, t_val, prior, cal)
        assert m_val["val_mse_cal"] <= m_val["const_mse"] + 1e-5  # in-sample: always
        m = train.pathology_metrics(y_test, t_test, prior, cal)
        guarded.append(m["val_mse_cal"] - m["const_mse"])
        m = train.pathology_metrics(y_test, t_test, prior, fit_calibration(kind, y_val, t_val))
        unguarded.append(m["val_mse_cal"] - m["const_mse"])
    assert fallbacks >= 12
    assert np.mean(guarded) <= 0.005 and np.mean(guarded) < np.mean(unguarded)


@pytest.mark.parametrize("kind", ["affine", "isotonic"])
def test_a_model_with_signal_keeps_its_map(kind):
    rng = np.random.default_rng(5)
    y = rng.normal(0, 0.3, 200)
    t = np.where(y + rng.normal(0, 0.2, 200) > 0.3, 1.0, -1.0)
    cal = fit_calibration(kind, y, t, prior=float(t.mean()))
    assert cal["chosen"] == "map" and cal["kind"] == kind


def test_already_calibrated_outputs_are_left_alone():
    rng = np.random.default_rng(6)
    t = rng.choice([-1.0, 0.0, 1.0], 60)
    cal = fit_calibration("affine", t, t, prior=0.0)  # perfect predictions: the shrunk map would cost
    assert cal["chosen"] == "identity" and np.array_equal(apply_calibration(cal, t), t)


def _look_alike_patients(rng, n_patients: int, per: int):
    """per images of each patient with near-identical outputs (one draw, +-1e-3) and one shared label
    (30% positive) that the outputs say nothing about. Returns y, t, patient ids (n_patients * per,)."""
    y = np.repeat(rng.normal(0, 0.4, n_patients), per) + rng.normal(0, 1e-3, n_patients * per)
    t = np.repeat(np.where(rng.random(n_patients) < 0.3, 1.0, -1.0), per)
    return y, t, np.repeat(np.arange(n_patients), per)


def test_guard_folds_by_patient_so_look_alike_images_do_not_flatter_the_map():
    """Row folds put a patient's look-alike images on both sides of every split: the isotonic map
    recalls their shared label and cross-validates better than the constant, although on other
    patients it is worse. Folded by patient, the guard sees that and keeps the constant."""
    prior = -0.4
    for seed in range(4):
        rng = np.random.default_rng(seed)
        y, t, patients = _look_alike_patients(rng, 100, 8)
        y_new, t_new, _ = _look_alike_patients(rng, 2000, 1)  # other patients, never fitted on
        on_new = np.mean((apply_calibration(fit_calibration("isotonic", y, t), y_new) - t_new) ** 2)
        assert on_new > np.mean((prior - t_new) ** 2)  # the map really loses to the constant
        by_row = fit_calibration("isotonic", y, t, prior=prior)  # each row its own patient
        assert by_row["chosen"] == "map" and by_row["cv_mse"] < np.mean((prior - t) ** 2)  # fooled
        by_patient = fit_calibration("isotonic", y, t, prior=prior, groups=patients)
        assert by_patient["chosen"] == "constant"
        assert by_patient["cv_mse"] == pytest.approx(np.mean((prior - t) ** 2))


def test_guard_with_one_patient_or_mismatched_groups():
    y, t = np.linspace(-1, 1, 10), np.where(np.arange(10) > 4, 1.0, -1.0)
    cal = fit_calibration("affine", y, t, prior=0.0, groups=np.zeros(10))  # one patient: nothing to cross-validate
    assert cal["chosen"] == "constant" and np.isnan(cal["cv_mse"])
    with pytest.raises(ValueError, match="groups"):
        fit_calibration("affine", y, t, groups=np.zeros(9))


def _old_submission_fusion(values, studies):
    """make_submission.fuse_studies before calibration.fuse_studies replaced it (a copy)."""
    return pd.DataFrame(values).groupby(studies).transform("mean").to_numpy()


def _old_blend_fusion(x, s, frontal, w_frontal):
    """calibration._fuse before fuse_studies replaced it (a copy); s (N,) int study codes."""
    ok = ~np.isnan(x)
    xz, f, l = np.where(ok, x, 0.0), ok & frontal, ok & ~frontal
    size = int(s.max()) + 1
    nf, nl = np.bincount(s, f, size), np.bincount(s, l, size)
    with np.errstate(invalid="ignore", divide="ignore"):
        mf, ml = np.bincount(s, xz * f, size) / nf, np.bincount(s, xz * l, size) / nl
    fused = np.where((nf > 0) & (nl > 0), w_frontal * mf + (1 - w_frontal) * ml, np.where(nf > 0, mf, ml))
    return fused[s]


def test_fuse_studies_plain_mean_by_hand_and_as_make_submission_did():
    x = np.array([[0.2, np.nan], [0.4, 0.5], [np.nan, np.nan], [-1.0, 0.3], [0.9, np.nan]])
    studies = np.array(["p1/s1", "p1/s1", "p2/s1", "p3/s1", "p3/s1"])
    want = [[0.3, 0.5], [0.3, 0.5], [np.nan, np.nan], [-0.05, 0.3], [-0.05, 0.3]]  # NaN ignored, filled
    np.testing.assert_allclose(fuse_studies(x, studies), want)
    np.testing.assert_allclose(fuse_studies(x[:, 1], studies), np.array(want)[:, 1])  # (N,) too
    rng = np.random.default_rng(13)
    x = np.where(rng.random((300, 4)) < 0.2, np.nan, rng.uniform(-1, 1, (300, 4)))
    studies = rng.choice([f"pid{i}/study1" for i in range(120)], 300)
    np.testing.assert_allclose(fuse_studies(x, studies), _old_submission_fusion(x, studies), rtol=0, atol=1e-15)


def test_fuse_studies_frontal_weight_by_hand_and_as_the_blend_did():
    x = np.array([0.2, 0.6, 0.0, 0.5, np.nan, -0.4, np.nan])
    studies = ["a", "a", "a", "b", "b", "c", "d"]
    frontal = np.array([True, True, False, True, False, False, True])
    # a: 0.25 * mean(0.2, 0.6) + 0.75 * 0.0; b: frontal only (its lateral is NaN); c: lateral only; d: none
    want = [0.1, 0.1, 0.1, 0.5, 0.5, -0.4, np.nan]
    np.testing.assert_allclose(fuse_studies(x, studies, frontal, 0.25), want)
    with pytest.raises(ValueError, match="frontal"):
        fuse_studies(x, studies, w_frontal=0.25)
    rng = np.random.default_rng(14)
    x = np.where(rng.random(400) < 0.2, np.nan, rng.uniform(-1, 1, 400))
    s, frontal = rng.integers(0, 150, 400), rng.random(400) < 0.6
    for w in (0.0, 0.3, 0.5, 1.0):
        np.testing.assert_array_equal(fuse_studies(x, s, frontal, w), _old_blend_fusion(x, s, frontal, w))
