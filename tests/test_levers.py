"""The training levers of the CheXpert literature, through train.main: validation inside the epoch,
the K best weights kept and averaged, per-pathology label policies and blanks as negatives; each
changes training only, never what validation scores; each survives a resume."""
import csv

import pandas as pd
import pytest
import torch

import train
from model import Checkpoint
from snapshots import average_weights
from tests.test_resume import signal_at_call


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_val_per_epoch_validates_n_times_an_epoch(tiny_args, tmp_path):
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--batch-size", "8",
                               "--val-per-epoch", "3", "--patience", "0"))
    hist = rows(tmp_path / "ckpt" / "cardiomegaly" / "history.csv")
    # 50 training rows, chunks of 8: validations at the first chunk ends past 17, 34 and 50 samples
    assert [r["epoch"] for r in hist] == ["0.48", "0.8", "1", "1.48", "1.8", "2"]
    assert [int(r["samples"]) for r in hist] == [24, 16, 10] * 2 and s["validations"] == 6
    assert Checkpoint.load(tmp_path / "ckpt" / "cardiomegaly" / "best.pt").epoch == float(s["best_epoch"])


def test_patience_counts_validations(tiny_args, tmp_path, monkeypatch):
    losses = iter([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    real = train.validate

    def worse_each_time(*a, **k):
        v = real(*a, **k)
        return {**v, "val_loss": next(losses)}
    monkeypatch.setattr(train, "validate", worse_each_time)
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--batch-size", "8",
                               "--val-per-epoch", "3", "--patience", "2"))
    assert s["early_stopped"] and s["validations"] == 3 and s["best_epoch"] == 0.48


def test_a_resume_between_validations_of_an_epoch_is_exact(tiny_args, tmp_path, monkeypatch):
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--batch-size", "8", "--val-per-epoch", "2",
                     "--patience", "0", "--keep-top", "2")
    train.main(argv + ["--out-dir", str(tmp_path / "straight")])
    real = signal_at_call(monkeypatch, 10)  # the 3rd step of epoch 2, before its first validation (at 25 of 50)
    with pytest.raises(SystemExit):
        train.main(argv + ["--out-dir", str(tmp_path / "split")])
    ts = Checkpoint.load(tmp_path / "split" / "cardiomegaly" / "last.pt").training_state
    assert ts["epoch"] == 1 and ts["pos"] == 24 and ts["validations"] == 2
    monkeypatch.setattr(train, "loss_terms", real)
    train.main(argv + ["--out-dir", str(tmp_path / "split"), "--resume"])
    a, b = (pd.read_csv(tmp_path / d / "cardiomegaly" / "history.csv") for d in ("straight", "split"))
    cols = [c for c in a.columns if "seconds" not in c and c != "train_images_per_s"]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
    assert sorted(p.name for p in (tmp_path / "split" / "cardiomegaly" / "top").iterdir()) == \
        sorted(p.name for p in (tmp_path / "straight" / "cardiomegaly" / "top").iterdir())


def test_keep_top_keeps_the_k_best_and_average_top_is_their_mean(tiny_args, tmp_path):
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--batch-size", "8",
                               "--val-per-epoch", "2", "--patience", "0", "--keep-top", "3", "--average-top", "3"))
    folder = tmp_path / "ckpt" / "cardiomegaly"
    hist = rows(folder / "history.csv")
    kept = sorted(folder.glob("top/*.pt"))
    best3 = sorted(float(r["val_loss"]) for r in hist)[:3]
    assert sorted(Checkpoint.load(p).metrics["val_loss"] for p in kept) == pytest.approx(best3)
    mean = average_weights(kept)
    for k, v in mean.state_dict.items():
        if v.is_floating_point() and "running" not in k:  # the weights: the mean of the kept ones
            assert torch.allclose(v, torch.stack([Checkpoint.load(p).state_dict[k] for p in kept]).mean(0), atol=1e-6)
    avg = s["averaged"]
    assert avg["k"] == 3 and s["best_from"] == ("the average of the 3 best validations" if avg["kept"]
                                                else "the best validation")
    best = Checkpoint.load(folder / "best.pt")
    if avg["kept"]:  # best.pt holds the average: its weights, with BatchNorm statistics of its own
        w = "backbone.conv1.weight"
        assert torch.allclose(best.state_dict[w], mean.state_dict[w], atol=1e-6)
        assert not torch.equal(best.state_dict["backbone.bn1.running_mean"], mean.state_dict["backbone.bn1.running_mean"])
    assert best.metrics["val_loss"] == pytest.approx(min(best3[0], avg["val_loss"]))


