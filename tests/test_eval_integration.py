"""Evaluation wired through the scripts: train.py's val_predictions.csv, split record and curves.png;
make_submission.py --labels / --plots / --blend; experiments/saliency.py's Grad-CAM.

Two tiny training runs on the demo data are made once for the module: run 'a' (one all-view
Cardiomegaly model) and run 'b' (a frontal-only multi-head Cardiomegaly + Pneumonia model with
another head width), both with --seed 0 --val-frac 0.5, so they share one validation split."""
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import evaluation as ev
from runs import PREDICTION_COLUMNS
from calibration import apply_blend
import make_submission
import train
from cache import cached_table, load_image
from common import UserError, run_cli
from dataset import PATHOLOGIES, XrayDataset, read_train_csv, split_by_patient
from experiments import blend, saliency
from calibration import apply_calibration
from model import Checkpoint, build_model, load_checkpoint, model_config
from tests.conftest import TINY

METRIC_KEYS = {"n", "mse", "mse_ci", "nmse", "const_mse", "auc", "auc_ci"}  # SPEC's, and the normalised MSE
B_NAMES = ["Cardiomegaly", "Pneumonia"]


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("eval")
    common = ["--data-root", str(demo_root), "--cache-dir", str(work / "cache"), *TINY, "--arch", "resnet18",
              "--seed", "0", "--val-frac", "0.5"]
    train.main([*common, "--out-dir", str(work / "runs" / "a"), "--pathology", "Cardiomegaly"])
    train.main([*common, "--out-dir", str(work / "runs" / "b"), "--pathology", *B_NAMES, "--multi-head",
                "--view", "frontal", "--hidden", "16"])
    return work


def folder_a(work):
    return work / "runs" / "a" / "cardiomegaly"


def folder_b(work):
    return work / "runs" / "b" / "multi_head_frontal"


def table_and_cache(demo_root, work):
    """The training table exactly as train.py read it (bad images dropped) and its 32 px cache."""
    return cached_table(read_train_csv(demo_root / "student_labels" / "train2023.csv"), demo_root, 32,
                        work / "cache", "train2023", workers=1, progress=False)


def submit(demo_root, work, out, *extra) -> dict:
    return make_submission.main(["--data-root", str(demo_root), "--cache-dir", str(work / "cache"), "--out", str(out),
                                 "--fill-missing", "0", "--workers", "1", "--no-progress", *extra])


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


# ---------------------------------------------------------------------------------------------
# train.py

def test_val_predictions_are_the_best_epochs_raw_and_calibrated_outputs(runs, demo_root):
    table, cache = table_and_cache(demo_root, runs)
    for folder, names in ((folder_a(runs), ["Cardiomegaly"]), (folder_b(runs), B_NAMES)):
        df = pd.read_csv(folder / "val_predictions.csv")
        summary = json.loads((folder / "summary.json").read_text())
        assert list(df.columns) == PREDICTION_COLUMNS
        assert len(df) == summary["n_val"] * len(names)  # one row per validation image and pathology
        assert (df.groupby("pathology").size() == summary["n_val"]).all() and sorted(df.pathology.unique()) == names
        assert not df.duplicated(["path", "pathology"]).any()
        model, ckpt = load_checkpoint(folder / "best.pt")
        for k, name in enumerate(names):
            d = df[df.pathology == name]
            np.testing.assert_array_equal(d.calibrated, apply_calibration(ckpt.calibration[name], d.raw.to_numpy()))
            rows = table.set_index("path").loc[d.path]
            np.testing.assert_array_equal(d.target.to_numpy(), rows[name].to_numpy(np.float64))  # NaN = blank
            assert (rows.patient.to_numpy() == d.patient.to_numpy()).all() and (rows.view == d.view.to_numpy()).all()
            # raw: the best epoch's model on these images
            ds = XrayDataset([cache], rows.slot.to_numpy(), rows[names].to_numpy())
            raw = train.predict(model, ds, 16, train.Runtime(torch.device("cpu"), progress=False))[:, k]
            np.testing.assert_allclose(d.raw, raw, atol=1e-5)
    assert (pd.read_csv(folder_b(runs) / "val_predictions.csv").view == "frontal").all()
    assert pd.read_csv(folder_b(runs) / "val_predictions.csv").target.isna().any()  # blanks stay blank


