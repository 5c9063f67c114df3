"""Runs people can watch and repeat: --config files, args.yaml repeating a run to the last digit,
TensorBoard events read back with tensorboard's own EventAccumulator, a resumed run with one value per
step, and the run manifest."""
import json

import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

import train
from tests.test_resume import signal_at_call

TIMES = ["seconds", "train_seconds", "train_images_per_s"]


def events(folder):
    acc = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def history(folder):
    return pd.read_csv(folder / "history.csv").drop(columns=TIMES)


def test_a_config_file_sets_the_flags_the_command_line_wins_and_args_yaml_records_them(tiny_args, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("pathology: [Cardiomegaly]\nlr: 1.0e-3\nepochs: 3\nhidden: 16\nuncertain: {Cardiomegaly: ones}\n"
                   "augment: none\n")
    [s] = train.main(tiny_args("--config", str(cfg), "--epochs", "1"))  # the command line wins
    assert (s["config"]["lr"], s["config"]["epochs"], s["config"]["hidden"]) == (1e-3, 1, 16)
    assert s["per_pathology"]["Cardiomegaly"]["uncertain"] == "ones"
    saved = yaml.safe_load((tmp_path / "ckpt" / "cardiomegaly" / "args.yaml").read_text())
    assert (saved["lr"], saved["epochs"], saved["hidden"], saved["uncertain"]) == (1e-3, 1, 16, "Cardiomegaly=ones")
    assert saved["pathology"] == ["Cardiomegaly"] and "resume" not in saved and "config" not in saved


def test_args_yaml_repeats_the_run_to_the_last_digit(tiny_args, tmp_path):
    train.main(tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--dropout", "0.3", "--lr", "5e-4",
                         "--val-per-epoch", "2"))
    first = tmp_path / "ckpt" / "cardiomegaly"
    train.main(["--config", str(first / "args.yaml"), "--out-dir", str(tmp_path / "again")])
    again = tmp_path / "again" / "cardiomegaly"
    pd.testing.assert_frame_equal(history(first), history(again), check_exact=True)
    assert (again / "args.yaml").read_text() == (first / "args.yaml").read_text().replace(
        str(tmp_path / "ckpt"), str(tmp_path / "again"))


@pytest.mark.parametrize("text, message", [
    ("lr: [1, 2\n", "not YAML"), ("- lr\n- 3\n", "not a mapping"), ("bogus: 1\n", "'bogus' is not a flag of train.py"),
    ("lr: fast\n", "lr: 'fast' is not a valid value"), ("folds: 1\n", "--folds must be at least 2")])
def test_a_bad_config_stops_in_one_line_naming_the_file(tiny_args, tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        train.parse_args(tiny_args("--pathology", "Cardiomegaly", "--config", str(cfg)))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0] and str(cfg) in err[0]


def test_tensorboard_holds_loss_and_lr_per_step_validation_per_pathology_the_first_batch_and_hparams(tiny_args,
                                                                                                     tmp_path):
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly", "Pneumonia", "--multi-head", "--epochs", "2",
                               "--batch-size", "8"))
    acc = events(tmp_path / "ckpt" / "multi_head")
    scalars, n = acc.Tags()["scalars"], s["n_train"]
    steps = [e.step for e in acc.Scalars("train/loss")]
    # one value per optimizer step (batches of 8), at the samples drawn so far
    assert len(steps) == len(set(steps)) == 2 * (n // 8 + (n % 8 >= 2)) and steps[-1] == 2 * n
    assert [e.step for e in acc.Scalars("train/lr")] == steps
    assert [e.step for e in acc.Scalars("val/val_auc")] == [n, 2 * n]
    for name in ("Cardiomegaly", "Pneumonia"):
        for metric in ("val_mse", "val_mse_cv", "val_mse_cal", "const_mse", "val_auc"):
            assert f"val/{metric}/{name}" in scalars
    assert "val/val_loss" in scalars and acc.Tags()["images"] == ["train/first_batch"]
    # the HParams tab: the run's settings with its best numbers
    start = hp_metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)[hp_metadata.SESSION_START_INFO_TAG])
    assert start.hparams["lr"].number_value == 3e-4 and start.hparams["multi-head"].string_value == "true"
    assert [e.step for e in acc.Scalars("hparam/best/val_auc")] == [2 * n]


