"""How good a set of predictions is, pictures of it, and the out-of-fold blend of several models.

Everything here is plain numpy (matplotlib only inside the plot functions), so train.py,
make_submission.py and experiments/blend.py share one definition of each number:

- auc, evaluate: per-pathology n, MSE, AUC and the constant-predictor MSE, with 95% intervals from a
  patient-grouped bootstrap; metrics_rows / write_metrics put them in a table, metrics.json and .csv.
- plot_curves, plot_roc, plot_reliability, plot_evaluation: PNG files, written atomically.
- fit_blend, apply_blend: per pathology, non-negative member weights shrunk toward uniform, a
  frontal/lateral study fusion and an affine calibration, chosen by patient-grouped K-fold CV, with
  the out-of-fold MSE of the best single member, the uniform average and the blend.

Scale throughout: predictions in [-1, 1]; targets 1 positive, 0 uncertain, -1 negative, NaN blank.
"""
from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dataset import atomic_write, slug, write_text

# val_predictions.csv, written by train.py and read by experiments/blend.py: one row per validation
# image and pathology; target blank = unlabelled; raw and calibrated predictions in [-1, 1]
PREDICTION_COLUMNS = ["path", "patient", "study", "view", "pathology", "target", "raw", "calibrated"]
METRIC_COLUMNS = ["pathology", "n", "mse", "mse_lo", "mse_hi", "const_mse", "auc", "auc_lo", "auc_hi"]
BOOT_CHUNK = 100  # resamples drawn at once: bounds memory at about BOOT_CHUNK x rows floats
DPI = 100
CURVES_SIZE = (1000, 700)  # pixels of curves.png
PLOT_SIZE = (500, 500)  # pixels of each ROC / reliability PNG
LAMBDAS = (1.0, 0.1, 0.01, 0.001, 0.0)  # shrinkage toward uniform weights; most first, so ties keep more
# Frontal weights tried for study fusion, preferred first on ties (0.5 when no study has both views);
# None = no fusion, each image keeps its own value.
FUSION_GRID = (0.5, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2, 0.9, 0.1, 1.0, 0.0, None)
MIN_SLOPE = 1e-3  # the blend's calibration slope is kept at least this (> 0: more blend, more label)


# ---------------------------------------------------------------------------------------------
# Metrics