def test_split_is_recorded_and_shared_by_models_of_one_split(runs, demo_root):
    table, _ = table_and_cache(demo_root, runs)

    def sha(seed):
        val = table["patient"][split_by_patient(table["patient"], 0.5, seed)]
        return hashlib.sha1("\n".join(sorted(val.unique())).encode()).hexdigest()
    splits = [json.loads((f / "summary.json").read_text())["split"] for f in (folder_a(runs), folder_b(runs))]
    assert Checkpoint.load(folder_a(runs) / "best.pt").split == splits[0]
    assert Checkpoint.load(folder_b(runs) / "last.pt").split == splits[1]
    rows = [s.pop("rows_sha1") for s in splits]  # each model's own rows (pathology, view): for --resume
    assert splits[0] == splits[1] == {"seed": 0, "val_frac": 0.5, "val_patients_sha1": sha(0)} and rows[0] != rows[1]
    assert sha(1) != sha(0)


def test_curves_png_and_training_mean_in_the_checkpoint(runs):
    for folder in (folder_a(runs), folder_b(runs)):
        assert png_size(folder / "curves.png") == ev.CURVES_SIZE
    metrics = Checkpoint.load(folder_a(runs) / "best.pt").metrics["per_pathology"]["Cardiomegaly"]
    summary = json.loads((folder_a(runs) / "summary.json").read_text())
    assert metrics["n_train"] == summary["n_train"] and -1 <= metrics["train_mean"] <= 1


# ---------------------------------------------------------------------------------------------
# make_submission.py --labels, --plots

def by_hand(sub: pd.DataFrame, labels: pd.DataFrame, name: str) -> tuple[int, float]:
    """(n, MSE) of the written CSV's column against the labels (uncertain 0 counts, blank does not)."""
    t = labels.loc[sub.index, name].to_numpy(np.float64)
    m = ~np.isnan(t)
    return int(m.sum()), float(np.mean((sub[name].to_numpy()[m] - t[m]) ** 2))


def test_labels_with_ids_scores_the_written_csv_and_plots(runs, demo_root):
    labels_csv = demo_root / "student_labels" / "test_labels.csv"
    out = runs / "id_labels" / "sub.csv"
    result = submit(demo_root, runs, out, "--checkpoints", str(runs / "runs" / "a"), "--test-csv", str(labels_csv),
                    "--labels", str(labels_csv), "--plots", str(runs / "id_labels" / "plots"))
    js = json.loads((out.parent / "metrics.json").read_text())
    assert set(js) == {"per_pathology", "macro"} and set(js["macro"]) == {"mse", "nmse", "auc"}
    assert list(js["per_pathology"]) == PATHOLOGIES and all(set(v) == METRIC_KEYS for v in js["per_pathology"].values())
    sub = pd.read_csv(out).set_index("Id")
    labels = pd.read_csv(labels_csv).set_index("Id")
    for name in PATHOLOGIES:
        n, mse = by_hand(sub, labels, name)
        assert js["per_pathology"][name]["n"] == n and js["per_pathology"][name]["mse"] == pytest.approx(mse, rel=1e-12)
    train_mean = Checkpoint.load(folder_a(runs) / "best.pt").metrics["per_pathology"]["Cardiomegaly"]["train_mean"]
    t = labels["Cardiomegaly"].dropna().to_numpy()
    assert js["per_pathology"]["Cardiomegaly"]["const_mse"] == pytest.approx(np.mean((train_mean - t) ** 2))
    assert js["per_pathology"]["Pneumonia"]["const_mse"] is None  # filled, no model: no training mean
    assert js["macro"]["mse"] == pytest.approx(np.mean([js["per_pathology"][n]["mse"] for n in PATHOLOGIES]))
    assert result["metrics"]["macro"]["mse"] == js["macro"]["mse"]
    table = pd.read_csv(out.parent / "metrics.csv")
    assert list(table.columns) == ev.METRIC_COLUMNS and list(table.pathology) == [*PATHOLOGIES, "macro"]
    make_submission.check_submission(out, labels.index)
    # --plots: a ROC curve and a reliability diagram per labelled pathology
    plotted = sorted(p.name for p in (runs / "id_labels" / "plots").iterdir())
    assert plotted == sorted(p.name for p in result["plots"])
    assert "roc_cardiomegaly.png" in plotted and "reliability_cardiomegaly.png" in plotted
    assert all(png_size(p) == ev.PLOT_SIZE for p in result["plots"])


