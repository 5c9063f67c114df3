"""experiments/gridsearch.py as it is used for days on a shared cluster: a trial that fails is
recorded and the shard goes on, K-fold trials have rows, rows are ranked within their pathology and
view, --epochs grows on a rerun, files of the wrong shape and bad output folders are one line, and
a --config file sets grid and training flags (config.to_argv hands the latter to train.main)."""
import argparse
import csv
import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

import config
import dataset
import train
from common import UserError
from experiments import gridsearch

ROOT = Path(__file__).resolve().parents[1]


def fake_train(calls: list, outcome=lambda args: 0.5):
    """A train.main stand-in: records its argv, then raises what outcome(args) returns if that is an
    exception, or writes what a finished run leaves with that val_loss: summary.json and history.csv,
    or with --folds K, K fold folders and oof_summary.json (the shape train.py writes)."""
    def fake(argv):
        args = train.parse_args(argv)
        calls.append(list(argv))
        result = outcome(args)
        if isinstance(result, BaseException):
            raise result
        name = args.pathology[0]
        out = args.out_dir / dataset.slug(name, args.view)
        summary = {"pathology": name, "view": args.view, "best_epoch": 1, "epochs_run": args.epochs,
                   "val_loss": result, "val_mse": 0.4, "val_mse_cv": result, "val_mse_cal": 0.3, "const_mse": 0.6,
                   "val_nmse": 0.8, "val_auc": 0.7, "config": train.jsonable(vars(args))}
        folders = [out] if args.folds is None else [out / f"fold{i}" for i in range(args.folds)]
        for k, folder in enumerate(folders):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "summary.json").write_text(json.dumps(summary))
            (folder / "history.csv").write_text(f"epoch,seconds\n1,{1.5 + k}\n")
        if args.folds is not None:
            (out / "oof_summary.json").write_text(json.dumps({name: {
                "n": 64, "mse": result, "nmse": result / 0.9, "auc": 0.66, "mse_ci": [result - 0.1, result + 0.1],
                "auc_ci": [0.5, 0.8]}}))
        return [summary]
    return fake