def auc(score: np.ndarray, target: np.ndarray) -> float:
    """Area under the ROC curve of positives (1) against negatives (-1); uncertain (0) and blank (NaN)
    targets are left out, tied scores share their mean rank. NaN if positives or negatives are absent.
    score, target: (N,) floats."""
    score, target = np.asarray(score, dtype=np.float64), np.asarray(target, dtype=np.float64)
    pos, neg = target == 1, target == -1
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    keep = pos | neg
    ranks = pd.Series(score[keep]).rank().to_numpy()  # ties share their mean rank
    return float((ranks[pos[keep]].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(pred: np.ndarray, target: np.ndarray, groups, names: list[str], const: dict,
             n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-pathology metrics with 95% intervals from a patient-grouped bootstrap.

    pred (N, P) floats in [-1, 1], scored as given; target (N, P), NaN = blank (not scored); groups
    (N,) patient ids; names the P pathologies; const: name -> training mean, the constant predictor
    (a name missing from it gets const_mse NaN). Each of the n_boot resamples draws patients with
    replacement and keeps all of a drawn patient's rows; every pathology (AUC included) uses all
    n_boot resamples, the same ones. An interval is the 2.5th and 97.5th percentile over the
    resamples where the number is defined (AUC needs a positive and a negative).

    Returns {"per_pathology": {name: {"n", "mse", "mse_ci": [lo, hi], "const_mse", "auc",
    "auc_ci": [lo, hi]}}, "macro": {"mse", "auc"}}; macro is the plain mean over the pathologies with
    labels (n > 0), for AUC over those where it is defined. NaN where a number is undefined
    (write_metrics writes it as null)."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    groups = np.asarray(groups)
    if pred.ndim != 2 or pred.shape != target.shape or pred.shape[1] != len(names) or len(groups) != len(pred):
        raise ValueError(f"evaluate: pred {pred.shape}, target {target.shape}, groups ({len(groups)},) and "
                         f"{len(names)} names do not match")
    if np.isnan(pred[~np.isnan(target)]).any():
        raise ValueError("evaluate: pred is NaN where target has a label")
    _, codes = np.unique(groups, return_inverse=True)
    boot_mse, boot_auc = _bootstrap(pred, target, codes, n_boot, seed)
    per = {}
    for k, name in enumerate(names):
        m = ~np.isnan(target[:, k])
        p, t = pred[m, k], target[m, k]
        c = const.get(name, float("nan"))
        per[name] = {"n": int(m.sum()),
                     "mse": float(np.mean((p - t) ** 2)) if m.any() else float("nan"),
                     "mse_ci": _interval(boot_mse[:, k]),
                     "const_mse": float(np.mean((c - t) ** 2)) if m.any() else float("nan"),
                     "auc": auc(p, t), "auc_ci": _interval(boot_auc[:, k])}
    labelled = [v for v in per.values() if v["n"] > 0]
    aucs = [v["auc"] for v in labelled if not math.isnan(v["auc"])]
    macro = {"mse": float(np.mean([v["mse"] for v in labelled])) if labelled else float("nan"),
             "auc": float(np.mean(aucs)) if aucs else float("nan")}
    return {"per_pathology": per, "macro": macro}


def _interval(values: np.ndarray) -> list[float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _patient_counts(rng, n_patients: int, n: int) -> np.ndarray:
    """(n, n_patients) int: how often each patient is drawn in each of n resamples of n_patients draws."""
    draws = rng.integers(0, n_patients, size=(n, n_patients)) + n_patients * np.arange(n)[:, None]
    return np.bincount(draws.ravel(), minlength=n * n_patients).reshape(n, n_patients)


def _bootstrap(pred, target, codes, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_boot, P) MSEs and AUCs of patient-grouped resamples: a row weighs as often as its patient
    was drawn. MSE from per-patient sums (counts @ sums); AUC as a weighted Mann-Whitney statistic."""
    n_patients = int(codes.max()) + 1 if len(codes) else 0
    n_path = pred.shape[1]
    mse, aucs = np.full((n_boot, n_path), np.nan), np.full((n_boot, n_path), np.nan)
    if n_patients == 0 or n_boot <= 0:
        return mse, aucs
    rng = np.random.default_rng(seed)
    sums = []  # per pathology: per-patient squared errors, per-patient label counts, AUC levels
    for k in range(n_path):
        m = ~np.isnan(target[:, k])
        sums.append((np.bincount(codes[m], (pred[m, k] - target[m, k]) ** 2, minlength=n_patients),
                     np.bincount(codes[m], minlength=n_patients).astype(np.float64),
                     _auc_levels(pred[:, k], target[:, k], codes)))
    for start in range(0, n_boot, BOOT_CHUNK):
        counts = _patient_counts(rng, n_patients, min(BOOT_CHUNK, n_boot - start)).astype(np.float64)
        rows = slice(start, start + len(counts))
        for k, (sse, cnt, levels) in enumerate(sums):
            with np.errstate(invalid="ignore", divide="ignore"):
                mse[rows, k] = (counts @ sse) / (counts @ cnt)
            if levels is not None:
                aucs[rows, k] = _weighted_auc(counts, *levels)
    return mse, aucs


def _auc_levels(score, target, codes):
    """The positive/negative rows sorted by score: (patient code per row, is positive, start of each
    run of equal scores); None when positives or negatives are absent."""
    keep = (target == 1) | (target == -1)
    if not (target == 1).any() or not (target == -1).any():
        return None
    order = np.argsort(score[keep], kind="stable")
    s, pos, g = score[keep][order], (target[keep] == 1)[order], codes[keep][order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return g, pos, starts


def _weighted_auc(counts, g, pos, starts) -> np.ndarray:
    """AUC per resample, each row weighted by its patient's count: for each score level, positives x
    (negatives below + half the negatives tied). counts (B, n_patients) -> (B,)."""
    w = counts[:, g]
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num, den = (wp * (below + 0.5 * wn)).sum(1), wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def metrics_rows(metrics: dict) -> list[dict]:
    """evaluate()'s dict as table rows (METRIC_COLUMNS), one per pathology then a 'macro' row whose
    n is the total of labelled entries; for dataset.format_table and metrics.csv."""
    rows = []
    for name, v in metrics["per_pathology"].items():
        rows.append({"pathology": name, "n": v["n"], "mse": v["mse"], "mse_lo": v["mse_ci"][0],
                     "mse_hi": v["mse_ci"][1], "const_mse": v["const_mse"], "auc": v["auc"],
                     "auc_lo": v["auc_ci"][0], "auc_hi": v["auc_ci"][1]})
    rows.append({"pathology": "macro", "n": sum(r["n"] for r in rows), "mse": metrics["macro"]["mse"],
                 "auc": metrics["macro"]["auc"]})
    return rows


def jsonable(x):
    """Dicts/lists as JSON accepts them: NaN and inf -> None, numpy scalars/arrays -> Python, paths
    -> strings (summary.json's configuration holds argparse's Path values)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_metrics(metrics: dict, json_path: Path, csv_path: Path) -> None:
    """metrics.json (evaluate()'s dict, NaN as null) and metrics.csv (metrics_rows, NaN as empty)."""
    write_text(json_path, json.dumps(jsonable(metrics), indent=2, allow_nan=False) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in jsonable(metrics_rows(metrics)):
        w.writerow({c: "" if row.get(c) is None else row[c] for c in METRIC_COLUMNS})
    write_text(csv_path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Pictures

def new_figure(size: tuple[int, int]):
    """A matplotlib Figure of size (width, height) pixels that needs no display. pyplot is never
    imported: no global figure state, and a notebook's own backend is left alone."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")


def save_png(fig, path: Path) -> Path:
    """Write the figure to path as a PNG, atomically; returns path."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def _column(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of one history column, rows where it is missing or not a number left out."""
    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")
    epochs = np.array([num(r.get("epoch", i + 1)) for i, r in enumerate(history)])
    values = np.array([num(r.get(key)) for r in history])
    ok = np.isfinite(epochs) & np.isfinite(values)
    return epochs[ok], values[ok]


def _lines(ax, history: list[dict], series: list[tuple[str, str, dict]], ylabel: str) -> None:
    drawn = False
    for key, label, style in series:
        x, y = _column(history, key)
        if len(y):
            ax.plot(x, y, marker="o", markersize=3, label=label, **style)
            drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_curves(history: list[dict], path: Path, title: str) -> Path:
    """curves.png (CURVES_SIZE pixels) from history.csv's rows (dicts with epoch, train_loss,
    val_loss, val_mse, val_mse_cv, val_mse_cal, const_mse, val_auc, lr; missing columns or values are
    skipped): loss, validation MSE against the constant predictor (calibrated out of sample, the
    number that picks best.pt; calibrated in-sample; raw), AUC and learning rate per epoch."""
    fig = new_figure(CURVES_SIZE)
    ax = fig.subplots(2, 2)
    _lines(ax[0, 0], history, [("train_loss", "train", {}), ("val_loss", "validation", {})], "loss")
    _lines(ax[0, 1], history, [("val_mse_cv", "validation, calibrated, out of sample", {}),
                               ("val_mse_cal", "validation, calibrated, in-sample", {"alpha": 0.5, "linestyle": ":"}),
                               ("val_mse", "validation, raw", {"alpha": 0.5}),
                               ("const_mse", "constant (training mean)", {"linestyle": "--", "color": "gray"})],
           "MSE")
    _lines(ax[1, 0], history, [("val_auc", "validation", {})], "AUC")
    _lines(ax[1, 1], history, [("lr", "learning rate", {})], "learning rate")
    lr = _column(history, "lr")[1]
    if len(lr) and (lr > 0).all():
        ax[1, 1].set_yscale("log")
    fig.suptitle(title)
    return save_png(fig, path)


def roc_points(score: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1);
    positives 1 against negatives -1 as in auc(). Empty arrays when either class is absent."""
    score, target = np.asarray(score, dtype=np.float64), np.asarray(target, dtype=np.float64)
    keep = (target == 1) | (target == -1)
    s, pos = score[keep], target[keep] == 1
    if pos.all() or not pos.any():
        return np.array([]), np.array([])
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each run of tied scores
    tp, fp = np.cumsum(pos)[last], np.cumsum(~pos)[last]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def plot_roc(pred: np.ndarray, target: np.ndarray, name: str, path: Path) -> Path:
    """ROC curve (PLOT_SIZE pixels) of one pathology, its AUC in the legend and title.
    pred, target (N,): [-1, 1] predictions, targets with 0 and NaN left out."""
    fpr, tpr = roc_points(pred, target)
    a = auc(pred, target)
    t = np.asarray(target, dtype=np.float64)
    fig = new_figure(PLOT_SIZE)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1)
    if len(fpr):
        ax.plot(fpr, tpr, label=f"AUC {a:.3f} ({int((t == 1).sum())} pos, {int((t == -1).sum())} neg)")
        ax.legend(loc="lower right", fontsize=9)
    else:
        ax.text(0.5, 0.5, "needs positives and negatives", ha="center", va="center", color="gray")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate",
           title=f"{name}: ROC, AUC {a:.3f}" if not math.isnan(a) else f"{name}: ROC")
    ax.set_aspect("equal")
    return save_png(fig, path)


def reliability_bins(pred: np.ndarray, target: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Equal-width bins of the prediction over [-1, 1], labelled rows (uncertain 0 included, NaN out):
    columns lo, hi, n, mean_pred, mean_target; bins with no rows are left out."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    m = ~np.isnan(target)
    p, t = pred[m], target[m]
    edges = np.linspace(-1, 1, bins + 1)
    k = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    n = np.bincount(k, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "n": n,
                           "mean_pred": np.bincount(k, p, minlength=bins) / n,
                           "mean_target": np.bincount(k, t, minlength=bins) / n})
    return df[df.n > 0].reset_index(drop=True)


def plot_reliability(pred: np.ndarray, target: np.ndarray, name: str, path: Path, bins: int = 10) -> Path:
    """Reliability diagram (PLOT_SIZE pixels): mean label against mean prediction in equal-width bins
    of [-1, 1], each point annotated with its count. pred, target (N,), target NaN = blank."""
    df = reliability_bins(pred, target, bins)
    fig = new_figure(PLOT_SIZE)
    ax = fig.subplots()
    ax.plot([-1, 1], [-1, 1], linestyle="--", color="gray", linewidth=1, label="perfectly calibrated")
    if len(df):
        ax.plot(df.mean_pred, df.mean_target, marker="o", label="model")
        for r in df.itertuples():
            ax.annotate(str(r.n), (r.mean_pred, r.mean_target), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)
        ax.legend(loc="upper left", fontsize=9)
    ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel="mean prediction", ylabel="mean label",
           title=f"{name}: reliability ({int(df.n.sum())} labelled)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_evaluation(pred: np.ndarray, target: np.ndarray, names: list[str], out_dir: Path) -> list[Path]:
    """roc_<slug>.png and reliability_<slug>.png in out_dir for each pathology that has labels.
    pred, target (N, P) as in evaluate(). Returns the paths written."""
    pred, target = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
    written = []
    for k, name in enumerate(names):
        if np.isnan(target[:, k]).all():
            continue
        written.append(plot_roc(pred[:, k], target[:, k], name, Path(out_dir) / f"roc_{slug(name)}.png"))
        written.append(plot_reliability(pred[:, k], target[:, k], name,
                                        Path(out_dir) / f"reliability_{slug(name)}.png"))
    return written


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
    renormalised over them); then, if w_frontal is not None, every image of a study takes
    w_frontal * mean(frontal images) + (1 - w_frontal) * mean(lateral images), or the mean of the
    one view the study has; then a * value + b, clipped to [-1, 1]. Weights are non-negative, sum to
    1 and are fitted by least squares (intercept free) on the labelled images that every member
    predicts (uniform if there are none), plus lambda * |w - uniform|^2; a and b by least squares
    after fusion (a >= MIN_SLOPE). lambda (LAMBDAS), then w_frontal (FUSION_GRID) are chosen by
    patient-grouped k-fold CV.

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
    folds = _patient_folds(groups, lab, k, seed)
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
    a, b = _fit_affine(_combine(P, weights)[lab], t[lab])
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


def _patient_folds(groups, labelled, k: int, seed: int) -> np.ndarray:
    """(N,) fold of each row, 0..k-1, whole patients per fold; patients with labels are dealt out
    first, so each fold gets its share of them."""
    patients, inv = np.unique(groups, return_inverse=True)
    has = np.bincount(inv, labelled, minlength=len(patients)) > 0
    order = np.random.default_rng(seed).permutation(len(patients))
    order = order[np.argsort(~has[order], kind="stable")]
    fold = np.empty(len(patients), dtype=np.int64)
    fold[order] = np.arange(len(patients)) % k
    return fold[inv]


def _fit_pipeline(P, t, groups, s, frontal, k: int, seed: int) -> dict:
    """The whole fit on one set of images: lambda by grouped CV (without fusion), then w_frontal by
    grouped CV (with that lambda), then weights, fusion and a, b refitted on all of them. fit_blend
    calls it once per outer fold and once on everything."""
    folds = _patient_folds(groups, ~np.isnan(t), k, seed)
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
    x = _fuse(_combine(P, weights), s, frontal, w_frontal)
    a, b = _fit_affine(x[lab], t[lab])
    return _params(weights, lam, a, b, w_frontal)


def _predict(params: dict, P, s, frontal) -> np.ndarray:
    x = _fuse(_combine(P, np.asarray(params["weights"])), s, frontal, params["w_frontal"])
    return np.clip(params["a"] * x + params["b"], -1.0, 1.0)


def simplex_weights(P: np.ndarray, t: np.ndarray, lam: float = 0.0, iters: int = 2000) -> np.ndarray:
    """Non-negative weights (M,) summing to 1 minimising mean((Pc @ w - tc)^2) + lam * |w - 1/M|^2,
    Pc and tc centred (the intercept is left to the calibration that follows). P (n, M) finite,
    t (n,). Accelerated projected gradient; uniform when there are fewer than 2 rows."""
    n, M = P.shape
    uniform = np.full(M, 1.0 / M)
    if n < 2 or M == 1:
        return uniform
    Pc, tc = P - P.mean(axis=0), t - t.mean()
    H = Pc.T @ Pc / n + lam * np.eye(M)
    g = Pc.T @ tc / n + lam * uniform  # objective w'Hw - 2 g'w (+ constant)
    L = 2 * float(np.linalg.eigvalsh(H).max())
    if L <= 1e-12:
        return uniform
    w, y, step = uniform, uniform, 1.0
    for _ in range(iters):
        w_next = _project_simplex(y - 2 * (H @ y - g) / L)
        if np.abs(w_next - w).max() < 1e-10:
            w = w_next
            break
        step_next = (1 + math.sqrt(1 + 4 * step * step)) / 2
        y = w_next + (step - 1) / step_next * (w_next - w)
        w, step = w_next, step_next
    return w


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {w >= 0, sum w = 1} (sort-based, exact)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1
    rho = np.flatnonzero(u - css / np.arange(1, len(v) + 1) > 0)[-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def _combine(P, weights) -> np.ndarray:
    """(N,) weighted mean over the members that predict each row; the plain mean of them where those
    members all have weight 0; NaN where none predicts."""
    avail = ~np.isnan(P)
    Pz = np.where(avail, P, 0.0)
    num, den, count = Pz @ weights, avail @ weights, avail.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12, num / den, Pz.sum(axis=1) / count)


def _fuse(x, s, frontal, w_frontal) -> np.ndarray:
    """Study fusion: each image takes its study's w * mean(frontal) + (1 - w) * mean(lateral), or the
    mean of the one view the study has; w_frontal None leaves x as it is. x (N,), s (N,) study codes."""
    if w_frontal is None or len(x) == 0:
        return x
    ok = ~np.isnan(x)
    xz, f, l = np.where(ok, x, 0.0), ok & frontal, ok & ~frontal
    size = int(s.max()) + 1
    nf, nl = np.bincount(s, f, size), np.bincount(s, l, size)
    with np.errstate(invalid="ignore", divide="ignore"):
        mf, ml = np.bincount(s, xz * f, size) / nf, np.bincount(s, xz * l, size) / nl
    fused = np.where((nf > 0) & (nl > 0), w_frontal * mf + (1 - w_frontal) * ml, np.where(nf > 0, mf, ml))
    return fused[s]


def _fit_affine(x, t) -> tuple[float, float]:
    """Least-squares a, b of t ~ a * x + b with a >= MIN_SLOPE; a = 1 when x does not vary."""
    if len(x) == 0:
        return 1.0, 0.0
    vx = float(x.var())
    a = float(((x - x.mean()) * (t - t.mean())).mean()) / vx if vx > 1e-12 else 1.0
    a = max(a, MIN_SLOPE)
    return a, float(t.mean() - a * x.mean())