def test_label_ids_not_in_the_test_csv_are_an_error_naming_them(runs, demo_root):
    labels_csv = demo_root / "student_labels" / "test_labels.csv"
    solution = pd.read_csv(demo_root / "student_labels" / "solution_ids.csv")
    with pytest.raises(UserError, match=rf"Ids are not in .*test_ids.csv \(e.g. {solution.Id.min()}"):
        submit(demo_root, runs, runs / "bad_ids" / "sub.csv", "--checkpoints", str(runs / "runs" / "a"),
               "--labels", str(labels_csv))
    assert not (runs / "bad_ids" / "sub.csv").exists()


def test_a_bad_value_in_the_labels_file_is_an_error_naming_line_and_column(runs, demo_root, tmp_path):
    labels = pd.read_csv(demo_root / "student_labels" / "test_labels.csv", dtype=str, keep_default_na=False)
    labels.loc[2, "Pneumonia"] = "maybe"
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(UserError, match=r"--labels .*labels.csv: line 4, column 'Pneumonia': invalid label 'maybe'"):
        submit(demo_root, runs, tmp_path / "sub.csv", "--checkpoints", str(runs / "runs" / "a"),
               "--test-csv", str(tmp_path / "labels.csv"), "--labels", str(tmp_path / "labels.csv"))


def test_labels_in_training_layout_predicts_its_own_images(runs, demo_root, tmp_path):
    train_csv = pd.read_csv(demo_root / "student_labels" / "train2023.csv", dtype=str, keep_default_na=False)
    missing = train_csv[train_csv.Path.str.startswith("train/pid80000")]
    sliced = pd.concat([train_csv.iloc[:24], missing])  # a held-out slice, one of its images missing
    sliced.to_csv(tmp_path / "heldout.csv", index=False)
    with pytest.warns(UserWarning, match="dropped 1 rows whose image is missing"):
        result = submit(demo_root, runs, tmp_path / "out" / "sub.csv", "--checkpoints", str(runs / "runs" / "a"),
                        "--labels", str(tmp_path / "heldout.csv"))
    sub = pd.read_csv(tmp_path / "out" / "sub.csv").set_index("Id")
    assert list(sub.index) == list(range(24))  # Ids are the slice's rows; the missing image is left out
    labels = sliced.iloc[:24][PATHOLOGIES].replace("", np.nan).astype(float).set_axis(range(24))
    js = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for name in PATHOLOGIES:
        n, mse = by_hand(sub, labels, name)
        assert js["per_pathology"][name]["n"] == n and js["per_pathology"][name]["mse"] == pytest.approx(mse, rel=1e-12)
    # the same file read with Stanford's convention: 0 and -1 swap, so the scores change
    with pytest.warns(UserWarning):
        swapped = submit(demo_root, runs, tmp_path / "out2" / "sub.csv", "--checkpoints", str(runs / "runs" / "a"),
                         "--labels", str(tmp_path / "heldout.csv"), "--label-convention", "chexpert")
    flipped = labels.replace({0.0: -1.0, -1.0: 0.0})
    assert swapped["metrics"]["per_pathology"]["Pleural Effusion"]["mse"] == pytest.approx(
        by_hand(sub, flipped, "Pleural Effusion")[1], rel=1e-12)
    assert swapped["metrics"]["macro"]["mse"] != result["metrics"]["macro"]["mse"]
    with pytest.raises(UserError, match="its own images are predicted; drop --test-csv"):
        submit(demo_root, runs, tmp_path / "out3" / "sub.csv", "--checkpoints", str(runs / "runs" / "a"),
               "--labels", str(tmp_path / "heldout.csv"), "--test-csv", str(demo_root / "student_labels" / "test_ids.csv"))


