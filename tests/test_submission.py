"""make_submission.py: the checked CSV, routing by view, calibration maps, multi-head checkpoints.

Most tests use a five-image test set of 32 px PNGs and checkpoints made without training, whose
heads output a known constant (final layer weight 0, bias atanh(c)); building a ResNet-50 and
saving it is the slow part, so each distinct checkpoint is made once per module and hard-linked
into each test's checkpoint folder."""
import contextlib
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import evaluation
import make_submission
import train
from cache import cached_table
from common import UserError
from dataset import PATHOLOGIES, XrayDataset, read_train_csv, split_by_patient
from calibration import MIN_SLOPE, apply_calibration
from model import Checkpoint, build_model, load_checkpoint, model_config

ROOT = Path(__file__).resolve().parents[1]
HEADER = "Id," + ",".join(PATHOLOGIES)
# (Id, path); study pid1/study1 has both views; pid2's image is the only one not mirror-symmetric
TINY_ROWS = [(11, "test/pid1/study1/view1_frontal.png"), (5, "test/pid1/study1/view2_lateral.png"),
             (42, "test/pid2/study1/view1_frontal.png"), (7, "test/pid3/study1/view1_lateral.png"),
             (100, "test/pid3/study2/view1_frontal.png")]
FRONTAL = np.array(["frontal" in p for _, p in TINY_ROWS])
ASYMMETRIC = np.array(["pid2" in p for _, p in TINY_ROWS])


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """Five 32 x 32 PNG radiographs and their test_ids.csv (Ids not contiguous, not sorted)."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    rng = np.random.default_rng(0)
    for _, rel in TINY_ROWS:
        img = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        if "pid2" not in rel:
            img = np.concatenate([img[:, :16], img[:, :16][:, ::-1]], axis=1)  # mirror-symmetric
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / rel)
    (root / "student_labels").mkdir()
    pd.DataFrame(TINY_ROWS, columns=["Id", "Path"]).to_csv(root / "student_labels" / "test_ids.csv", index=False)
    return root


@pytest.fixture(scope="module")
def ckpt_store(tmp_path_factory):
    """store(names, view, const=..., calibration=..., seed=...) -> path of a checkpoint made once.

    const: each head outputs exactly that value (one value, or one per head); None: a random model
    whose outputs are kept away from tanh's saturation."""
    folder = tmp_path_factory.mktemp("ckpt_store")
    made: dict[str, Path] = {}

    def store(names, view="all", const=None, calibration=None, seed=0) -> Path:
        key = repr((names, view, const, calibration, seed))
        if key not in made:
            torch.manual_seed(seed)
            model = build_model(model_config(list(names), "auto", hidden=8, dropout=0.0))
            consts = [const] * len(names) if isinstance(const, (int, float)) else const
            with torch.no_grad():
                for k, head in enumerate(model.heads):
                    if consts is None:
                        head[-1].weight.mul_(0.02)
                    else:
                        head[-1].weight.zero_()
                        head[-1].bias.fill_(math.atanh(consts[k]))
            metrics = {"per_pathology": {n: {"n": 10, "val_mse": 0.5, "val_mse_cal": 0.25, "const_mse": 0.75,
                                             "val_auc": 0.875} for n in names}}
            made[key] = folder / f"{len(made)}.pt"
            Checkpoint.of(model, **{
                "view": view, "epoch": 1, "metrics": metrics, "train_config": {},
                "preprocess": {"image_size": 32, "square": "resize", "mean": 0.449, "std": 0.226, "uncertain": "keep"},
                "calibration": {n: (calibration or {}).get(n) for n in names}}).save(made[key])
        return made[key]
    return store


def install(folder: Path, **ckpts: Path) -> Path:
    """install(folder, cardiomegaly=path, ...) -> folder/<name>/best.pt hard-linked to each path."""
    for name, src in ckpts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        os.link(src, folder / name / "best.pt")
    return folder


def run(tiny_root, tmp_path, ckpts: Path, *extra) -> dict:
    return make_submission.main(["--data-root", str(tiny_root), "--checkpoints", str(ckpts), "--out",
                                 str(tmp_path / "sub.csv"), "--cache-dir", str(tmp_path.parent / "cache"),
                                 "--workers", "1", "--batch-size", "8", "--no-progress", *extra])


