"""The learned blend: evaluation.fit_blend / apply_blend (weights, fallback, study fusion, out-of-fold
numbers) and experiments/blend.py on fake training runs (val_predictions.csv + summary.json)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dataset
import calibration as ev
from experiments import blend

ROOT = Path(__file__).resolve().parents[1]


def _studies(rng, n_patients, blank=0.1):
    """One study per patient, a frontal and a lateral image sharing its label (+-1, some blank).
    Returns patients, studies, views (N = 2 * n_patients) and the targets (N,)."""
    patients = np.repeat(np.arange(n_patients), 2)
    label = rng.choice([-1.0, 1.0], n_patients)
    label[rng.random(n_patients) < blank] = np.nan
    return patients, np.char.add("s", patients.astype(str)), np.tile(["frontal", "lateral"], n_patients), label[patients]


def _member(rng, t, signal, noise):
    return np.clip(signal * np.nan_to_num(t) + rng.normal(0, noise, len(t)), -1, 1)


def test_weights_go_to_the_informative_member_and_beat_uniform_out_of_fold():
    rng = np.random.default_rng(0)
    patients, studies, views, t = _studies(rng, 150)
    P = np.stack([_member(rng, t, 0.6, 0.4), _member(rng, t, 0.0, 0.6), _member(rng, t, -0.3, 0.4)], axis=1)
    fit = ev.fit_blend(P, t, patients, studies, views)
    w = np.array(fit["weights"])
    assert (w >= 0).all() and w.sum() == pytest.approx(1)
    assert w[0] > 0.9 and w[2] == 0  # the anti-correlated member would get a negative weight unconstrained
    assert fit["fallback"] is False and fit["reason"] is None and fit["a"] > 0
    oof = fit["oof"]
    assert oof["n"] == int((~np.isnan(t)).sum())
    assert oof["blend"] <= oof["uniform"] and oof["best_single"] < oof["uniform"]
    blended = ev.apply_blend(fit, P, studies, views)
    assert blended.shape == t.shape and np.abs(blended).max() <= 1


def test_simplex_weights_exact_cases():
    rng = np.random.default_rng(1)
    t = rng.choice([-1.0, 1.0], 200)
    P = np.stack([t, rng.normal(0, 1, 200), -t], axis=1)
    assert ev.simplex_weights(P, t, 0.0) == pytest.approx([1, 0, 0], abs=1e-6)
    assert ev.simplex_weights(P, t, 1e6) == pytest.approx([1 / 3] * 3, abs=1e-3)  # all shrinkage: uniform


def _old_simplex_weights(P, t, lam=0.0, iters=2000):
    """calibration.simplex_weights before scipy's SLSQP replaced it (a copy): accelerated projected
    gradient onto the simplex."""
    n, M = P.shape
    uniform = np.full(M, 1.0 / M)
    if n < 2 or M == 1:
        return uniform
    Pc, tc = P - P.mean(axis=0), t - t.mean()
    H = Pc.T @ Pc / n + lam * np.eye(M)
    g = Pc.T @ tc / n + lam * uniform
    L = 2 * float(np.linalg.eigvalsh(H).max())
    if L <= 1e-12:
        return uniform

    def project(v):
        u = np.sort(v)[::-1]
        css = np.cumsum(u) - 1
        rho = np.flatnonzero(u - css / np.arange(1, len(v) + 1) > 0)[-1]
        return np.maximum(v - css[rho] / (rho + 1), 0.0)
    w, y, step = uniform, uniform, 1.0
    for _ in range(iters):
        w_next = project(y - 2 * (H @ y - g) / L)
        if np.abs(w_next - w).max() < 1e-10:
            return w_next
        step_next = (1 + np.sqrt(1 + 4 * step * step)) / 2
        y = w_next + (step - 1) / step_next * (w_next - w)
        w, step = w_next, step_next
    return w


@pytest.mark.parametrize("seed", range(6))
def test_simplex_weights_are_the_weights_they_were_before_scipy(seed):
    rng = np.random.default_rng(seed)
    n, M = int(rng.integers(30, 1000)), int(rng.integers(2, 7))
    t = rng.choice([-1.0, 0.0, 1.0], n)
    P = np.clip(rng.normal(0, 0.5, (n, M)) + rng.uniform(-0.5, 1, M) * t[:, None], -1, 1)
    for lam in (0.0, 0.001, 0.1, 1.0):
        w = ev.simplex_weights(P, t, lam)
        assert (w >= 0).all() and w.sum() == pytest.approx(1, abs=1e-12)
        np.testing.assert_allclose(w, _old_simplex_weights(P, t, lam), rtol=0, atol=1e-6)
    corner = ev.simplex_weights(np.stack([t, -t], axis=1), t)  # exactly one member, not 1 - 1e-16
    assert corner.tolist() == [1.0, 0.0]
    assert ev.simplex_weights(np.ones((10, 3)), t[:10]).tolist() == [1 / 3] * 3  # no member varies


def test_the_blends_slope_has_the_calibrations_floor():
    rng = np.random.default_rng(12)
    patients, studies, views, t = _studies(rng, 150, blank=0)
    fit = ev.fit_blend(_member(rng, t, -0.5, 0.3)[:, None], t, patients, studies, views)  # anti-correlated
    assert fit["a"] == ev.MIN_SLOPE
    assert ev.apply_blend(fit, _member(rng, t, -0.5, 0.3)[:, None], studies, views) == pytest.approx(fit["b"], abs=1e-5)


def test_fallback_to_uniform_without_enough_labelled_rows():
    rng = np.random.default_rng(2)
    patients, studies, views, t = _studies(rng, 10, blank=0)  # 20 rows
    P = np.stack([_member(rng, t, 0.6, 0.3), _member(rng, t, 0.2, 0.3)], axis=1)
    fit = ev.fit_blend(P, t, patients, studies, views, min_rows=50)
    assert fit["fallback"] is True and "20 labelled" in fit["reason"]
    assert fit["weights"] == [0.5, 0.5] and fit["w_frontal"] is None and fit["lambda"] is None
    a, b = np.polyfit(P.mean(1), t, 1)  # the uniform mean, calibrated on every row
    assert (fit["a"], fit["b"]) == pytest.approx((a, b))
    assert ev.apply_blend(fit, P, studies, views) == pytest.approx(np.clip(a * P.mean(1) + b, -1, 1))
    assert all(np.isnan(fit["oof"][k]) for k in ("blend", "uniform", "best_single"))  # nothing to measure on
    fit = ev.fit_blend(P, t, patients, studies, views, k=6, min_rows=10)  # 10 patients < 2 per fold
    assert fit["fallback"] is True and "10 labelled patients" in fit["reason"]


def test_study_fusion_trusts_the_view_that_carries_the_signal():
    rng = np.random.default_rng(3)
    patients, studies, views, t = _studies(rng, 150)
    frontal = views == "frontal"
    good_frontal = np.where(frontal, _member(rng, t, 0.7, 0.3), _member(rng, t, 0.0, 0.6))
    fit = ev.fit_blend(good_frontal[:, None], t, patients, studies, views)
    assert fit["w_frontal"] >= 0.8
    good_lateral = np.where(frontal, _member(rng, t, 0.0, 0.6), _member(rng, t, 0.7, 0.3))
    assert ev.fit_blend(good_lateral[:, None], t, patients, studies, views)["w_frontal"] <= 0.2
    # every image of a study gets the same value, and it beats keeping each image's own
    fused = ev.apply_blend(fit, good_frontal[:, None], studies, views)
    assert (fused[0::2] == fused[1::2]).all()
    assert fit["oof"]["blend"] < fit["oof"]["uniform"]


def test_apply_blend_by_hand_with_a_member_missing_on_some_images():
    params = {"weights": [0.75, 0.25], "lambda": 0.0, "a": 2.0, "b": 0.1, "w_frontal": 0.5}
    preds = np.array([[0.2, 0.4],       # s1 frontal: 0.75 * 0.2 + 0.25 * 0.4 = 0.25
                      [0.0, np.nan],    # s1 lateral: only member 0 -> 0.0
                      [0.6, 0.2]])      # s2 frontal alone: 0.5
    studies, views = ["s1", "s1", "s2"], ["frontal", "lateral", "Frontal"]
    # s1: 0.5 * 0.25 + 0.5 * 0.0 = 0.125 -> 2 * 0.125 + 0.1; s2: 2 * 0.5 + 0.1 = 1.1, clipped
    assert ev.apply_blend(params, preds, studies, views) == pytest.approx([0.35, 0.35, 1.0])
    no_fusion = ev.apply_blend({**params, "w_frontal": None}, preds, studies, views)
    assert no_fusion == pytest.approx([0.6, 0.1, 1.0])
    with pytest.raises(ValueError, match="views must be"):
        ev.apply_blend(params, preds, studies, ["frontal", "lateral", "AP"])


def _old_blend_folds(groups, labelled, k, seed):
    """calibration._patient_folds as it was before dataset.patient_folds replaced it (a copy)."""
    patients, inv = np.unique(groups, return_inverse=True)
    has = np.bincount(inv, labelled, minlength=len(patients)) > 0
    order = np.random.default_rng(seed).permutation(len(patients))
    order = order[np.argsort(~has[order], kind="stable")]
    fold = np.empty(len(patients), dtype=np.int64)
    fold[order] = np.arange(len(patients)) % k
    return fold[inv]


def test_patient_folds_keep_whole_patients_and_the_blends_assignment():
    rng = np.random.default_rng(11)
    groups = rng.choice([f"pid{i}" for i in range(23)], 200)
    labelled = np.isin(groups, [f"pid{i}" for i in range(7)]) & (rng.random(200) < 0.7)
    for k, seed in ((5, 0), (3, 1), (4, 7)):
        fold = dataset.patient_folds(groups, k, seed, labelled=labelled)
        assert fold.dtype == np.int64 and set(fold) <= set(range(k))
        assert all(len(set(fold[groups == g])) == 1 for g in set(groups))  # whole patients
        np.testing.assert_array_equal(fold, _old_blend_folds(groups, labelled, k, seed))  # blend numbers unchanged
        per_fold = np.bincount([fold[groups == g][0] for g in set(groups[labelled])], minlength=k)
        assert per_fold.max() - per_fold.min() <= 1  # labelled patients dealt out first
    # labelled=None: every row labelled; hard-coded to pin the assignment; row order does not matter
    groups = np.array(["c", "a", "b", "a", "d", "e", "c"])
    np.testing.assert_array_equal(dataset.patient_folds(groups, 2, 0), [0, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(dataset.patient_folds(groups[::-1], 2, 0), [0, 1, 0, 1, 0, 1, 0][::-1])


# ---------------------------------------------------------------------------------------------
# experiments/blend.py

def _images(rng, n_patients=60):
    """The validation images two runs share: one frontal + one lateral per patient's study, with
    study-level Cardiomegaly and Fracture labels (some blank)."""
    rows = []
    for p in range(n_patients):
        labels = {n: rng.choice([-1.0, 0.0, 1.0, np.nan], p=[0.45, 0.05, 0.4, 0.1]) for n in ("Cardiomegaly", "Fracture")}
        for v in ("frontal", "lateral"):
            rows.append({"path": f"train/pid{p}/study1/view{1 if v == 'frontal' else 2}_{v}.jpg", "patient": f"pid{p}",
                         "study": f"pid{p}/study1", "view": v, **labels})
    return pd.DataFrame(rows)


def _model(root, folder, images, pathologies, view, noise, sha, rng):
    """A model folder as train.py leaves it: summary.json and val_predictions.csv (long format)."""
    out = root / folder
    out.mkdir(parents=True)
    own = images if view == "all" else images[images.view == view]
    rows = []
    for name in pathologies:
        pred = np.clip(0.5 * own[name].fillna(0).to_numpy() + rng.normal(0, noise, len(own)), -1, 1)
        rows.append(own[["path", "patient", "study", "view"]].assign(pathology=name, target=own[name], raw=pred,
                                                                     calibrated=pred * 0.9))
    pd.concat(rows).to_csv(out / "val_predictions.csv", index=False)
    summary = {"pathology": pathologies[0] if len(pathologies) == 1 else "multi_head", "pathologies": pathologies,
               "view": view, "split": {"seed": 0, "val_frac": 0.1, "val_patients_sha1": sha}}
    (out / "summary.json").write_text(json.dumps(summary))


def _runs(tmp_path, sha_b="abc123"):
    rng = np.random.default_rng(4)
    images = _images(rng)
    _model(tmp_path / "runs", "run_a/cardiomegaly", images, ["Cardiomegaly"], "all", 0.3, "abc123", rng)
    _model(tmp_path / "runs", "run_a/fracture", images, ["Fracture"], "all", 0.5, "abc123", rng)
    _model(tmp_path / "runs", "run_b/multi_head", images, ["Cardiomegaly", "Fracture"], "all", 0.6, sha_b, rng)
    _model(tmp_path / "runs", "run_b/cardiomegaly_frontal", images, ["Cardiomegaly"], "frontal", 0.2, sha_b, rng)
    return images, tmp_path / "runs" / "run_a", tmp_path / "runs" / "run_b"


def test_blend_script_end_to_end(tmp_path):
    images, run_a, run_b = _runs(tmp_path)
    out = tmp_path / "out" / "blend.json"
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "blend.py"), "--runs", str(run_a), str(run_b),
                        "--out", str(out), "--folds", "4", "--seed", "1", "--no-progress"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    b = json.loads(out.read_text())
    assert (b["version"], b["folds"], b["seed"]) == (2, 4, 1)
    assert set(b["fingerprints"]) == {"run_a/cardiomegaly", "run_a/fracture", "run_b/multi_head",
                                      "run_b/cardiomegaly_frontal"}
    assert list(b["pathologies"]) == ["Cardiomegaly", "Fracture"]  # dataset.PATHOLOGIES order
    card, frac = b["pathologies"]["Cardiomegaly"], b["pathologies"]["Fracture"]
    assert card["members"] == ["run_a/cardiomegaly", "run_b/cardiomegaly_frontal", "run_b/multi_head"]
    assert frac["members"] == ["run_a/fracture", "run_b/multi_head"]
    for e in (card, frac):
        assert set(e) == {"members", "weights", "lambda", "a", "b", "w_frontal", "fallback", "reason", "oof"}
        assert set(e["oof"]) == {"best_single", "uniform", "blend", "n"}
        assert len(e["weights"]) == len(e["members"]) and sum(e["weights"]) == pytest.approx(1)
        assert e["fallback"] is False and e["oof"]["blend"] is not None
    # every image is labelled for the images the pathology has; the frontal-only member adds none
    assert card["oof"]["n"] == int(images["Cardiomegaly"].notna().sum())
    assert card["weights"][1] > card["weights"][2]  # the frontal-only model is the least noisy
    lines = r.stdout.splitlines()
    assert any(line.startswith("macro") for line in lines) and any(line.startswith("Fracture: run_a/fracture") for line in lines)


def test_blend_script_rejects_runs_with_different_splits(tmp_path, capsys):
    _, run_a, run_b = _runs(tmp_path, sha_b="def456")
    out = tmp_path / "blend.json"
    assert dataset.run_cli(blend.main, ["--runs", str(run_a), str(run_b), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: the runs do not share one validation split")
    assert "run_a (seed 0" in err and "run_b (seed 0" in err
    assert not out.exists()



def test_blend_script_fits_on_raw_outputs_not_on_maps_fitted_to_these_rows(tmp_path):
    """val_predictions.csv's `calibrated` column comes from a map fitted on those very validation
    rows. Here it is made to leak the label outright while `raw` is noise: an honest blend, fitted
    on `raw` with its calibration refitted out of fold, must not score near 0."""
    rng = np.random.default_rng(5)
    images = _images(rng)
    _model(tmp_path / "runs", "run_a/cardiomegaly", images, ["Cardiomegaly"], "all", 0.3, "abc123", rng)
    table = tmp_path / "runs" / "run_a" / "cardiomegaly" / "val_predictions.csv"
    df = pd.read_csv(table)
    df["raw"], df["calibrated"] = rng.uniform(-1, 1, len(df)), df["target"].fillna(0.0)
    df.to_csv(table, index=False)
    made = blend.main(["--runs", str(tmp_path / "runs" / "run_a"), "--out", str(tmp_path / "b.json"), "--no-progress"])
    oof = made["pathologies"]["Cardiomegaly"]["oof"]
    assert oof["best_single"] > 0.3 and oof["uniform"] > 0.3 and oof["blend"] > 0.3


def test_every_baseline_is_calibrated_out_of_fold_too():
    """Pure-noise members: an affine map fitted on all rows looks better than chance on them; the
    out-of-fold numbers of the single member and of the uniform mean must not."""
    rng = np.random.default_rng(7)
    patients, studies, views, t = _studies(rng, 150, blank=0)
    P = rng.uniform(-1, 1, (len(t), 2))
    fit = ev.fit_blend(P, t, patients, studies, views)
    for col, key in ((P[:, 0], "best_single"), (P.mean(1), "uniform")):
        a, b = np.polyfit(col, t, 1)
        in_sample = np.mean((np.clip(a * col + b, -1, 1) - t) ** 2)
        assert fit["oof"][key] > in_sample, key
