"""Calibration: maps from raw model outputs to the values that minimise MSE, per model and blended.

- fit_calibration, apply_calibration: one model's monotone map (affine, or isotonic blended with
  affine), with a cross-validated guard (whole patients per fold) that may choose the raw output or
  the constant training mean instead; stored in its checkpoint. calibrate_out_of_sample: each
  validation row through that fit made without its patient (val_predictions.csv's calibrated_oos).
- fit_blend, apply_blend: per pathology, non-negative member weights shrunk toward uniform, a
  frontal/lateral study fusion and an affine calibration, chosen by patient-grouped K-fold CV, with
  the out-of-fold MSE of the best single member, the uniform average and the blend.
- What both use: fit_affine (one least-squares fit, one MIN_SLOPE), fuse_studies (also
  make_submission.py --study-fusion), and dataset.patient_folds.

numpy, with scikit-learn's isotonic regression (the step fit) and scipy's SLSQP (the blend's
weights) rather than hand-written solvers. Scale throughout: predictions in [-1, 1]; targets 1
positive, 0 uncertain, -1 negative, NaN blank.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from sklearn.isotonic import isotonic_regression

from dataset import patient_folds

CALIBRATIONS = ("affine", "isotonic", "none")

SHRINK_ROWS = 5        # affine: slope shrunk by n / (n + 5), toward the constant (validation mean)
ISOTONIC_ROWS = 200    # isotonic: weight n / (n + 200) on the step fit, the rest on the affine map
# Every affine slope (per-model maps, the guard's constant choice, the blend) is kept at least this:
# strictly increasing, so the ranking (and AUC) never changes. Where the fit wants a slope <= 0 this
# costs at most about 2 * MIN_SLOPE of MSE over a flat map, on the [-1, 1] scale. Distinct outputs
# stay distinct in float64 and in the submission CSV, which is written with every digit.
MIN_SLOPE = 1e-6
CV_FOLDS = 5           # the over-fitting guard's cross-validation

LAMBDAS = (1.0, 0.1, 0.01, 0.001, 0.0)  # shrinkage toward uniform weights; most first, so ties keep more
# Frontal weights tried for study fusion, preferred first on ties (0.5 when no study has both views);
# None = no fusion, each image keeps its own value.
FUSION_GRID = (0.5, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2, 0.9, 0.1, 1.0, 0.0, None)


def fit_affine(x: np.ndarray, t: np.ndarray, shrink_rows: int = 0) -> tuple[float, float]:
    """(a, b) of t ~ a * x + b by least squares; x, t (n,) finite floats. The slope is shrunk by
    n / (n + shrink_rows) toward 0, b recentred so the mean of a * x + b stays the mean of t, then
    kept >= MIN_SLOPE; when x does not vary there is no slope to learn: a = MIN_SLOPE, the mean of t.
    (1.0, 0.0), the identity, when n == 0. Used by per-model calibration and by the blend."""
    n = len(x)
    if n == 0:
        return 1.0, 0.0
    vx = x.var()
    a = ((x - x.mean()) * (t - t.mean())).mean() / vx if vx > 1e-12 else 0.0
    if shrink_rows:
        a = a * n / (n + shrink_rows)
    a = float(max(a, MIN_SLOPE))
    return a, float(t.mean() - a * x.mean())


def _fit_map(kind: str, y: np.ndarray, t: np.ndarray) -> dict:
    """The map itself (see fit_calibration), fitted on all of (y, t)."""
    n = len(y)
    a, b = fit_affine(y, t, SHRINK_ROWS)
    cal = {"kind": "affine", "a": a, "b": b, "n": n}
    if kind == "isotonic":
        # Tied outputs (a saturated tanh head gives many) are one point, the mean of their targets
        # weighted by their count, as scikit-learn's IsotonicRegression pools them: one value per
        # distinct output, the same for any row order. Unpooled, a step could fall inside a tie.
        xs, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
        means = np.bincount(inv.reshape(-1), t, len(xs)) / counts
        fitted = isotonic_regression(means, sample_weight=counts, increasing=True)  # pool-adjacent-violators
        edges = np.flatnonzero(np.diff(fitted))
        cal.update(kind="isotonic", right=[float(v) for v in xs[edges]],  # step j covers y <= right[j]
                   values=[float(v) for v in np.append(fitted[edges], fitted[-1])],
                   w=float(n / (n + ISOTONIC_ROWS)))
    return cal


def _out_of_fold(fit, y: np.ndarray, groups, labelled=None) -> tuple[np.ndarray, np.ndarray]:
    """The one cross-validation loop (the guard's and calibrate_out_of_sample's): rows dealt into
    CV_FOLDS folds of whole patients (dataset.patient_folds, seed 0; groups (n,) patient ids,
    labelled (n,) bool: patients with a label dealt out first), and each fold's rows of y (n,) put
    through the map fit(rows) returns, rows (n,) bool = the other folds' rows. Returns (out, fitted),
    both (n,): out float64 in [-1, 1], NaN where fit returned None (no map: too few rows), and
    fitted, True where a map was applied."""
    fold = patient_folds(groups, CV_FOLDS, seed=0, labelled=labelled)
    out, fitted = np.full(len(y), np.nan), np.zeros(len(y), dtype=bool)
    for f in np.unique(fold):
        held = fold == f
        cal = fit(~held)
        if cal is not None:
            out[held], fitted[held] = apply_calibration(cal, y[held]), True
    return out, fitted


def _cross_validate(kind: str, y: np.ndarray, t: np.ndarray, prior: float | None, groups) -> dict[str, float]:
    """Mean squared error of each choice ('map', 'identity', and 'constant' when prior is given) in
    CV_FOLDS-fold cross-validation on (y, t) with whole patients per fold (groups (n,) patient ids),
    the map refitted on each fold's complement: every row is scored by a map that saw none of its
    patient's rows, which share its labels and look alike. Folds whose complement has fewer than 2
    rows are not scored; NaN when no fold can be (one patient, or a handful of rows)."""
    pred, scored = _out_of_fold(lambda rows: _fit_map(kind, y[rows], t[rows]) if rows.sum() >= 2 else None,
                                y, groups)
    choices = {"map": pred, "identity": np.clip(y, -1, 1)}
    if prior is not None:
        choices["constant"] = np.full(len(y), float(prior))
    return {k: float(np.mean((v[scored] - t[scored]) ** 2)) if scored.any() else float("nan")
            for k, v in choices.items()}


def fit_calibration(kind: str, y: np.ndarray, t: np.ndarray, prior: float | None = None,
                    groups=None) -> dict | None:
    """Fit a map raw output y -> target t on labelled validation rows (y, t: (n,), finite; y in
    [-1, 1], t in {-1, 0, 1}); groups (n,) the rows' patient ids, None = each row its own patient.

    affine: t ~ a*y + b by least squares, the slope shrunk by n/(n+SHRINK_ROWS) toward 0 (b
      recentred): negligible at the thousands of rows a real validation split has, a pull toward
      the constant on tiny ones. The slope is kept >= MIN_SLOPE.
    isotonic: PAV step fit blended with that affine map, weight n/(n+ISOTONIC_ROWS) on the step fit;
      tied outputs are pooled first (one value per distinct output, as scikit-learn's
      IsotonicRegression pools them).
    The guard against over-fitting: given `prior` (the training mean, the constant predictor the
    metric compares with), CV_FOLDS-fold cross-validation on these rows, folded by patient,
    picks the best of the fitted map, the raw output (identity) and the constant prior (slope
    MIN_SLOPE); 'chosen' says which, and 'cv_mse' is the chosen option's cross-validated MSE: an
    out-of-sample estimate of what the map scores on patients it was not fitted on (the MSE of the
    final map on these same rows is in-sample, and optimistic). Where no fold can be scored (one
    patient, or no fold whose complement has 2 rows) cv_mse is NaN and, given a prior, the constant
    is chosen. Every map is strictly increasing, and the same for any order of the rows. Returns
    None for 'none' or fewer than 2 rows. calibrate_out_of_sample gives each row's value under this
    whole fit done without its patient."""
    y, t = np.asarray(y, np.float64), np.asarray(t, np.float64)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    if len(groups) != len(y) or len(t) != len(y):
        raise ValueError(f"fit_calibration: y ({len(y)},), t ({len(t)},) and groups ({len(groups)},) do not match")
    if kind == "none" or len(y) < 2:
        return None
    if kind not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {kind!r}")
    # one canonical row order (by output, target, patient): every sum below is then the same float
    # whatever order the rows came in, so the map and its choice are too
    canon = np.lexsort((np.unique(groups, return_inverse=True)[1].reshape(-1), t, y))
    y, t, groups = y[canon], t[canon], groups[canon]
    cv = _cross_validate(kind, y, t, prior, groups)
    order = ["constant", "identity", "map"]  # ties, and no score at all (NaN), go to the simpler choice
    score = {k: (np.inf if np.isnan(v) else v, order.index(k)) for k, v in cv.items()}
    chosen = "map" if prior is None else min(cv, key=score.get)
    common = {"n": len(y), "chosen": chosen, "cv_mse": float(cv[chosen])}
    if chosen == "constant":
        return {"kind": "affine", "a": MIN_SLOPE, "b": float(prior - MIN_SLOPE * y.mean()), **common}
    if chosen == "identity":
        return {"kind": "affine", "a": 1.0, "b": 0.0, **common}
    return {**_fit_map(kind, y, t), **common}


def apply_calibration(cal: dict | None, y) -> np.ndarray:
    """Map raw outputs y (any shape) through cal and clip to [-1, 1]."""
    y = np.asarray(y, np.float64)
    if cal is None:
        return np.clip(y, -1.0, 1.0)
    out = cal["a"] * y + cal["b"]
    if cal["kind"] == "isotonic":
        step = np.asarray(cal["values"])[np.searchsorted(np.asarray(cal["right"]), y, side="left")]
        out = cal["w"] * step + (1.0 - cal["w"]) * out
    return np.clip(out, -1.0, 1.0)


def calibrate_out_of_sample(kind: str, y, t, prior: float | None = None, groups=None) -> np.ndarray:
    """Each row's calibrated value from a map fitted without its patient: fit_calibration (the same
    kind, prior and guard as the map that ships) on the labelled rows of the other CV_FOLDS - 1
    patient folds, applied to the row. The out-of-sample counterpart of
    apply_calibration(fit_calibration(kind, y, t, prior, groups), y), whose map has seen every row it
    calibrates (in sample, optimistic: for isotonic maps on small sets, much so).

    y (n,) raw outputs in [-1, 1]; t (n,) targets, NaN = unlabelled (calibrated too, never fitted
    on); groups (n,) patient ids, None = each row its own patient. A row whose other folds hold fewer
    than 2 labelled rows (a validation set of one or two patients) has no map fitted without its
    patient: it keeps its raw output, clipped, like --calibration none. Returns (n,) float64 in
    [-1, 1], the same for any order of the rows."""
    y, t = np.asarray(y, np.float64), np.asarray(t, np.float64)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    if not len(y) == len(t) == len(groups):
        raise ValueError(f"calibrate_out_of_sample: y ({len(y)},), t ({len(t)},) and groups ({len(groups)},) "
                         f"do not match")
    if kind not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {kind!r}")
    lab = ~np.isnan(t)

    def fit(rows):
        rows = rows & lab
        return fit_calibration(kind, y[rows], t[rows], prior, groups[rows])
    out, fitted = _out_of_fold(fit, y, groups, labelled=lab)
    return np.where(fitted, out, np.clip(y, -1.0, 1.0))


def fuse_studies(x: np.ndarray, studies, frontal=None, w_frontal: float | None = None) -> np.ndarray:
    """Study fusion: every image of a study takes one value, made from the study's images where x
    is not NaN (NaN = not predicted: it does not count, and takes the study's value when another
    image has one; a study with none stays NaN).

    x (N,) or (N, P) floats; studies (N,) study ids (any sortable values); frontal (N,) bool, True
    for a frontal image. w_frontal None: the plain mean over the study's images (frontal unused;
    make_submission.py --study-fusion). w_frontal in [0, 1]: w_frontal * mean(frontal images) +
    (1 - w_frontal) * mean(lateral images), or the mean of the one view the study has (the blend).
    Returns float64 of x's shape."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return x.copy()
    codes = np.unique(np.asarray(studies), return_inverse=True)[1].reshape(-1)
    cols = x.reshape(len(x), -1)
    if w_frontal is None:
        return _study_means(cols, codes, np.ones(len(x), dtype=bool))[codes].reshape(x.shape)
    if frontal is None:
        raise ValueError("fuse_studies: w_frontal needs frontal, the images' views")
    frontal = np.asarray(frontal, dtype=bool)
    mf, ml = _study_means(cols, codes, frontal), _study_means(cols, codes, ~frontal)
    both = ~np.isnan(mf) & ~np.isnan(ml)
    fused = np.where(both, w_frontal * mf + (1 - w_frontal) * ml, np.where(np.isnan(mf), ml, mf))
    return fused[codes].reshape(x.shape)