def read(tmp_path) -> pd.DataFrame:
    """The written CSV in the tiny test CSV's row order (the file may be in any order)."""
    df = pd.read_csv(tmp_path / "sub.csv")
    return df.set_index("Id").loc[[i for i, _ in TINY_ROWS]]


def no_csv(tmp_path) -> bool:
    return not any(p.name.startswith(("sub.csv", ".sub.csv")) for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# the CSV and its checks

BASIC_HEADS = ["Fracture", "Cardiomegaly", "No Finding"]  # not the CSV's column order, on purpose
BASIC_CONSTS = [-0.25, 0.5, 0.75]


@pytest.fixture(scope="module")
def basic(tiny_root, tmp_path_factory, ckpt_store):
    """One run, several assertions: a multi-head checkpoint in a folder whose name says nothing,
    two checkpoints whose calibration maps push outputs past 1 and -1, --fill-missing for the rest.
    Returns (result of main, written CSV in TINY_ROWS order, its text, what it printed)."""
    tmp = tmp_path_factory.mktemp("basic")
    up = {"Pneumonia": {"kind": "affine", "a": 1.0, "b": 5.0}}
    down = {"Pleural Other": {"kind": "affine", "a": 3.0, "b": -2.0}}
    ckpts = install(tmp / "ckpt", whatever=ckpt_store(BASIC_HEADS, const=BASIC_CONSTS),
                    pneumonia=ckpt_store(["Pneumonia"], const=0.5, calibration=up),
                    pleural_other=ckpt_store(["Pleural Other"], const=0.2, calibration=down))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = run(tiny_root, tmp, ckpts, "--fill-missing", "-0.5")
    return result, read(tmp), (tmp / "sub.csv").read_text(), out.getvalue()


def test_exact_header(basic):
    assert basic[2].splitlines()[0] == HEADER
    assert basic[2].splitlines()[0] == "Id,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity," \
                                       "Pneumonia,Pleural Effusion,Pleural Other,Fracture,Support Devices"


def test_ids_match_the_test_csv(basic):
    ids = pd.read_csv(io.StringIO(basic[2]))["Id"]
    assert sorted(ids) == sorted(i for i, _ in TINY_ROWS) and len(ids) == len(TINY_ROWS)


def test_multi_head_checkpoint_feeds_columns_by_name(basic):
    for name, c in zip(BASIC_HEADS, BASIC_CONSTS):
        np.testing.assert_allclose(basic[1][name], c, atol=1e-6)


def test_calibrated_values_are_clipped(basic):
    assert (basic[1]["Pneumonia"] == 1.0).all()       # 0.5 + 5 -> 1
    assert (basic[1]["Pleural Other"] == -1.0).all()  # 3 * 0.2 - 2 -> -1


def test_fill_missing(basic):
    filled = [p for p in PATHOLOGIES if p not in BASIC_HEADS + ["Pneumonia", "Pleural Other"]]
    assert (basic[1][filled].to_numpy() == -0.5).all()


def test_summary_table(basic):
    result, _, _, printed = basic
    assert "whatever/best.pt" in printed and "--fill-missing -0.5" in printed and "0.8750" in printed  # AUC
    rows = [r for r in result["rows"] if r["pathology"] == "Cardiomegaly"]
    assert [(r["view"], r["source"], r["images"]) for r in rows] == [
        ("frontal", "whatever/best.pt", FRONTAL.sum()), ("lateral", "whatever/best.pt", (~FRONTAL).sum())]
    assert rows[0]["val_auc"] == 0.875 and rows[0]["val_mse_cal"] == 0.25
    assert rows[0]["mean"] == pytest.approx(0.5, abs=1e-6) and rows[0]["max"] == pytest.approx(0.5, abs=1e-6)
    filled = next(r for r in result["rows"] if r["pathology"] == "Lung Opacity")
    assert filled["source"] == "--fill-missing -0.5" and filled["images"] == len(TINY_ROWS)


def test_ids_in_any_order_are_accepted_and_wrong_ids_rejected(tmp_path):
    ids = [1001, 1004, 1010]
    good = pd.DataFrame({"Id": ids[::-1], **{p: [0.0, 0.5, -1.0] for p in PATHOLOGIES}})
    good.to_csv(tmp_path / "good.csv", index=False)
    make_submission.check_submission(tmp_path / "good.csv", ids)
    for bad, message in [(good.iloc[:2], "1 test Ids missing"), (good.assign(Id=[1001, 1004, 7]), "1 extra"),
                         (good.assign(Fracture=[0.0, 1.5, 0.0]), "not finite in [-1, 1]"),
                         (good.assign(Fracture=[0.0, np.nan, 0.0]), "not finite in [-1, 1]"),
                         (good.rename(columns={"Fracture": "fracture"}), "header is")]:
        bad.to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            make_submission.check_submission(tmp_path / "bad.csv", ids)


def test_missing_model_is_an_error_naming_it(tiny_root, tmp_path, ckpt_store):
    ckpts = install(tmp_path / "ckpt", cardiomegaly=ckpt_store(["Cardiomegaly"], const=0.25))
    with pytest.raises(UserError, match="no checkpoint under .* for No Finding, Enlarged Cardiomediastinum, "
                                        "Lung Opacity, .*Support Devices; .*--fill-missing") as e:
        run(tiny_root, tmp_path, ckpts)
    assert "Cardiomegaly," not in str(e.value)
    assert no_csv(tmp_path)


def test_duplicate_checkpoints_error_or_ensemble(tiny_root, tmp_path, ckpt_store):
    ckpts = install(tmp_path / "ckpt", a=ckpt_store(["Cardiomegaly"], const=0.25),
                    b=ckpt_store(["Cardiomegaly"], const=-0.75))
    with pytest.raises(UserError, match=r"2 checkpoints for Cardiomegaly \(view all\): a/best.pt, b/best.pt; .*--ensemble"):
        run(tiny_root, tmp_path, ckpts, "--fill-missing", "0")
    assert no_csv(tmp_path)
    result = run(tiny_root, tmp_path, ckpts, "--fill-missing", "0", "--ensemble")
    np.testing.assert_allclose(read(tmp_path)["Cardiomegaly"], (0.25 - 0.75) / 2, atol=1e-6)
    assert {r["source"] for r in result["rows"] if r["pathology"] == "Cardiomegaly"} == {"a/best.pt", "b/best.pt"}


def test_missing_test_image_is_an_error_naming_it(tiny_root, tmp_path, ckpt_store):
    ckpts = install(tmp_path / "ckpt", cardiomegaly=ckpt_store(["Cardiomegaly"], const=0.25))
    csv = tmp_path / "ids.csv"
    pd.DataFrame(TINY_ROWS + [(3, "test/pid9/study1/view1_frontal.png")], columns=["Id", "Path"]).to_csv(csv, index=False)
    with pytest.raises(UserError, match=r"1 image\(s\) missing or unreadable .*test/pid9/study1/view1_frontal.png \(missing\)"):
        run(tiny_root, tmp_path, ckpts, "--fill-missing", "0", "--test-csv", str(csv))
    assert no_csv(tmp_path)


def test_corrupt_checkpoint_is_an_error_naming_the_file(tiny_root, tmp_path, ckpt_store):
    good = ckpt_store(["Cardiomegaly"], const=0.25)
    with open(good, "rb") as f:
        head = f.read(4096)
    for name, data in [("garbage", b"not a checkpoint at all"), ("truncated", head)]:
        folder = tmp_path / name
        install(folder, cardiomegaly=good)
        (folder / "a_broken").mkdir()  # loaded first (sorted), so no model is built before the error
        (folder / "a_broken" / "best.pt").write_bytes(data)
        with pytest.raises(UserError, match=rf"{folder / 'a_broken' / 'best.pt'}: corrupt or truncated checkpoint"):
            run(tiny_root, tmp_path, folder, "--fill-missing", "0")
    assert no_csv(tmp_path)


def test_checkpoint_for_other_preprocessing_is_an_error_naming_it(tiny_root, tmp_path, ckpt_store):
    ckpt = torch.load(ckpt_store(["Cardiomegaly"], const=0.25), mmap=True, weights_only=True)
    ckpt["preprocess"] = {**ckpt["preprocess"], "square": "letterbox"}
    (tmp_path / "ckpt" / "odd").mkdir(parents=True)
    torch.save(ckpt, tmp_path / "ckpt" / "odd" / "best.pt")
    with pytest.raises(UserError, match=r"odd/best.pt: made for preprocessing this code does not support"):
        run(tiny_root, tmp_path, tmp_path / "ckpt", "--fill-missing", "0")


# ---------------------------------------------------------------------------------------------
# routing by view (issue 9), study fusion, TTA

def test_only_a_lateral_model(tiny_root, tmp_path, ckpt_store):
    """Frontal rows get the fill value, lateral rows the model."""
    ckpts = install(tmp_path / "ckpt", cardiomegaly_lateral=ckpt_store(["Cardiomegaly"], "lateral", const=0.625))
    result = run(tiny_root, tmp_path, ckpts, "--fill-missing", "-0.125")
    col = read(tmp_path)["Cardiomegaly"].to_numpy()
    np.testing.assert_allclose(col[~FRONTAL], 0.625, atol=1e-6)
    assert (col[FRONTAL] == -0.125).all()
    rows = {(r["view"], r["source"]): r["images"] for r in result["rows"] if r["pathology"] == "Cardiomegaly"}
    assert rows == {("lateral", "cardiomegaly_lateral/best.pt"): 2, ("frontal", "--fill-missing -0.125"): 3}


def test_view_model_preferred_and_combine_average(tiny_root, tmp_path, ckpt_store):
    ckpts = install(tmp_path / "ckpt", cardiomegaly=ckpt_store(["Cardiomegaly"], "all", const=0.25),
                    cardiomegaly_lateral=ckpt_store(["Cardiomegaly"], "lateral", const=0.625))
    run(tiny_root, tmp_path, ckpts, "--fill-missing", "0")
    col = read(tmp_path)["Cardiomegaly"].to_numpy()
    np.testing.assert_allclose(col[~FRONTAL], 0.625, atol=1e-6)
    np.testing.assert_allclose(col[FRONTAL], 0.25, atol=1e-6)
    result = run(tiny_root, tmp_path, ckpts, "--fill-missing", "0", "--combine", "average")
    col = read(tmp_path)["Cardiomegaly"].to_numpy()
    np.testing.assert_allclose(col[~FRONTAL], (0.625 + 0.25) / 2, atol=1e-6)
    np.testing.assert_allclose(col[FRONTAL], 0.25, atol=1e-6)
    lateral = {r["source"] for r in result["rows"] if r["pathology"] == "Cardiomegaly" and r["view"] == "lateral"}
    assert lateral == {"cardiomegaly/best.pt", "cardiomegaly_lateral/best.pt"}


def test_uncovered_view_is_an_error_naming_pathology_and_view(tiny_root, tmp_path, ckpt_store):
    ckpts = install(tmp_path / "ckpt", multi_head_lateral=ckpt_store(PATHOLOGIES, "lateral", const=0.5))
    with pytest.raises(UserError, match=r"No Finding: no checkpoint covers frontal images \(3 test images, e.g. "
                                        r"test/pid1/study1/view1_frontal.png\); .*--view frontal"):
        run(tiny_root, tmp_path, ckpts)
    assert no_csv(tmp_path)


def test_study_fusion_after_routing_equal_within_a_study(tiny_root, tmp_path, ckpt_store):
    """Pleural Effusion: frontal images routed to -0.5, lateral ones to 0.75, then fused per study.
    Cardiomegaly (lateral model only): a frontal image takes its study's lateral prediction; the
    fill value never enters an average, and studies without a lateral image keep it."""
    ckpts = install(tmp_path / "ckpt", pe_frontal=ckpt_store(["Pleural Effusion"], "frontal", const=-0.5),
                    pe_lateral=ckpt_store(["Pleural Effusion"], "lateral", const=0.75),
                    cardiomegaly_lateral=ckpt_store(["Cardiomegaly"], "lateral", const=0.625))
    result = run(tiny_root, tmp_path, ckpts, "--fill-missing", "-0.125", "--study-fusion")
    df = read(tmp_path)
    col = df["Pleural Effusion"]
    np.testing.assert_allclose(col[[11, 5]], (-0.5 + 0.75) / 2, atol=1e-6)  # pid1/study1: one value
    assert col[7] == pytest.approx(0.75, abs=1e-6) and col[100] == pytest.approx(-0.5, abs=1e-6)  # pid3: two studies
    assert col[42] == pytest.approx(-0.5, abs=1e-6)
    for study in ([11, 5], [42], [7], [100]):
        assert (df.loc[study].nunique() == 1).all()
    col = df["Cardiomegaly"]
    np.testing.assert_allclose(col[[11, 5, 7]], 0.625, atol=1e-6)
    assert (col[[42, 100]] == -0.125).all()
    fused = [r for r in result["rows"] if r["pathology"] == "Cardiomegaly" and r["source"] == "study fusion"]
    assert [(r["view"], r["images"]) for r in fused] == [("frontal", 1)]


def test_tta_flip_of_a_mirror_symmetric_image_changes_nothing(tiny_root, tmp_path, ckpt_store):
    ckpts = install(tmp_path / "ckpt", cardiomegaly=ckpt_store(["Cardiomegaly"], seed=1))
    run(tiny_root, tmp_path, ckpts, "--fill-missing", "0")
    plain = read(tmp_path)["Cardiomegaly"].to_numpy()
    run(tiny_root, tmp_path, ckpts, "--fill-missing", "0", "--tta", "flip")
    flipped = read(tmp_path)["Cardiomegaly"].to_numpy()
    assert np.abs(plain).max() < 0.99                              # not saturated, so a change would show
    np.testing.assert_array_equal(flipped[~ASYMMETRIC], plain[~ASYMMETRIC])
    assert abs(flipped[ASYMMETRIC][0] - plain[ASYMMETRIC][0]) > 1e-6  # TTA does act on the asymmetric one


# ---------------------------------------------------------------------------------------------
# multi-head checkpoints (issue 6) and calibration maps (issue 8)

def test_trained_multi_head_applies_its_calibration_maps(demo_root, tiny_args, tmp_path):
    """Train a tiny lateral multi-head model; a test CSV of its validation images must get exactly
    the calibrated validation predictions (apply_calibration of each head's map on its raw output)."""
    names = ["Cardiomegaly", "Support Devices"]
    # seed 2: the guard picks a map that moves the outputs (on ~10 rows it often keeps them as they are)
    train.main(tiny_args("--pathology", *names, "--multi-head", "--view", "lateral", "--val-frac", "0.5",
                         "--seed", "2", "--arch", "resnet18"))
    ckpt_path = tmp_path / "ckpt" / "multi_head_lateral" / "best.pt"
    model, ckpt = load_checkpoint(ckpt_path)
    assert ckpt.pathologies == names and ckpt.view == "lateral"

    # the validation rows exactly as train.py chose them: same table, same patient split
    table, cache = cached_table(read_train_csv(demo_root / "student_labels" / "train2023.csv"), demo_root, 32,
                                tmp_path / "cache", "train2023", workers=1, progress=False)
    is_val = split_by_patient(table["patient"], 0.5, 2)
    val = table[is_val & (table["view"] == "lateral").to_numpy() & table[names].notna().any(axis=1).to_numpy()]
    assert len(val) >= 2
    rt = train.Runtime(torch.device("cpu"), progress=False)
    raw = train.predict(model, XrayDataset([cache], val["slot"].to_numpy(), val[names].to_numpy()), 16, rt)
    expected = np.stack([apply_calibration(ckpt.calibration[n], raw[:, k]) for k, n in enumerate(names)], 1)
    fitted = [n for n in names if ckpt.calibration[n] is not None]
    assert fitted, "no head got a calibration map: the test would prove nothing"
    assert any(np.abs(expected[:, names.index(n)] - np.clip(raw[:, names.index(n)], -1, 1)).max() > 1e-3 for n in fitted)

    ids = 2 * np.arange(len(val)) + 501
    pd.DataFrame({"Id": ids, "Path": val["path"].to_numpy()}).to_csv(tmp_path / "val_ids.csv", index=False)
    make_submission.main(["--data-root", str(demo_root), "--test-csv", str(tmp_path / "val_ids.csv"),
                          "--checkpoints", str(tmp_path / "ckpt"), "--out", str(tmp_path / "sub.csv"),
                          "--cache-dir", str(tmp_path / "cache"), "--fill-missing", "0", "--workers", "1",
                          "--no-progress"])
    df = pd.read_csv(tmp_path / "sub.csv").set_index("Id").loc[ids]
    np.testing.assert_allclose(df[names].to_numpy(), expected, atol=1e-6)  # float32 outputs, other batches
    assert (df[[p for p in PATHOLOGIES if p not in names]].to_numpy() == 0).all()


def test_a_map_with_a_tiny_slope_keeps_the_models_auc_in_the_written_csv(tiny_root, tmp_path, ckpt_store):
    """The guard's constant choice maps distinct raw outputs to values MIN_SLOPE apart per unit of
    output (about 1e-9 here): the CSV must keep them apart, so that the AUC --labels reports from
    the written file is the model's, not the 0.5 of a column rounded to one value."""
    constant = {"Cardiomegaly": {"kind": "affine", "a": MIN_SLOPE, "b": -0.9, "chosen": "constant"}}
    pd.DataFrame({"Id": [i for i, _ in TINY_ROWS], "Cardiomegaly": [1, 1, -1, -1, -1]}).to_csv(
        tmp_path / "labels.csv", index=False)
    ckpts = install(tmp_path / "raw", cardiomegaly=ckpt_store(["Cardiomegaly"], seed=3))  # no map: raw outputs
    run(tiny_root, tmp_path, ckpts, "--fill-missing", "0")
    raw = read(tmp_path)["Cardiomegaly"].to_numpy()
    ckpts = install(tmp_path / "constant", cardiomegaly=ckpt_store(["Cardiomegaly"], seed=3, calibration=constant))
    result = run(tiny_root, tmp_path, ckpts, "--fill-missing", "0", "--labels", str(tmp_path / "labels.csv"))
    written = read(tmp_path)["Cardiomegaly"].to_numpy()
    assert len(set(raw)) == 5 and len(set(written)) == 5 and np.abs(written + 0.9).max() < 1e-6
    labels = np.array([1.0, 1.0, -1.0, -1.0, -1.0])
    assert evaluation.auc(raw, labels) not in (0.5, float("nan"))  # a ranking that a collapse would change
    assert result["metrics"]["per_pathology"]["Cardiomegaly"]["auc"] == evaluation.auc(raw, labels)
    np.testing.assert_array_equal(written, result["submission"]["Cardiomegaly"])  # the CSV reads back exactly


# ---------------------------------------------------------------------------------------------
# the command line

def test_cli_bad_input_is_one_error_line(tiny_root, tmp_path):
    cmd = [sys.executable, str(ROOT / "make_submission.py"), "--data-root", str(tiny_root),
           "--checkpoints", str(tmp_path / "nowhere"), "--out", str(tmp_path / "sub.csv"), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: --checkpoints {tmp_path / 'nowhere'}: no such directory; "
                                             f"train first (python train.py --pathology NAME --out-dir "
                                             f"{tmp_path / 'nowhere'})"]
    assert not (tmp_path / "sub.csv").exists()


def test_bad_flag_values_are_rejected():
    for argv in (["--fill-missing", "2"], ["--fill-missing", "nan"], ["--batch-size", "0"], ["--combine", "max"]):
        with pytest.raises(SystemExit) as e:
            make_submission.parse_args(argv)
        assert e.value.code == 2


def test_ids_are_checked_by_one_rule_in_labels_and_in_the_written_csv(tiny_root, tmp_path):
    """--labels and the check of the written CSV read Ids as read_test_csv does (dataset.parse_ids):
    integers, each once; an error names the file and the line."""
    import re
    (tmp_path / "ckpt" / "a").mkdir(parents=True)
    (tmp_path / "ckpt" / "a" / "best.pt").write_bytes(b"")  # never loaded: the Ids fail first
    ids = [str(i) for i, _ in TINY_ROWS]
    for cell, message in [("x1", "line 3, column 'Id': 'x1' is not an integer"),
                          (ids[0], f"line 3: Id {ids[0]} appears more than once (first on line 2)")]:
        rows = [ids[0], cell, *ids[2:]]
        pd.DataFrame({"Id": rows, "Cardiomegaly": "1"}).to_csv(tmp_path / "labels.csv", index=False)
        with pytest.raises(UserError, match=re.escape(f"--labels {tmp_path / 'labels.csv'}: {message}")):
            make_submission.main(["--data-root", str(tiny_root), "--checkpoints", str(tmp_path / "ckpt"),
                                  "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "sub.csv")])
        pd.DataFrame({"Id": rows, **{p: "0.0" for p in PATHOLOGIES}}).to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'bad.csv'}: {message}")):
            make_submission.check_submission(tmp_path / "bad.csv", [int(i) for i in ids])
