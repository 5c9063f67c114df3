"""How good a set of predictions is, and pictures of it.

numpy, with scikit-learn's roc_auc_score and roc_curve (matplotlib only inside the plot
functions), so train.py, make_submission.py and experiments/blend.py share one definition of each
number:

- auc, evaluate: per-pathology n, MSE, AUC and the constant-predictor MSE, with 95% intervals from a
  patient-grouped bootstrap (its AUCs vectorised over resamples: the same statistic as
  roc_auc_score with the resample's counts as weights, much faster; benchmarks/bench_bootstrap.py);
  metrics_rows / write_metrics put them in a table, metrics.json and .csv.
- plot_curves, plot_roc, plot_reliability, plot_evaluation: PNG files, written atomically.

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
from sklearn.metrics import roc_auc_score, roc_curve

from calibration import apply_calibration
from common import atomic_write, jsonable, write_text
from dataset import slug

METRIC_COLUMNS = ["pathology", "n", "mse", "mse_lo", "mse_hi", "nmse", "const_mse", "auc", "auc_lo", "auc_hi"]
# train.py's validation metrics per pathology (pathology_metrics), and their macro means
METRIC_KEYS = ("val_mse", "val_mse_cv", "val_mse_cal", "const_mse", "val_nmse", "val_auc")
BOOT_CHUNK = 100  # resamples drawn at once: bounds memory at about BOOT_CHUNK x rows floats
DPI = 100
CURVES_SIZE = (1000, 700)  # pixels of curves.png
PLOT_SIZE = (500, 500)  # pixels of each ROC / reliability PNG


# ---------------------------------------------------------------------------------------------
# Metrics

def auc(score: np.ndarray, target: np.ndarray) -> float:
    """Area under the ROC curve of positives (1) against negatives (-1), scikit-learn's
    roc_auc_score; uncertain (0) and blank (NaN) targets are left out, a tie between a positive and
    a negative counts half. NaN if positives or negatives are absent, or a scored row's score is
    NaN (a diverged model). score, target: (N,) floats."""
    s, pos = _positives_and_negatives(score, target)
    if pos.all() or not pos.any() or np.isnan(s).any():
        return float("nan")
    return float(roc_auc_score(pos, s))


def _positives_and_negatives(score, target) -> tuple[np.ndarray, np.ndarray]:
    """(scores, is positive) of the rows whose target is 1 or -1."""
    score, target = np.asarray(score, dtype=np.float64), np.asarray(target, dtype=np.float64)
    keep = (target == 1) | (target == -1)
    return score[keep], target[keep] == 1


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
                     "mse_ci": _interval(boot_mse[:, k]), "nmse": normalised_mse(p, t),
                     "const_mse": float(np.mean((c - t) ** 2)) if m.any() else float("nan"),
                     "auc": auc(p, t), "auc_ci": _interval(boot_auc[:, k])}
    labelled = [v for v in per.values() if v["n"] > 0]
    aucs = [v["auc"] for v in labelled if not math.isnan(v["auc"])]
    nmses = [v["nmse"] for v in labelled if not math.isnan(v["nmse"])]
    macro = {"mse": float(np.mean([v["mse"] for v in labelled])) if labelled else float("nan"),
             "nmse": float(np.mean(nmses)) if nmses else float("nan"),
             "auc": float(np.mean(aucs)) if aucs else float("nan")}
    return {"per_pathology": per, "macro": macro}


def normalised_mse(pred: np.ndarray, target: np.ndarray) -> float:
    """MSE divided by the variance of the labels (pred, target (N,), labelled rows only): 1 is the
    constant at the labels' own mean, 0 perfect; comparable across pathologies whose labels spread
    differently. NaN without labels or when every label is the same."""
    t = np.asarray(target, dtype=np.float64)
    var = float(t.var()) if len(t) else 0.0
    return float(np.mean((np.asarray(pred, dtype=np.float64) - t) ** 2) / var) if var > 0 else float("nan")


def pathology_metrics(pred: np.ndarray, target: np.ndarray, train_mean: float, cal: dict | None) -> dict:
    """Metrics on one pathology's labelled validation rows. pred, target (N,), target NaN = blank.

    val_mse: raw outputs; val_mse_cv: calibrated, out of sample (each patient scored by a map fitted
    on the other folds: cal['cv_mse']); val_mse_cal: calibrated by the map fitted on these same rows
    (in-sample, optimistic: for reading, never for choosing); const_mse: the training mean's MSE;
    val_nmse: val_mse_cv over the labels' variance (evaluation.normalised_mse: comparable across
    pathologies); train_mean: that mean (make_submission.py --labels scores the constant with it).

    val_mse_cv_fallback: None, or "raw" where the rows come from too few patients for any
    cross-validation fold to be scored (cal['cv_mse'] NaN while the raw outputs are finite): then
    val_mse_cv is val_mse. The raw MSE uses no validation label, as a cross-validated score, and it
    follows the model from epoch to epoch; the map that ships there (the constant training mean,
    see fit_calibration) scores the same every epoch, which would pin best.pt to the first epoch
    and stop the run after --patience. So val_mse_cv is NaN only where the outputs themselves are
    not finite (a diverged model); cv_fallback_notice words the fallback for the log."""
    m = ~np.isnan(target)
    p, t = pred[m].astype(np.float64), target[m].astype(np.float64)
    if len(t) == 0:
        return {"n": 0, **{k: float("nan") for k in METRIC_KEYS}, "train_mean": train_mean, "val_mse_cv_fallback": None}
    raw = float(np.mean((np.clip(p, -1, 1) - t) ** 2))
    cv = float(cal["cv_mse"]) if cal else raw
    fallback = "raw" if math.isnan(cv) and math.isfinite(raw) else None
    cv = raw if fallback else cv
    nmse = cv / t.var() if t.var() > 0 else float("nan")
    return {"n": int(len(t)), "val_mse": raw, "val_mse_cv": cv, "val_mse_cv_fallback": fallback, "val_nmse": nmse,
            "val_mse_cal": float(np.mean((apply_calibration(cal, p) - t) ** 2)),
            "const_mse": float(np.mean((train_mean - t) ** 2)), "val_auc": auc(p, t), "train_mean": train_mean}


def cv_fallback_notice(label: str, per: dict) -> str | None:
    """One line naming the pathologies of per (name -> pathology_metrics) whose val_mse_cv fell back
    to the raw MSE; None when none did. label names the model in messages."""
    names = [name for name, m in per.items() if m.get("val_mse_cv_fallback")]
    if not names:
        return None
    which = f" ({', '.join(names)})" if len(per) > 1 else ""
    return (f"{label}: too few validation patients to cross-validate the calibration{which}, so val_mse_cv (and "
            f"val_loss) is the raw outputs' MSE; a larger --val-frac gives a cross-validated score")


def mean_defined(values) -> float:
    """Mean of the values that are defined (not None or NaN); NaN when none is."""
    ok = [float(v) for v in values if v is not None and not math.isnan(v)]
    return sum(ok) / len(ok) if ok else float("nan")


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
    (negatives below + half the negatives tied). counts (B, n_patients) -> (B,).

    The same number as roc_auc_score(pos, score, sample_weight=counts[b, g]) (to 2e-16), for all
    resamples at once. Kept because scikit-learn, called once per resample, is about 60x slower:
    20,000 rows, 1,000 resamples, 9 pathologies took 5.4 s here and 333 s with roc_auc_score on a
    2-core CPU (benchmarks/bench_bootstrap.py)."""
    w = counts[:, g]
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num, den = (wp * (below + 0.5 * wn)).sum(1), wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def metrics_rows(metrics: dict) -> list[dict]:
    """evaluate()'s dict as table rows (METRIC_COLUMNS), one per pathology then a 'macro' row whose
    n is the total of labelled entries; for common.format_table and metrics.csv."""
    rows = []
    for name, v in metrics["per_pathology"].items():
        rows.append({"pathology": name, "n": v["n"], "mse": v["mse"], "mse_lo": v["mse_ci"][0],
                     "mse_hi": v["mse_ci"][1], "nmse": v.get("nmse"), "const_mse": v["const_mse"], "auc": v["auc"],
                     "auc_lo": v["auc_ci"][0], "auc_hi": v["auc_ci"][1]})
    rows.append({"pathology": "macro", "n": sum(r["n"] for r in rows), "mse": metrics["macro"]["mse"],
                 "nmse": metrics["macro"].get("nmse"), "auc": metrics["macro"]["auc"]})
    return rows


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
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)
    (scikit-learn's roc_curve, no point dropped); positives 1 against negatives -1 as in auc().
    Empty arrays when either class is absent."""
    s, pos = _positives_and_negatives(score, target)
    if pos.all() or not pos.any():
        return np.array([]), np.array([])
    fpr, tpr, _ = roc_curve(pos, s, drop_intermediate=False)
    return fpr, tpr


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