def test_plots_without_labels_is_rejected():
    with pytest.raises(SystemExit) as e:
        make_submission.parse_args(["--plots", "somewhere"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# experiments/blend.py -> make_submission.py --blend

def test_blend_end_to_end_applies_the_learned_blend(runs, demo_root, capsys):
    labels_csv = demo_root / "student_labels" / "test_labels.csv"
    parent = runs / "runs"
    blend_json = runs / "blend.json"
    fitted = blend.main(["--runs", str(parent / "a"), str(parent / "b"), "--out", str(blend_json),
                         "--min-rows", "10", "--folds", "2", "--no-progress"])
    card = fitted["pathologies"]["Cardiomegaly"]
    assert card["members"] == ["a/cardiomegaly", "b/multi_head_frontal"]
    assert fitted["pathologies"]["Pneumonia"]["members"] == ["b/multi_head_frontal"]

    # each member's raw output per test image (the blend calibrates them itself)
    from dataset import read_test_csv
    test_table, test_cache = cached_table(read_test_csv(labels_csv), demo_root, 32, runs / "cache", "test_labels",
                                          workers=1, progress=False)
    rt = train.Runtime(torch.device("cpu"), progress=False)
    alone = {}
    for m in card["members"]:
        model, ckpt = load_checkpoint(parent / m / "best.pt")
        data = XrayDataset([test_cache], test_table["slot"].to_numpy(), np.zeros((len(test_table), 1)))
        alone[m] = train.predict(model, data, 16, rt)[:, ckpt.pathologies.index("Cardiomegaly")]
    capsys.readouterr()
    out = runs / "blended" / "sub.csv"
    result = submit(demo_root, runs, out, "--checkpoints", str(parent), "--blend", str(blend_json),
                    "--test-csv", str(labels_csv), "--labels", str(labels_csv), "--study-fusion")
    assert "--study-fusion: not applied to Cardiomegaly, Pneumonia" in capsys.readouterr().out
    test = pd.read_csv(labels_csv)
    make_submission.check_submission(out, test.Id)
    views = np.where(test.Path.str.contains("lateral"), "lateral", "frontal")
    studies = test.Path.str.rsplit("/", n=1).str[0].to_numpy()
    assert (test_table["Id"].to_numpy() == test.Id.to_numpy()).all()
    P = np.stack([alone[m] for m in card["members"]], axis=1)
    P[views == "lateral", 1] = np.nan  # the frontal-only member does not predict lateral images
    expected = apply_blend(card, P, studies, views)
    got = pd.read_csv(out).set_index("Id").loc[test.Id, "Cardiomegaly"].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)  # float32 outputs, predicted in other batches
    assert (views == "lateral").any() and (views == "frontal").any()
    js = json.loads((out.parent / "metrics.json").read_text())
    assert js["per_pathology"]["Cardiomegaly"]["mse"] == pytest.approx(
        by_hand(pd.read_csv(out).set_index("Id"), test.set_index("Id"), "Cardiomegaly")[1], rel=1e-12)
    assert result["metrics"]["per_pathology"]["Cardiomegaly"]["n"] > 0


def test_blend_member_missing_is_one_clear_error(runs, demo_root, tmp_path):
    parent = tmp_path / "runs"
    shutil.copytree(runs / "runs" / "a", parent / "a")  # run b is not here
    entry = {"members": ["a/cardiomegaly", "b/multi_head_frontal"], "weights": [0.5, 0.5], "lambda": None,
             "a": 1.0, "b": 0.0, "w_frontal": None}
    (tmp_path / "blend.json").write_text(json.dumps({"version": 1, "pathologies": {"Cardiomegaly": entry}}))
    with pytest.raises(UserError, match=r"no checkpoint for member b/multi_head_frontal \(no .*b/multi_head_frontal/"
                                        r"best.pt\)"):
        submit(demo_root, runs, tmp_path / "sub.csv", "--checkpoints", str(parent), "--blend",
               str(tmp_path / "blend.json"))
    assert not (tmp_path / "sub.csv").exists()


# ---------------------------------------------------------------------------------------------
# experiments/saliency.py

class BlobNet(nn.Module):
    """A small convnet with XrayNet's interface (feature_map, from_feature_map, score): uint8
    (B, 1, 32, 32) -> an 8 x 8 feature map -> tanh of a linear head on its mean. Trains in a second."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(16, 1)

    def feature_map(self, x):
        return self.features(x.float() / 255.0 - 0.5)

    def from_feature_map(self, f):
        return torch.tanh(self.head(f.mean(dim=(2, 3))))

    def score(self, out):
        return out

    def forward(self, x):
        return self.from_feature_map(self.feature_map(x))


def blob_images(rng, n: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, size, size) noise; every other image (label 1) has a bright disk at a random place
    inside the top-right quadrant (top-right, not top-left: a transposed map would miss it)."""
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for i in range(n):
        img = rng.normal(110, 20, (size, size))
        if i % 2 == 0:
            r = size // 10
            cy, cx = rng.integers(r, size // 2 - r), rng.integers(size // 2 + r, size - r)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 250
        images.append(np.clip(img, 0, 255).astype(np.uint8))
        labels.append(1.0 if i % 2 == 0 else -1.0)
    return np.stack(images), np.array(labels)


def test_grad_cam_peaks_where_the_signal_is():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images, labels = blob_images(rng, 64)
    x, y = torch.from_numpy(images[:, None]), torch.from_numpy(labels).float() * 0.8
    net = BlobNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        loss = F.mse_loss(net(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_images, test_labels = blob_images(rng, 16)
    maps, scores = saliency.grad_cam(net, torch.from_numpy(test_images[:, None]), [0])
    pos = test_labels == 1
    assert (scores[pos, 0] > 0.5).all() and (scores[~pos, 0] < -0.5).all()  # it learned the blob
    assert maps.shape == (16, 1, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    for m in maps[pos, 0]:
        r, c = np.unravel_index(m.argmax(), m.shape)
        assert r < 16 and c >= 16, (r, c)  # the peak is in the top-right quadrant
        assert m[:16, 16:].sum() > 0.75 * m.sum()  # most of the heat is there too


@pytest.fixture(scope="module")
def two_head_checkpoint(tmp_path_factory) -> tuple:
    """An untrained two-head resnet18 checkpoint at 64 px with an affine map on one head."""
    folder = tmp_path_factory.mktemp("saliency")
    torch.manual_seed(0)
    model = build_model(model_config(B_NAMES, "auto", hidden=8, dropout=0.0, arch="resnet18"))
    cal = {"Cardiomegaly": {"kind": "affine", "a": 0.5, "b": 0.1}, "Pneumonia": None}
    path = folder / "best.pt"
    Checkpoint.of(model, epoch=1, calibration=cal, preprocess={"image_size": 64, "square": "resize", "mean": 0.449,
                                                               "std": 0.226, "uncertain": "keep"}).save(path)
    return path, cal


def test_saliency_writes_one_png_per_image_and_head(two_head_checkpoint, tmp_path):
    ckpt_path, cal = two_head_checkpoint
    rng = np.random.default_rng(1)
    images = []
    for pid, ext in (("pid1", "png"), ("pid2", "jpg")):  # two files named alike in different studies
        path = tmp_path / "data" / pid / "study1" / f"view1_frontal.{ext}"
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (80, 70), dtype=np.uint8)).save(path)
        images.append(path)
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "data").rglob("*"))
    results = saliency.main(["--checkpoint", str(ckpt_path), "--images", *map(str, images), "--out",
                             str(tmp_path / "out"), "--no-progress"])
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "data").rglob("*")) == before  # inputs untouched
    assert [(r["image"], r["pathology"]) for r in results] == [(i, n) for i in images for n in B_NAMES]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(r["png"].name for r in results)
    assert len({r["png"] for r in results}) == 4 and "pid2_study1_view1_frontal_pneumonia.png" in {
        r["png"].name for r in results}
    for r in results:
        assert png_size(r["png"]) == saliency.PNG_SIZE and r["cam"].shape == (64, 64)
    # the title's score is the calibrated output, as make_submission.py writes it
    model, _ = load_checkpoint(ckpt_path)
    with torch.no_grad():
        raw = model.score(model(torch.tensor(load_image(images[0], 64))[None, None])).numpy()[0]
    assert results[0]["raw"] == pytest.approx(raw[0], abs=1e-5)
    assert results[0]["score"] == pytest.approx(float(apply_calibration(cal["Cardiomegaly"], raw[0])), abs=1e-5)

    one = saliency.main(["--checkpoint", str(ckpt_path), "--images", str(images[0]), "--out", str(tmp_path / "one"),
                         "--pathology", "pneumonia", "--no-progress"])
    assert [r["pathology"] for r in one] == ["Pneumonia"]
    with pytest.raises(UserError, match="--pathology Fracture: .* predicts Cardiomegaly, Pneumonia"):
        saliency.main(["--checkpoint", str(ckpt_path), "--images", str(images[0]), "--out", str(tmp_path / "x"),
                       "--pathology", "Fracture", "--no-progress"])
    with pytest.raises(SystemExit) as stop:  # every --images path is checked before the checkpoint is read
        saliency.main(["--checkpoint", str(ckpt_path), "--images", str(tmp_path / "nope.jpg"), "--out",
                       str(tmp_path / "x"), "--no-progress"])
    assert stop.value.code == 2 and not (tmp_path / "x").exists()