def read_results(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def grid_argv(out: Path, *extra, pathology="Cardiomegaly") -> list[str]:
    return ["--pathology", pathology, "--hidden", "8", "--out-dir", str(out), "--weights", "none", *extra]


# ---------------------------------------------------------------------------------------------
# 1: failed trials

def test_a_diverging_trial_is_recorded_as_failed_and_the_shard_goes_on(tiny_args, tmp_path, monkeypatch, capsys):
    out = tmp_path / "grid"
    argv = ["--pathology", "Cardiomegaly", "--hidden", "8", "--freeze", "4", "--lr", "1e9", "1e-3", *tiny_args(),
            "--out-dir", str(out)]
    with pytest.raises(UserError, match=r"^1 of 2 trials of shard 1/1 failed \(hidden8_freeze4_lr1e\+09\)"):
        gridsearch.main(argv)
    rows = {r["lr"]: r for r in read_results(out)}
    assert rows["0.001"]["status"] == "finished" and rows["0.001"]["rank"] == "1" and float(rows["0.001"]["val_loss"]) > 0
    bad = rows["1000000000.0"]
    assert bad["status"] == "failed" and bad["rank"] == "" and bad["val_loss"] == ""
    assert "the training loss is not finite" in bad["reason"] and "\n" not in bad["reason"]
    record = json.loads((out / "hidden8_freeze4_lr1e+09" / "cardiomegaly" / "failed.json").read_text())
    assert record["reason"] == bad["reason"] and record["lr"] == 1e9
    # a rerun knows: the failed trial is skipped (the finished one would return at once), still exit 2
    calls = []
    monkeypatch.setattr(train, "main", calls.append)
    capsys.readouterr()
    with pytest.raises(UserError, match="1 of 2 trials"):
        gridsearch.main(argv)
    assert [Path(gridsearch_flag(a, "--out-dir")).name for a in calls] == ["hidden8_freeze4_lr0.001"]
    assert "hidden8_freeze4_lr1e+09: skipped, it failed before (Cardiomegaly: the training loss is not finite" in \
        capsys.readouterr().out
    # --retry-failed trains it again; once it finishes, its record is gone and its row is a finished one
    calls.clear()
    monkeypatch.setattr(train, "main", fake_train(calls, lambda args: 0.25 if args.lr == 1e9 else 0.5))
    rows = gridsearch.main(argv + ["--retry-failed"])
    assert [Path(gridsearch_flag(a, "--out-dir")).name for a in calls] == ["hidden8_freeze4_lr1e+09",
                                                                           "hidden8_freeze4_lr0.001"]
    assert not (out / "hidden8_freeze4_lr1e+09" / "cardiomegaly" / "failed.json").exists()
    assert [(r["lr"], r["status"], r["rank"]) for r in rows] == [(1e9, "finished", 1), (1e-3, "finished", 2)]


def gridsearch_flag(argv: list, name: str) -> str:
    """The value of the last occurrence of a flag (the one argparse keeps)."""
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


def test_out_of_memory_fails_one_trial_and_its_memory_is_freed_before_the_next(tmp_path, monkeypatch):
    """The failed trial's objects sit in a reference cycle (as a traceback's frames do): with the
    automatic collector off, only the grid's own collection between trials frees them."""
    class Held:  # stands for a model and its optimizer state
        pass
    held, seen = [], []

    def outcome(args):
        if args.lr == 1e-3:
            obj = Held()
            obj.cycle = obj
            held.append(weakref.ref(obj))
            return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 79.1 GiB\nof which 1.2 GiB is free.")
        seen.append(held[0]() is None)  # the second trial starts: is the first one's memory gone?
        return 0.5
    calls = []
    monkeypatch.setattr(train, "main", fake_train(calls, outcome))
    out = tmp_path / "grid"
    gc.disable()
    try:
        with pytest.raises(UserError, match=r"1 of 2 trials of shard 1/1 failed \(hidden8_freeze0_lr0.001\)"):
            gridsearch.main(grid_argv(out, "--freeze", "0", "--lr", "1e-3", "1e-4"))
    finally:
        gc.enable()
    assert len(calls) == 2 and seen == [True]
    rows = {r["lr"]: r for r in read_results(out)}
    assert rows["0.001"]["status"] == "failed"
    assert rows["0.001"]["reason"] == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a " \
                                      "total capacity of 79.1 GiB"
    assert rows["0.0001"]["status"] == "finished" and rows["0.0001"]["rank"] == "1"


def test_a_trial_that_is_interrupted_stops_the_shard(tmp_path, monkeypatch):
    """SIGTERM (SLURM's preemption) saves last.pt and ends the job to be requeued: not a failure."""
    calls = []
    monkeypatch.setattr(train, "main", fake_train(calls, lambda args: SystemExit(130)))
    with pytest.raises(SystemExit) as e:
        gridsearch.main(grid_argv(tmp_path / "grid", "--freeze", "0", "--lr", "1e-3", "1e-4"))
    assert e.value.code == 130 and len(calls) == 1 and not list((tmp_path / "grid").rglob("failed.json"))


# ---------------------------------------------------------------------------------------------
# 2, 3: K-fold rows; rows per pathology and view

def test_kfold_trials_give_one_row_each_from_their_out_of_fold_metrics(tmp_path, monkeypatch):
    calls = []
    loss = lambda args: {1e-3: 0.7, 1e-4: 0.4}[args.lr]
    monkeypatch.setattr(train, "main", fake_train(calls, loss))
    out = tmp_path / "grid"
    rows = gridsearch.main(grid_argv(out, "--freeze", "0", "--lr", "1e-3", "1e-4", "--folds", "2"))
    assert all(gridsearch_flag(a, "--folds") == "2" for a in calls)
    assert [(r["lr"], r["folds"], r["rank"], r["val_loss"], r["val_mse_cv"], r["val_auc"], r["seconds"]) for r in rows] \
        == [(1e-4, 2, 1, 0.4, 0.4, 0.66, 4.0), (1e-3, 2, 2, 0.7, 0.7, 0.66, 4.0)]  # 1.5 + 2.5 s over the folds
    assert rows[0]["val_nmse"] == pytest.approx(0.4 / 0.9) and rows[0]["config"] == "hidden8_freeze0_lr0.0001/cardiomegaly"
    assert [r["config"] for r in read_results(out)] == [r["config"] for r in rows]
    # a K-fold trial with a fold to go has no out-of-fold metrics yet, so no row
    (out / "hidden8_freeze0_lr0.001" / "cardiomegaly" / "oof_summary.json").unlink()
    assert [r["lr"] for r in gridsearch.main(grid_argv(out, "--freeze", "0", "--lr", "1e-4", "--collect"))] == [1e-4]


def test_two_pathologies_and_views_sharing_an_out_dir_are_ranked_apart(tmp_path, monkeypatch, capsys):
    """The module's own example shares --out-dir between pathologies: each gets its own ranking."""
    loss = {("Pleural Effusion", "all", 1e-3): 0.5, ("Pleural Effusion", "all", 1e-4): 0.6,
            ("Cardiomegaly", "all", 1e-3): 0.2, ("Cardiomegaly", "all", 1e-4): 0.1,
            ("Cardiomegaly", "lateral", 1e-3): 0.05, ("Cardiomegaly", "lateral", 1e-4): 0.3}
    calls = []
    monkeypatch.setattr(train, "main", fake_train(calls, lambda a: loss[(a.pathology[0], a.view, a.lr)]))
    out = tmp_path / "grid"
    runs = [("Pleural Effusion", []), ("Cardiomegaly", []), ("Cardiomegaly", ["--view", "lateral"])]
    for pathology, view in runs:
        gridsearch.main(grid_argv(out, "--freeze", "0", "--lr", "1e-3", "1e-4", *view, pathology=pathology))
    results = read_results(out)
    assert [(r["pathology"], r["view"], r["rank"], r["lr"]) for r in results] == [
        ("Cardiomegaly", "all", "1", "0.0001"), ("Cardiomegaly", "all", "2", "0.001"),
        ("Cardiomegaly", "lateral", "1", "0.001"), ("Cardiomegaly", "lateral", "2", "0.0001"),
        ("Pleural Effusion", "all", "1", "0.001"), ("Pleural Effusion", "all", "2", "0.0001")]
    capsys.readouterr()
    rows = gridsearch.main(grid_argv(out, "--collect", pathology="Pleural Effusion"))
    assert [(r["pathology"], r["view"], r["lr"], r["rank"]) for r in rows] == [
        ("Pleural Effusion", "all", 1e-3, 1), ("Pleural Effusion", "all", 1e-4, 2)]
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("best: hidden8_freeze0_lr0.001/pleural_effusion") and "cardiomegaly" not in printed
    rows = gridsearch.main(grid_argv(out, "--collect", "--view", "lateral"))
    assert [(r["view"], r["lr"]) for r in rows] == [("lateral", 1e-3), ("lateral", 1e-4)]


# ---------------------------------------------------------------------------------------------
# 4: --epochs grows on a rerun; --unfreeze-epoch unset is never

def test_a_rerun_with_more_epochs_resumes_and_trains_on(tiny_args, tmp_path, monkeypatch):
    out = tmp_path / "grid"
    argv = ["--pathology", "Cardiomegaly", "--hidden", "8", "--freeze", "5", "--lr", "1e-3", *tiny_args(),
            "--out-dir", str(out)]
    [first] = gridsearch.main(argv)
    assert first["epochs_run"] == 1 and first["unfreeze_epoch"] == "never"
    calls = []
    real_main = train.main
    monkeypatch.setattr(train, "main", lambda a: calls.append(a) or real_main(a))
    [second] = gridsearch.main(argv + ["--epochs", "2"])
    assert gridsearch_flag(calls[0], "--unfreeze-epoch") == "never"
    assert second["epochs_run"] == 2 and second["status"] == "finished" and second["seconds"] > first["seconds"]
    history = (out / "hidden8_freeze5_lr0.001" / "cardiomegaly" / "history.csv").read_text().splitlines()
    assert len(history) == 3  # header, epoch 1 (first run), epoch 2 (the resumed run)
    # every trial logs under the grid's one --out-dir (tensorboard --logdir OUT), its hparams beside its curves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "hidden8_freeze5_lr0.001" / "cardiomegaly" / "tb"))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "hparam/best/val_loss" in acc.Tags()["scalars"]
    # an explicit --unfreeze-epoch still goes through
    assert gridsearch_flag(gridsearch.train_argv(*gridsearch.parse_args(argv + ["--unfreeze-epoch", "1"]),
                                                 {"hidden": 8, "freeze": 5, "lr": 1e-3}), "--unfreeze-epoch") == "1"


# ---------------------------------------------------------------------------------------------
# 5: files of the wrong shape; output folders checked first

BAD_FILES = {"hidden8_freeze0_lr0.001": ("summary.json", "[1, 2]"),
             "hidden8_freeze1_lr0.001": ("summary.json", '{"pathology": "Cardiomegaly", "config": "x"}'),
             "hidden8_freeze5_lr0.001": ("summary.json", '{"pathology": "Cardiomegaly", "config": {}, "val_loss": "low"}'),
             "hidden8_freeze3_lr0.001": ("summary.json", '{"pathology": 7, "config": {}}'),
             "hidden8_freeze4_lr0.001": ("summary.json", '{"pathology": "Cardiomegaly", "config": {"hidden": 8'),
             "hidden16_freeze0_lr0.001": ("failed.json", '{"pathology": "Cardiomegaly", "reason": ["x"]}')}


def write_bad_files(out: Path) -> list[Path]:
    paths = []
    for config_dir, (name, text) in BAD_FILES.items():
        path = out / config_dir / "cardiomegaly" / name
        path.parent.mkdir(parents=True)
        path.write_text(text)
        paths.append(path)
    kfold = out / "hidden16_freeze1_lr0.001" / "cardiomegaly"  # an oof_summary.json of another shape
    (kfold / "fold0").mkdir(parents=True)
    (kfold / "fold0" / "summary.json").write_text(json.dumps({"pathology": "Cardiomegaly", "config": {"folds": 2}}))
    (kfold / "oof_summary.json").write_text(json.dumps({"Cardiomegaly": {"n": 3, "mse": [0.1]}}))
    return paths + [kfold / "oof_summary.json"]


def test_collect_on_files_of_the_wrong_shape_warns_in_one_line_each(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    monkeypatch.setattr(train, "main", fake_train([]))
    gridsearch.main(grid_argv(out, "--freeze", "5", "--lr", "1e-4"))  # one good trial
    bad = write_bad_files(out)
    r = subprocess.run([sys.executable, "experiments/gridsearch.py", "--pathology", "Cardiomegaly", "--out-dir",
                        str(out), "--collect"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == len(bad) and all(line.startswith("warning: ") for line in lines), r.stderr
    for path in bad:
        assert sum(f"warning: {path}: " in line and "left out of results.csv" in line for line in lines) == 1, path
    assert "'val_loss' is 'low', not what train.py writes (int or float or null)" in r.stderr
    assert [row["config"] for row in read_results(out)] == ["hidden8_freeze5_lr0.0001/cardiomegaly"]


def test_a_summary_of_the_wrong_shape_never_ends_a_training_shard(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    calls = []
    fake = fake_train(calls)

    def writes_a_bad_summary_first(argv):
        fake(argv)
        if len(calls) == 1:
            (Path(gridsearch_flag(argv, "--out-dir")) / "cardiomegaly" / "summary.json").write_text('{"config": 3}')
    monkeypatch.setattr(train, "main", writes_a_bad_summary_first)
    with pytest.warns(UserWarning, match=r"hidden8_freeze0_lr0.001/cardiomegaly/summary.json: 'config' is 3"):
        rows = gridsearch.main(grid_argv(out, "--freeze", "0", "--lr", "1e-3", "1e-4"))
    assert len(calls) == 2 and [r["lr"] for r in rows] == [1e-4]


def test_an_out_dir_that_cannot_hold_the_grid_is_refused_before_any_trial(tmp_path, demo_root, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(train, "main", fake_train(calls))
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    for out, message in [(a_file, f"--out-dir {a_file}: is a file, not a folder"),
                         (a_file / "grid", f"--out-dir {a_file / 'grid'}: cannot be written"),
                         (demo_root / "grid", f"--out-dir {demo_root / 'grid'}: lies under the data root")]:
        with pytest.raises(UserError, match="^" + message.replace("+", r"\+")):
            gridsearch.main(grid_argv(out, "--data-root", str(demo_root), "--freeze", "0", "--lr", "1e-3"))
    assert calls == [] and not (demo_root / "grid").exists()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(UserError, match=f"--out-dir {locked}: cannot be written"):
            gridsearch.main(grid_argv(locked, "--freeze", "0", "--lr", "1e-3"))
        assert calls == []
    with pytest.raises(SystemExit):  # argparse would read --hidden=-- as no values at all
        gridsearch.main(grid_argv(tmp_path / "g", "--hidden=--"))
    assert "argument --hidden: expected a value, got '--'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 6: --config

def test_a_config_file_sets_grid_and_training_flags_and_the_command_line_wins(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "main", fake_train(calls))
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(f"pathology: pleural effusion\nhidden: [8, 16]\nfreeze: 5\nlr: 1.0e-3\nout_dir: {tmp_path / 'grid'}\n"
                   "unfreeze-epoch: 1\nepochs: 3\nimage-size: 48\nsampler: false\nuncertain: ignore\n"
                   "augmented: [flip]\nseed: 4\nweights: none\n")
    rows = gridsearch.main(["--config", str(cfg), "--epochs", "2", "--lr", "1e-4"])
    assert len(calls) == len(rows) == 2
    for argv, hidden in zip(calls, [8, 16]):
        a = train.parse_args(argv)
        assert (a.pathology, a.hidden, a.freeze, a.lr, a.unfreeze_epoch) == (["Pleural Effusion"], hidden, 5, 1e-4, 1)
        assert (a.epochs, a.image_size, a.sampler, a.uncertain, a.augmented, a.seed) == (2, 48, False, "ignore",
                                                                                        ["flip"], 4)
        assert a.out_dir == tmp_path / "grid" / f"hidden{hidden}_freeze5_lr0.0001" and a.resume


@pytest.mark.parametrize("text, message", [
    ("pathology: Cardiomegaly\nbogus-key: 1\n", "'bogus-key' is not a flag of gridsearch.py"),
    ("pathology: Cardiomegaly\nepochs: many\n", "epochs: 'many' is not a valid value"),
    ("pathology: Cardiomegaly\nresume: true\n", "'resume' cannot be set: gridsearch sets it itself"),
    ("pathology: Cardiomegaly\nmulti_head: false\n", "'multi-head' cannot be set: gridsearch sets it itself"),
    ("pathology: Cardiomegaly\nshard: 3/2\n", "--shard 3/2: I must be between 1 and N"),
    ("- pathology\n", "not a mapping of flag names to values")])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys, text, message):
    calls = []
    monkeypatch.setattr(train, "main", fake_train(calls))
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        gridsearch.main(["--config", str(cfg), "--out-dir", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err and str(cfg) in err, err
    assert calls == [] and not (tmp_path / "g").exists()


def test_to_argv_gives_the_values_back_through_the_parser(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--names", nargs="+")
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sampler", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--mode", choices=["a", "b"])
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--uncertain")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 3.0e-4\nseed: -1\nnames: [Pleural Effusion, x]\nsizes: 32\namp: false\n"
                   "sampler: true\nfast: true\nmode: b\nout-dir: /tmp/a b\nuncertain: {Atelectasis: ones, default: keep}\n")
    values = config.read_config(cfg, p)
    argv = config.to_argv(values, p)
    assert "--no-amp" in argv and "--seed=-1" in argv
    assert vars(p.parse_args(argv)) == values == {
        "lr": 3e-4, "seed": -1, "names": ["Pleural Effusion", "x"], "sizes": [32], "amp": False, "sampler": True,
        "fast": True, "mode": "b", "out_dir": Path("/tmp/a b"), "uncertain": "Atelectasis=ones,default=keep"}