def test_a_resumed_run_appends_to_its_curves_with_one_value_per_step(tiny_args, tmp_path, monkeypatch):
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--batch-size", "8", "--patience", "0",
                     "--save-every", "1e-9")
    train.main(argv + ["--out-dir", str(tmp_path / "straight")])
    real = signal_at_call(monkeypatch, 10)  # epoch 2, its third step
    with pytest.raises(SystemExit):
        train.main(argv + ["--out-dir", str(tmp_path / "split")])
    monkeypatch.setattr(train, "loss_terms", real)
    train.main(argv + ["--out-dir", str(tmp_path / "split"), "--resume"])
    a, b = (events(tmp_path / d / "cardiomegaly") for d in ("straight", "split"))
    for tag in ("train/loss", "train/lr", "val/val_loss"):
        sa, sb = [(e.step, e.value) for e in a.Scalars(tag)], [(e.step, e.value) for e in b.Scalars(tag)]
        assert [s for s, _ in sb] == [s for s, _ in sa]  # every step once, none twice
        assert [v for _, v in sb] == pytest.approx([v for _, v in sa])
    manifest = json.loads((tmp_path / "split" / "cardiomegaly" / "manifest.json").read_text())
    assert manifest["exit_reason"] == "finished" and manifest["earlier"][0]["exit_reason"] == "SIGTERM"


def test_the_manifest_names_the_code_data_device_and_why_the_run_ended(tiny_args, tmp_path, demo_root, monkeypatch):
    train.main(tiny_args("--pathology", "Cardiomegaly"))
    m = json.loads((tmp_path / "ckpt" / "cardiomegaly" / "manifest.json").read_text())
    for key in ("git_commit", "git_dirty", "python", "torch", "torchvision", "timm", "device", "device_name",
                "world_size", "data_root", "train_csv", "cache_key", "started", "ended", "exit_reason"):
        assert key in m, key
    assert m["exit_reason"] == "finished" and m["world_size"] == 1 and m["device"] == "cpu"
    assert m["data_root"] == str(demo_root) and len(m["train_csv"]["sha256"]) == 64
    assert m["cache_key"] == next((tmp_path / "cache").iterdir()).name
    real = train.loss_terms

    def nan(*a, **k):
        loss, n = real(*a, **k)
        return loss * float("nan"), n
    monkeypatch.setattr(train, "loss_terms", nan)
    with pytest.raises(train.UserError):
        train.main(tiny_args("--pathology", "Cardiomegaly", "--out-dir", str(tmp_path / "nan")))
    m = json.loads((tmp_path / "nan" / "cardiomegaly" / "manifest.json").read_text())
    assert m["exit_reason"].startswith("error: ") and "not finite" in m["exit_reason"]


def test_log_none_writes_no_events(tiny_args, tmp_path):
    train.main(tiny_args("--pathology", "Cardiomegaly", "--log", "none"))
    assert not (tmp_path / "ckpt" / "cardiomegaly" / "tb").exists()


def test_make_submission_writes_a_manifest_of_every_checkpoint_it_used(tiny_args, tmp_path, demo_root):
    import hashlib

    import make_submission
    train.main(tiny_args("--pathology", "Cardiomegaly", "--folds", "2"))
    out = tmp_path / "sub.csv"
    make_submission.main(["--data-root", str(demo_root), "--checkpoints", str(tmp_path / "ckpt"), "--out", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--fill-missing", "0", "--no-progress"])
    m = json.loads((tmp_path / "sub.manifest.json").read_text())
    assert m["submission"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert [(c["pathology"], c["fold"]) for c in m["checkpoints"]] == [("Cardiomegaly", 0), ("Cardiomegaly", 1)]
    for c in m["checkpoints"]:
        assert c["sha256"] == hashlib.sha256(open(c["path"], "rb").read()).hexdigest()
    assert m["git_commit"] is None or len(m["git_commit"]) == 40