def test_saliency_ends_with_a_table_and_marks_an_empty_map(tmp_path, capsys):
    """A head whose output does not depend on the image (its weights zero) has a zero gradient, so a
    map that is zero everywhere: marked 'empty' in the table and the closing line, not an unexplained
    blank picture; the other head's map peaks somewhere and the table says where."""
    torch.manual_seed(0)
    model = build_model(model_config(B_NAMES, "auto", hidden=8, dropout=0.0, arch="resnet18"))
    with torch.no_grad():
        for p in model.heads[0].parameters():
            p.zero_()
    Checkpoint.of(model, epoch=1, calibration={}, preprocess={"image_size": 64, "square": "resize", "mean": 0.449,
                                                             "std": 0.226, "uncertain": "keep"}).save(tmp_path / "best.pt")
    image = tmp_path / "data" / "pid1" / "study1" / "view1_frontal.png"
    image.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)).save(image)
    capsys.readouterr()
    dead, live = saliency.main(["--checkpoint", str(tmp_path / "best.pt"), "--images", str(image), "--out",
                                str(tmp_path / "out"), "--no-progress"])
    assert live["cam"].max() == pytest.approx(1.0) and not dead["cam"].any()
    out = capsys.readouterr().out.splitlines()
    row = {line.split()[1]: line for line in out if line.startswith("pid1/study1/view1_frontal.png")}
    y, x = np.unravel_index(live["cam"].argmax(), live["cam"].shape)
    assert f"y {y / 64:.2f}, x {x / 64:.2f}" in row["Pneumonia"] and " empty " in row["Cardiomegaly"]
    assert out[-1] == (f"wrote 2 heatmaps to {tmp_path / 'out'}; 1 are empty: Grad-CAM shows what raises a score, "
                       "and nothing in those images raises it (usual where the model scores an image low)")


def test_saliency_on_cuda_without_a_gpu_is_one_clear_line(two_head_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    Image.fromarray(np.zeros((40, 40), dtype=np.uint8)).save(tmp_path / "x.png")
    code = run_cli(saliency.main, ["--checkpoint", str(two_head_checkpoint[0]), "--images", str(tmp_path / "x.png"),
                                   "--out", str(tmp_path / "out"), "--device", "cuda", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: --device cuda: no CUDA device is visible (try --device cpu)"