def _study_means(x: np.ndarray, codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(S, P) mean of x (N, P) over each study's rows where rows (N,) is True and x is not NaN, NaN
    where there are none; codes (N,) the study of each row, 0..S-1."""
    size = int(codes.max()) + 1
    ok = ~np.isnan(x) & rows[:, None]
    xz = np.where(ok, x, 0.0)
    sums = np.stack([np.bincount(codes, xz[:, j], size) for j in range(x.shape[1])], axis=1)
    counts = np.stack([np.bincount(codes, ok[:, j], size) for j in range(x.shape[1])], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


# ---------------------------------------------------------------------------------------------
# Blending: members' raw predictions on the same validation images -> one calibrated prediction

def fit_blend(preds: np.ndarray, target: np.ndarray, groups, studies, views, k: int = 5, seed: int = 0,
              min_rows: int = 50) -> dict:
    """Fit one pathology's blend of M members and measure it out of fold.

    preds (N, M) members' raw predictions in [-1, 1] (val_predictions.csv's `raw`: their own
    calibration maps were fitted on these same rows, so using them would leak), NaN where a member
    does not predict an image (a one-view model on the other view's images); target (N,), NaN =
    unlabelled; groups (N,)
    patient ids; studies (N,) study ids; views (N,) 'frontal' or 'lateral'. Unlabelled images still
    count for study fusion (their predictions join their study's mean), never as targets.

    The blend of an image (apply_blend): the weighted mean of the members that predict it (weights
    renormalised over them); then, if w_frontal is not None, fuse_studies: every image of a study
    takes w_frontal * mean(frontal images) + (1 - w_frontal) * mean(lateral images), or the mean of
    the one view the study has; then a * value + b, clipped to [-1, 1]. Weights are non-negative,
    sum to 1 and are fitted by least squares (intercept free) on the labelled images that every
    member predicts (uniform if there are none), plus lambda * |w - uniform|^2 (simplex_weights); a
    and b by least squares after fusion (fit_affine: a >= MIN_SLOPE). lambda (LAMBDAS), then
    w_frontal (FUSION_GRID) are chosen by k-fold CV with whole patients per fold (patient_folds).

    oof: MSE over the n labelled images, each predicted by a pipeline fitted without its patient's
    fold, every calibration included: "blend" (the selection of lambda and w_frontal too); the
    uniform mean of the members with its a, b ("uniform"); the member whose own a, b fit does best on
    the other folds ("best_single"; among members that predict every labelled image, else NaN).
    With fewer than min_rows labelled images, or fewer than 2 labelled patients per fold, it returns
    the uniform mean calibrated on all of them (fallback True, a reason) and no oof numbers (NaN).

    Returns {"weights": [M floats], "lambda", "a", "b", "w_frontal" (None = no fusion), "fallback",
    "reason", "oof": {"best_single", "uniform", "blend", "n"}}; NaN where undefined."""
    P, t, groups, s, frontal = _blend_inputs(preds, target, groups, studies, views)
    lab = ~np.isnan(t)
    n_lab, n_pat = int(lab.sum()), len(np.unique(groups[lab]))
    uniform_w = np.full(P.shape[1], 1.0 / P.shape[1])
    oof = {"best_single": float("nan"), "uniform": float("nan"), "blend": float("nan"), "n": n_lab}
    reason = (f"{n_lab} labelled validation images, fewer than {min_rows}" if n_lab < min_rows else
              f"{n_pat} labelled patients, fewer than 2 per fold for {k} folds" if n_pat < 2 * k else None)
    if reason:  # too few rows to measure anything out of fold: the uniform mean, calibrated on them all
        return {**_fit_fixed(P, t, uniform_w), "fallback": True, "reason": reason, "oof": oof}
    folds = patient_folds(groups, k, seed, labelled=lab)
    blend, uniform, single = (np.full(len(t), np.nan) for _ in range(3))
    whole = np.flatnonzero(~np.isnan(P[lab]).any(axis=0))  # members that predict every labelled image
    for f in range(k):
        tr, te = folds != f, folds == f
        params = _fit_pipeline(P[tr], t[tr], groups[tr], s[tr], frontal[tr], k, seed)
        blend[te] = _predict(params, P[te], s[te], frontal[te])
        uniform[te] = _predict(_fit_fixed(P[tr], t[tr], uniform_w), P[te], s[te], frontal[te])
        if len(whole):  # the member whose own calibrated output does best on the other folds
            fits = [_fit_fixed(P[tr], t[tr], np.eye(P.shape[1])[j]) for j in whole]
            j = int(np.argmin([_mse(_predict(q, P[tr], s[tr], frontal[tr]), t[tr]) for q in fits]))
            single[te] = _predict(fits[j], P[te], s[te], frontal[te])
    oof.update(blend=_mse(blend, t), uniform=_mse(uniform, t),
               best_single=_mse(single, t) if len(whole) else float("nan"))
    return {**_fit_pipeline(P, t, groups, s, frontal, k, seed), "fallback": False, "reason": None, "oof": oof}


def _fit_fixed(P, t, weights) -> dict:
    """Given member weights: only the intercept and slope (a, b) fitted, on the labelled rows; no fusion."""
    lab = ~np.isnan(t)
    a, b = fit_affine(_combine(P, weights)[lab], t[lab])
    return _params(weights, None, a, b, None)


def apply_blend(params: dict, preds: np.ndarray, studies, views) -> np.ndarray:
    """One pathology's blended prediction (N,) in [-1, 1] from fit_blend's params (or blend.json's
    entry). preds (N, M) members' raw predictions in the params' member order, NaN where a
    member does not predict an image; studies, views (N,) as in fit_blend. An image that no member
    predicts gets NaN."""
    P, _, _, s, frontal = _blend_inputs(preds, np.zeros(len(preds)), np.zeros(len(preds)), studies, views)
    p = _params(np.asarray(params["weights"], dtype=np.float64), params.get("lambda"), params["a"], params["b"],
                params.get("w_frontal"))
    if len(p["weights"]) != P.shape[1]:
        raise ValueError(f"apply_blend: {len(p['weights'])} weights for {P.shape[1]} members")
    return _predict(p, P, s, frontal)


def _blend_inputs(preds, target, groups, studies, views):
    """Arrays for the blend: P (N, M) float, t (N,) float (NaN also where no member predicts), groups,
    study codes (N,) int, frontal (N,) bool. Raises ValueError on mismatched lengths or bad views."""
    P = np.asarray(preds, dtype=np.float64)
    P = P[:, None] if P.ndim == 1 else P
    t = np.asarray(target, dtype=np.float64).copy()
    groups, studies = np.asarray(groups), np.asarray(studies)
    views = np.char.lower(np.asarray(views, dtype=str))
    n = len(P)
    if P.ndim != 2 or P.shape[1] == 0 or not len(t) == len(groups) == len(studies) == len(views) == n:
        raise ValueError(f"blend: preds {P.shape}, target ({len(t)},), groups ({len(groups)},), studies "
                         f"({len(studies)},) and views ({len(views)},) do not match")
    bad = ~np.isin(views, ["frontal", "lateral"])
    if bad.any():
        raise ValueError(f"blend: views must be 'frontal' or 'lateral', got {views[bad][0]!r}")
    t[np.isnan(P).all(axis=1)] = np.nan
    return P, t, groups, np.unique(studies, return_inverse=True)[1], views == "frontal"


def _params(weights, lam, a, b, w_frontal) -> dict:
    return {"weights": [float(v) for v in weights], "lambda": lam, "a": float(a), "b": float(b),
            "w_frontal": None if w_frontal is None else float(w_frontal)}


def _mse(pred: np.ndarray, t: np.ndarray) -> float:
    m = ~np.isnan(t)
    return float(np.mean((pred[m] - t[m]) ** 2)) if m.any() else float("nan")


def _fit_pipeline(P, t, groups, s, frontal, k: int, seed: int) -> dict:
    """The whole fit on one set of images: lambda by grouped CV (without fusion), then w_frontal by
    grouped CV (with that lambda), then weights, fusion and a, b refitted on all of them. fit_blend
    calls it once per outer fold and once on everything."""
    folds = patient_folds(groups, k, seed, labelled=~np.isnan(t))
    lam = min(LAMBDAS, key=lambda v: _cv_mse(P, t, s, frontal, folds, k, v, None))  # first of ties: more shrinkage
    w = min(FUSION_GRID, key=lambda v: _cv_mse(P, t, s, frontal, folds, k, lam, v))
    return _fit(P, t, s, frontal, lam, w)


def _cv_mse(P, t, s, frontal, folds, k: int, lam: float, w_frontal) -> float:
    """Pooled MSE over the labelled rows of each fold, predicted by _fit on the other folds."""
    se, n = 0.0, 0
    for f in range(k):
        tr, te = folds != f, (folds == f) & ~np.isnan(t)
        if not te.any() or np.isnan(t[tr]).all():
            continue
        te_rows = folds == f
        pred = _predict(_fit(P[tr], t[tr], s[tr], frontal[tr], lam, w_frontal), P[te_rows], s[te_rows],
                        frontal[te_rows])
        m = ~np.isnan(t[te_rows])
        se += float(((pred[m] - t[te_rows][m]) ** 2).sum())
        n += int(m.sum())
    return se / n if n else float("inf")


def _fit(P, t, s, frontal, lam: float, w_frontal) -> dict:
    """Weights (on the labelled rows every member predicts), then fusion, then a, b."""
    lab = ~np.isnan(t)
    complete = lab & ~np.isnan(P).any(axis=1)
    weights = simplex_weights(P[complete], t[complete], lam)
    x = _fused(_combine(P, weights), s, frontal, w_frontal)
    a, b = fit_affine(x[lab], t[lab])
    return _params(weights, lam, a, b, w_frontal)


def _fused(x, s, frontal, w_frontal) -> np.ndarray:
    """The blend's fusion step: fuse_studies with w_frontal, or x unchanged where w_frontal is None."""
    return x if w_frontal is None else fuse_studies(x, s, frontal, w_frontal)


def _predict(params: dict, P, s, frontal) -> np.ndarray:
    x = _fused(_combine(P, np.asarray(params["weights"])), s, frontal, params["w_frontal"])
    return np.clip(params["a"] * x + params["b"], -1.0, 1.0)


def simplex_weights(P: np.ndarray, t: np.ndarray, lam: float = 0.0) -> np.ndarray:
    """Non-negative weights (M,) summing to 1 minimising mean((Pc @ w - tc)^2) + lam * |w - 1/M|^2,
    Pc and tc centred (the intercept is left to the calibration that follows). P (n, M) finite,
    t (n,). A quadratic program in M variables, solved by scipy's SLSQP from uniform weights;
    uniform when there are fewer than 2 rows, one member, or no member varies."""
    n, M = P.shape
    uniform = np.full(M, 1.0 / M)
    if n < 2 or M == 1:
        return uniform
    Pc, tc = P - P.mean(axis=0), t - t.mean()
    H = Pc.T @ Pc / n + lam * np.eye(M)
    g = Pc.T @ tc / n + lam * uniform  # objective w'Hw - 2 g'w (+ constant)
    if float(np.linalg.eigvalsh(H).max()) <= 5e-13:
        return uniform
    res = minimize(lambda w: w @ H @ w - 2 * g @ w, uniform, jac=lambda w: 2 * (H @ w - g), method="SLSQP",
                   bounds=[(0.0, 1.0)] * M, options={"ftol": 1e-16, "maxiter": 500},
                   constraints={"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones((1, M))})
    # SLSQP leaves about 1e-16 where a bound is active: exact zeros make a corner solution the same
    # for every lambda that reaches it, so a tie in the lambda choice still goes to more shrinkage
    w = np.where(res.x < 1e-12, 0.0, res.x)
    return w / w.sum()


def _combine(P, weights) -> np.ndarray:
    """(N,) weighted mean over the members that predict each row; the plain mean of them where those
    members all have weight 0; NaN where none predicts."""
    avail = ~np.isnan(P)
    Pz = np.where(avail, P, 0.0)
    num, den, count = Pz @ weights, avail @ weights, avail.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12, num / den, Pz.sum(axis=1) / count)
