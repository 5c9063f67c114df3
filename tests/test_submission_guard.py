"""What make_submission.py, experiments/blend.py and experiments/saliency.py write never destroys what
they read: every output passes common.check_outputs before any work (never an input, never under
the data root), each refusal one line naming the flag, the path and why, the file unchanged. Also
test Ids read and written exactly (dataset.parse_ids), and make_submission.py --config.

Checkpoints are made without training (an untrained ResNet-18 at 32 px), so each test takes seconds."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import make_submission
from common import UserError, run_cli
from dataset import PATHOLOGIES, parse_ids
from experiments import blend, saliency
from model import Checkpoint, build_model, model_config

PREPROCESS = {"image_size": 32, "square": "resize", "mean": 0.449, "std": 0.226, "uncertain": "keep"}


def make_ckpt(path: Path, names=("Cardiomegaly",), epoch: int = 1, val_loss: float = 0.5, seed: int = 0,
              train_config: dict | None = None, split: dict | None = None) -> Path:
    """An untrained resnet18 checkpoint at 32 px, as make_submission.py and saliency.py load it."""
    torch.manual_seed(seed)
    model = build_model(model_config(list(names), "auto", hidden=8, dropout=0.0, arch="resnet18"))
    path.parent.mkdir(parents=True, exist_ok=True)
    Checkpoint.of(model, view="all", epoch=epoch, metrics={"val_loss": val_loss, "per_pathology": {}},
                  train_config=train_config or {}, preprocess=PREPROCESS, split=split or {},
                  calibration={n: None for n in names}).save(path)
    return path


def write_val_predictions(path: Path, seed: int = 0, n: int = 60, fold: int | None = None) -> None:
    """val_predictions.csv (oof_predictions.csv with a fold) as train.py writes it: Cardiomegaly on
    n frontal validation images, the same images and labels for every seed, noisy raw outputs."""
    target = np.random.default_rng(123).choice([-1.0, 0.0, 1.0], n)
    raw = np.clip(0.5 * target + np.random.default_rng(seed).normal(0, 0.3, n), -1, 1)
    df = pd.DataFrame({"path": [f"train/pid{i}/study1/view1_frontal.jpg" for i in range(n)],
                       "patient": [f"pid{i}" for i in range(n)], "study": [f"pid{i}/study1" for i in range(n)],
                       "view": "frontal", "pathology": "Cardiomegaly", "target": target, "raw": raw, "calibrated": 0.0})
    if fold is not None:
        df["fold"] = np.arange(n) % fold
    df.to_csv(path, index=False)


def refused(capsys, main, argv: list[str], victim: Path) -> str:
    """Run a script's main through run_cli: exit 2, one 'error:' line (returned), and victim's
    bytes (or its absence) unchanged."""
    before = victim.read_bytes() if victim.exists() else None
    code = run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert (victim.read_bytes() if victim.exists() else None) == before
    return err


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """ck/cardiomegaly/best.pt, made once."""
    folder = tmp_path_factory.mktemp("guard") / "ck"
    make_ckpt(folder / "cardiomegaly" / "best.pt")
    return folder


def submit_argv(root, ckpts, out, cache, *extra) -> list[str]:
    return [*(["--data-root", str(root)] if root is not None else []), "--checkpoints", str(ckpts), "--out", str(out),
            "--cache-dir", str(cache), "--fill-missing", "0", "--workers", "1", "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------
# make_submission.py

def test_submission_outputs_that_are_inputs_or_under_the_data_root_are_refused(demo_root, ckpts, tmp_path, capsys):
    labels = demo_root / "student_labels" / "test_labels.csv"
    test_csv = shutil.copy(demo_root / "student_labels" / "test_ids.csv", tmp_path / "test.csv")
    blend_json = tmp_path / "blend.json"
    blend_json.write_text(json.dumps({"version": 2, "fingerprints": {}, "pathologies": {}}))
    as_metrics = shutil.copy(labels, tmp_path / "metrics.csv")
    best = ckpts / "cardiomegaly" / "best.pt"
    train_csv = demo_root / "student_labels" / "train2023.csv"
    cases = [  # (out, extra flags, the file at stake, what the line says)
        (test_csv, ["--test-csv", str(test_csv)], test_csv, f"--out {test_csv}: is the run's input --test-csv"),
        (train_csv, [], train_csv, f"--out {train_csv}: lies under the data root {demo_root}"),
        (best, [], best, f"--out {best}: is the run's input --checkpoints (cardiomegaly/best.pt)"),
        (demo_root / "x.csv", [], demo_root / "x.csv", f"--out {demo_root / 'x.csv'}: lies under the data root"),
        (blend_json, ["--blend", str(blend_json)], blend_json, f"--out {blend_json}: is the run's input --blend"),
        (tmp_path / "sub.csv", ["--test-csv", str(labels), "--labels", str(as_metrics)], as_metrics,
         f"metrics.csv beside --out {as_metrics}: is the run's input --labels"),
        (tmp_path / "sub.csv", ["--test-csv", str(labels), "--labels", str(labels), "--plots",
                                str(demo_root / "plots")], demo_root / "plots",
         f"--plots {demo_root / 'plots'}: lies under the data root"),
    ]
    for out, extra, victim, message in cases:
        err = refused(capsys, make_submission.main, submit_argv(demo_root, ckpts, out, tmp_path / "cache", *extra),
                      victim)
        assert err.startswith(f"error: {message}"), err
    assert not (tmp_path / "sub.csv").exists() and not (demo_root / "plots").exists()


def test_submission_without_data_root_never_writes_into_the_demo_data(demo_root, ckpts, tmp_path, monkeypatch, capsys):
    """No --data-root: the demo dataset (./demo_data) is the data root, so its training CSV is safe."""
    shutil.copytree(demo_root, tmp_path / "demo_data")
    monkeypatch.chdir(tmp_path)
    out = Path("demo_data/student_labels/train2023.csv")
    err = refused(capsys, make_submission.main, submit_argv(None, ckpts, out, tmp_path / "cache"), tmp_path / out)
    assert err == (f"error: --out {out}: lies under the data root demo_data, which is never written; "
                   f"choose a path outside it")


def test_submission_ids_beyond_int64_and_2_53_come_back_unchanged(demo_root, ckpts, tmp_path):
    paths = pd.read_csv(demo_root / "student_labels" / "test_ids.csv")["Path"][:3].tolist()
    ids = ["9007199254740993", "99999999999999999999", "7"]  # 2**53 + 1, beyond int64, a small one
    (tmp_path / "test.csv").write_text("Id,Path\n" + "".join(f"{i},{p}\n" for i, p in zip(ids, paths)))
    result = make_submission.main(submit_argv(demo_root, ckpts, tmp_path / "sub.csv", tmp_path / "cache",
                                              "--test-csv", str(tmp_path / "test.csv")))
    written = pd.read_csv(tmp_path / "sub.csv", dtype=str)
    assert written["Id"].tolist() == ids
    assert [str(i) for i in result["submission"]["Id"]] == ids


def test_check_submission_compares_ids_exactly(tmp_path):
    row = ",".join(["0.0"] * len(PATHOLOGIES))
    (tmp_path / "sub.csv").write_text(make_submission.HEADER + f"\n9007199254740992,{row}\n")
    with pytest.raises(UserError, match=r"1 test Ids missing \(e.g. \[9007199254740993\]\) and 1 extra "
                                        r"\(e.g. \[9007199254740992\]\)"):
        make_submission.check_submission(tmp_path / "sub.csv", parse_ids(pd.Series(["9007199254740993"]), "t"))


def test_parse_ids_is_exact_at_any_size():
    big = parse_ids(pd.Series(["99999999999999999999", " 9007199254740993 ", "7.0", "-3"]), "f.csv")
    assert big.tolist() == [99999999999999999999, 9007199254740993, 7, -3]
    assert all(type(i) is int for i in big.tolist())
    small = parse_ids(pd.Series(["9007199254740993", "9007199254740992"]), "f.csv")
    assert small.dtype == np.int64 and small.tolist() == [9007199254740993, 9007199254740992]
    for cells, message in [
            (["1", "1e3"], "f.csv: line 3, column 'Id': '1e3' is not an integer (a float's exponent form"),
            (["1", "7.5"], "f.csv: line 3, column 'Id': '7.5' is not an integer"),
            (["99999999999999999999", "99999999999999999999.0"],
             "f.csv: line 3: Id 99999999999999999999 appears more than once (first on line 2)"),
            (["9007199254740993", "9007199254740992", "9007199254740993"],
             "f.csv: line 4: Id 9007199254740993 appears more than once (first on line 2)")]:
        with pytest.raises(UserError) as e:
            parse_ids(pd.Series(cells), "f.csv")
        assert str(e.value).startswith(message), str(e.value)


def test_submission_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    (tmp_path / "sub.yaml").write_text("batch-size: 7\ntta: flip\nfill_missing: 0.5\nout: from_config.csv\n")
    args = make_submission.parse_args(["--config", str(tmp_path / "sub.yaml"), "--batch-size", "9"])
    assert (args.batch_size, args.tta, args.fill_missing, args.out) == (9, "flip", 0.5, Path("from_config.csv"))
    (tmp_path / "bad.yaml").write_text("epochs: 3\n")
    with pytest.raises(SystemExit) as e:
        make_submission.parse_args(["--config", str(tmp_path / "bad.yaml")])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# experiments/blend.py and experiments/saliency.py

def fake_run(folder: Path, data_root=None, seed: int = 0) -> Path:
    """A finished Cardiomegaly model folder as train.py leaves it: summary.json (recording its data
    root, unless None), val_predictions.csv, best.pt (epoch 1, val loss 0.5)."""
    folder.mkdir(parents=True)
    write_val_predictions(folder / "val_predictions.csv", seed)
    summary = {"pathology": "Cardiomegaly", "best_epoch": 1, "val_loss": 0.5,
               "split": {"seed": 0, "val_frac": 0.2, "val_patients_sha1": "abc"}}
    if data_root is not None:
        summary["config"] = {"data_root": str(data_root)}
    (folder / "summary.json").write_text(json.dumps(summary))
    make_ckpt(folder / "best.pt", seed=seed)
    return folder


def test_blend_out_that_is_a_member_file_or_under_the_data_root_is_refused(tmp_path, capsys):
    data_root = tmp_path / "data"
    data_root.mkdir()
    model = fake_run(tmp_path / "runs" / "a" / "cardiomegaly", data_root)
    argv = ["--runs", str(tmp_path / "runs" / "a"), "--min-rows", "10", "--no-progress", "--out"]
    for out, message in [
            (model / "val_predictions.csv", "is the run's input --runs (a/cardiomegaly/val_predictions.csv)"),
            (model / "summary.json", "is the run's input --runs (a/cardiomegaly/summary.json)"),
            (model / "best.pt", "is the run's input --runs (a/cardiomegaly/best.pt)"),
            (data_root / "blend.json", f"lies under the data root {data_root}")]:
        err = refused(capsys, blend.main, [*argv, str(out)], out)
        assert err.startswith(f"error: --out {out}: {message}"), err
    blend.main([*argv, str(tmp_path / "blend.json")])  # elsewhere: written
    assert json.loads((tmp_path / "blend.json").read_text())["pathologies"]["Cardiomegaly"]["members"] == [
        "a/cardiomegaly"]


def test_saliency_out_that_holds_an_input_or_lies_under_the_data_root_is_refused(tmp_path, capsys):
    data_root = tmp_path / "data"  # where the checkpoint says it was trained
    data_root.mkdir()
    image = tmp_path / "images" / "pid1" / "study1" / "view1_frontal.png"
    image.parent.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36), dtype=np.uint8)).save(image)
    ckpt = make_ckpt(tmp_path / "ck" / "best.pt", train_config={"data_root": str(data_root)})
    argv = ["--checkpoint", str(ckpt), "--images", str(image), "--no-progress", "--out"]
    for out, message in [(image.parent, f"holds the run's input --images #1 {image}"),
                         (ckpt.parent, f"holds the run's input --checkpoint {ckpt}"),
                         (data_root / "saliency", f"lies under the data root {data_root}")]:
        err = refused(capsys, saliency.main, [*argv, str(out)], image)
        assert err.startswith(f"error: --out {out}: {message}"), err
    assert sorted(p.name for p in image.parent.iterdir()) == ["view1_frontal.png"]
    assert not (data_root / "saliency").exists()
    assert len(saliency.main([*argv, str(tmp_path / "sal")])) == 1