@pytest.mark.parametrize("flags, message", [
    (["--average-top", "3", "--keep-top", "2"], "--average-top 3 averages kept weights: it needs --keep-top 3"),
    (["--val-per-epoch", "0"], "--val-per-epoch must be at least 1"),
    (["--uncertain", "Cardiomegaly=sometimes"], "unknown policy 'sometimes'"),
    (["--uncertain", "Heart=ones"], "unknown pathology 'Heart'"),
    (["--lsr-ones", "0.5,1.5"], "--lsr-ones"),
    (["--blank", "positive"], "unknown policy 'positive'")])
def test_bad_lever_values_are_one_line(tiny_args, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.parse_args(tiny_args("--pathology", "Cardiomegaly", *flags))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0]


def test_no_lever_changes_what_validation_scores(tiny_args, tmp_path):
    """Per-pathology policies, soft targets, blanks as negatives, validation inside the epoch: the
    validation rows and their targets (source labels, uncertain 0, blank unscored) stay the same."""
    runs = {"plain": [], "policies": ["--uncertain", "Cardiomegaly=lsr-ones,Pneumonia=three-class,default=zeros",
                                      "--blank", "negative"],
            "inside": ["--val-per-epoch", "2", "--keep-top", "2", "--average-top", "2"]}
    val, summaries = {}, {}
    for name, flags in runs.items():
        out = tmp_path / name
        summaries[name] = {s["pathology"]: s for s in train.main(tiny_args(
            "--pathology", "Cardiomegaly", "Pneumonia", "--out-dir", str(out), *flags))}
        val[name] = {p: pd.read_csv(out / p.lower() / "val_predictions.csv")[["path", "target"]]
                     for p in ("Cardiomegaly", "Pneumonia")}
    for name in ("policies", "inside"):
        for p in ("Cardiomegaly", "Pneumonia"):
            pd.testing.assert_frame_equal(val[name][p], val["plain"][p])
    pol = summaries["policies"]
    assert pol["Pneumonia"]["head_type"] == "three-class" and pol["Cardiomegaly"]["head_type"] == "regression"
    c = pol["Cardiomegaly"]["per_pathology"]["Cardiomegaly"]
    assert c["uncertain"] == "lsr-ones" and c["blank"] == "negative" and c["n_blank_negative"] > 0


def test_blank_negative_trains_exactly_the_blank_rows_more(tiny_args, tmp_path, demo_root):
    """Counted against the CSV: --blank negative adds the training rows whose label is blank."""
    plain = train.main(tiny_args("--pathology", "Fracture", "--out-dir", str(tmp_path / "a")))[0]
    neg = train.main(tiny_args("--pathology", "Fracture", "--blank", "negative", "--out-dir", str(tmp_path / "b")))[0]
    p, n = plain["per_pathology"]["Fracture"], neg["per_pathology"]["Fracture"]
    assert n["n_loss"] == p["n_loss"] + n["n_blank_negative"] and n["n_blank_negative"] > 0
    assert neg["n_train"] == plain["n_train"] + n["n_blank_negative"]  # rows labelled for nothing else
    assert neg["n_val"] == plain["n_val"]  # validation never scores blanks
