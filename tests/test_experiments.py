"""experiments/: the grid search (grid, pass-through, skipping, shards, results.csv) and the offline
flip / contrast copies (pixels, their use by train.py --augmented, the missing-copy error)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cache as cache_module
import dataset
import jobs
import train
from experiments import contrast_images, flip_images, gridsearch

ROOT = Path(__file__).resolve().parents[1]


def _fake_train(calls: list, val_loss=lambda argv: 0.5):
    """A train.main stand-in that records its argv and writes the summary.json and history.csv a
    finished run leaves, so the grid's bookkeeping is tested without training."""
    def fake(argv):
        args = train.parse_args(argv)
        calls.append(list(argv))
        out = args.out_dir / dataset.slug(args.pathology[0])
        out.mkdir(parents=True, exist_ok=True)
        summary = {"pathology": args.pathology[0], "best_epoch": 1, "epochs_run": 1, "val_loss": val_loss(argv),
                   "val_mse": 0.4, "val_mse_cal": 0.3, "const_mse": 0.6, "val_auc": 0.7, "config": train.jsonable(vars(args))}
        (out / "summary.json").write_text(json.dumps(summary))
        (out / "history.csv").write_text("epoch,seconds\n1,1.5\n2,2.25\n")
        return [summary]
    return fake


def _flag(argv: list, name: str) -> str:
    """The value of the last occurrence of a flag (the one argparse keeps)."""
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]


# ---------------------------------------------------------------------------------------------
# gridsearch.py

def test_default_grid_size_order_and_folder_names():
    args, passthrough = gridsearch.parse_args(["--pathology", "cardiomegaly", "--out-dir", "g"])
    grid = gridsearch.make_grid(args.hidden, args.freeze, args.lr)
    assert args.pathology == "Cardiomegaly" and passthrough == [] and args.shard == (1, 1)
    assert [(c["hidden"], c["freeze"], c["lr"]) for c in grid] == [
        (256, 3, 5e-4), (256, 3, 1e-4), (256, 5, 5e-4), (256, 5, 1e-4),
        (512, 3, 5e-4), (512, 3, 1e-4), (512, 5, 5e-4), (512, 5, 1e-4)]
    assert [gridsearch.config_name(c) for c in grid[:2]] == ["hidden256_freeze3_lr0.0005", "hidden256_freeze3_lr0.0001"]
    assert len(gridsearch.make_grid([1, 2, 2], [0], [1e-3, 1e-2, 1e-3])) == 4  # repeated values count once


def test_training_flags_pass_through_unchanged(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train, "main", _fake_train(calls))
    extra = ["--epochs", "7", "--image-size", "48", "--data-root", str(tmp_path / "data"), "--uncertain", "ignore",
             "--augmented", "flip", "contrast", "--weights", "none", "--no-sampler", "--seed", "3"]
    rows = gridsearch.main(["--pathology", "Pleural Effusion", "--hidden", "64", "--freeze", "1", "4",
                            "--lr", "0.001", *extra, "--out-dir", str(tmp_path / "grid")])
    assert len(calls) == 2
    for argv, freeze in zip(calls, ["1", "4"]):
        start = argv.index("--epochs")
        assert argv[start:start + len(extra)] == extra  # same flags, same order, same values
        assert _flag(argv, "--pathology") == "Pleural Effusion" and _flag(argv, "--hidden") == "64"
        assert _flag(argv, "--freeze") == freeze and float(_flag(argv, "--lr")) == 0.001
        assert _flag(argv, "--out-dir") == str(tmp_path / "grid" / f"hidden64_freeze{freeze}_lr0.001")
        assert "--resume" in argv
    assert [(r["hidden"], r["freeze"], r["lr"], r["seconds"]) for r in rows] == [(64, 1, 0.001, 3.75), (64, 4, 0.001, 3.75)]


def test_bad_flags_are_rejected_before_any_training(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(train, "main", _fake_train(calls))
    base = ["--pathology", "Cardiomegaly", "--out-dir", str(tmp_path / "g")]
    for extra, message in [(["--shard", "3/2"], "between 1 and N"), (["--shard", "0/2"], "between 1 and N"),
                           (["--shard", "1of2"], "expected I/N"), (["--epochs", "0"], "--epochs must be at least 1"),
                           (["--hidden", "256", "0"], "--hidden must be at least 1"),
                           (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
                           (["--resume"], "gridsearch sets it itself")]:
        with pytest.raises(SystemExit) as e:
            gridsearch.main(base + extra)
        assert e.value.code == 2 and message in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):
        gridsearch.main(["--pathology", "Cardiomegally", "--out-dir", str(tmp_path / "g")])
    assert "unknown pathology 'Cardiomegally'" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "g").exists()


def test_two_shards_cover_the_grid_exactly_once_and_results_are_sorted(tmp_path, monkeypatch):
    calls = []
    loss = lambda argv: 0.1 if float(_flag(argv, "--lr")) == 1e-4 else 0.9  # lr 1e-4 does best
    monkeypatch.setattr(train, "main", _fake_train(calls, loss))
    out = tmp_path / "grid"
    base = ["--pathology", "Cardiomegaly", "--out-dir", str(out), "--weights", "none"]
    ran = {}
    for shard in ["1/2", "2/2"]:
        n0 = len(calls)
        gridsearch.main(base + ["--shard", shard])
        ran[shard] = [Path(_flag(a, "--out-dir")).name for a in calls[n0:]]
    everything = [gridsearch.config_name(c) for c in gridsearch.make_grid([256, 512], [3, 5], [5e-4, 1e-4])]
    assert len(ran["1/2"]) == len(ran["2/2"]) == 4
    assert sorted(ran["1/2"] + ran["2/2"]) == sorted(everything)  # every config once, none twice
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"hidden", "freeze", "lr", "val_loss", "val_mse", "val_mse_cal", "val_auc",
                                "best_epoch", "seconds"} <= set(rows[0])
    assert [float(r["val_loss"]) for r in rows] == [0.1] * 4 + [0.9] * 4  # best first
    assert {float(r["lr"]) for r in rows[:4]} == {1e-4}
    assert not list(out.glob(".*tmp*"))  # written atomically: no temporary file left
    # --collect trains nothing and rebuilds the same file
    n0 = len(calls)
    assert [r["config"] for r in gridsearch.main(base + ["--collect"])] == [r["config"] for r in rows]
    assert len(calls) == n0


def test_finished_configurations_are_not_trained_again(tiny_args, tmp_path, monkeypatch, capsys):
    """A real (tiny) configuration, then the same command again: nothing retrains."""
    argv = ["--pathology", "Cardiomegaly", "--hidden", "8", "--freeze", "5", "--lr", "1e-3",
            *tiny_args(), "--out-dir", str(tmp_path / "grid")]  # the grid's --out-dir is the last, so it wins
    first = gridsearch.main(argv)
    assert [(r["hidden"], r["freeze"], r["lr"]) for r in first] == [(8, 5, 1e-3)]
    assert all(r["epochs_run"] == 1 and r["seconds"] > 0 for r in first)
    best = sorted((tmp_path / "grid").glob("*/cardiomegaly/best.pt"))
    assert [p.parent.parent.name for p in best] == ["hidden8_freeze5_lr0.001"]
    stamps = {p: p.stat().st_mtime_ns for p in best}
    results = (tmp_path / "grid" / "results.csv").read_text()

    def no_training(*a, **k):
        raise AssertionError("a finished configuration was trained again")
    monkeypatch.setattr(train, "train_until", no_training)
    capsys.readouterr()
    again = gridsearch.main(argv)
    assert "already finished" in capsys.readouterr().out
    assert again == first and (tmp_path / "grid" / "results.csv").read_text() == results
    assert {p: p.stat().st_mtime_ns for p in best} == stamps


def test_gridsearch_runs_as_a_script_and_reports_errors_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "experiments/gridsearch.py", "--pathology", "Cardiomegaly",
                        "--out-dir", str(tmp_path / "g"), "--shard", "3/2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--shard 3/2: I must be between 1 and N (1-based), got I=3, N=2" in r.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# flip_images.py, contrast_images.py and train.py --augmented

def _aug_argv(demo_root, tmp_path, *extra):
    return ["--data-root", str(demo_root), "--cache-dir", str(tmp_path / "cache"), "--image-size", "32",
            "--workers", "1", "--no-progress", *extra]


def _all(cache):
    return cache.get(list(range(len(cache))))


def test_flipped_pixels_are_the_source_flipped(demo_root, tmp_path, capsys):
    copy = flip_images.main(_aug_argv(demo_root, tmp_path))
    base = cache_module.ImageCache(copy.folder.with_name(copy.folder.name.split("+")[0]))
    assert copy.folder.name == base.folder.name + "+flip" and copy.paths == base.paths
    assert torch.equal(_all(copy), _all(base).flip(-1)) and not torch.equal(_all(copy), _all(base))
    out = capsys.readouterr().out
    assert f"copy       {copy.folder}" in out
    assert f"train CSV: {demo_root / 'student_labels' / 'train2023.csv'} (found under the data root" in out
    stamp = copy.shard_path(0).stat().st_mtime_ns
    again = flip_images.main(_aug_argv(demo_root, tmp_path))  # complete: found, not rebuilt
    assert again.folder == copy.folder and copy.shard_path(0).stat().st_mtime_ns == stamp


def test_contrast_factor_one_is_identity_and_clipping_holds(demo_root, tmp_path):
    one = contrast_images.main(_aug_argv(demo_root, tmp_path, "--factor", "1"))
    base = cache_module.ImageCache(one.folder.with_name(one.folder.name.split("+")[0]))
    assert one.folder.name.endswith("+contrast1") and torch.equal(_all(one), _all(base))
    strong = contrast_images.main(_aug_argv(demo_root, tmp_path, "--factor", "3"))
    assert strong.folder.name.endswith("+contrast3")
    x = _all(base).double()
    mean = x.mean(dim=(-2, -1), keepdim=True)
    unclipped = (x - mean) * 3 + mean
    got = _all(strong)
    assert got.dtype == torch.uint8 and (unclipped > 255).any() and (unclipped < 0).any()  # clipping is exercised
    assert torch.equal(got[unclipped >= 255.5], torch.full_like(got[unclipped >= 255.5], 255))
    assert torch.equal(got[unclipped <= -0.5], torch.zeros_like(got[unclipped <= -0.5]))
    assert (got.double() - unclipped.clamp(0, 255)).abs().max() <= 1.0  # rounding only
    # the default factor is 1.5, and the scripts reject what cannot be a contrast factor
    assert contrast_images.main(_aug_argv(demo_root, tmp_path)).folder.name.endswith("+contrast1.5")
    with pytest.raises(SystemExit):
        contrast_images.main(_aug_argv(demo_root, tmp_path, "--factor", "-1"))


def test_augmented_triples_training_samples_and_leaves_validation_alone(demo_root, tiny_args, tmp_path, monkeypatch):
    made = []

    class Recording(dataset.XrayDataset):
        def __init__(self, sources, slots, targets, spread=None):
            super().__init__(sources, slots, targets, spread)
            made.append(self)
    monkeypatch.setattr(jobs, "XrayDataset", Recording)
    monkeypatch.setattr(train, "train_step", lambda *a, **k: torch.zeros(2))  # what is trained on, not the training
    flip_images.main(_aug_argv(demo_root, tmp_path))
    contrast_images.main(_aug_argv(demo_root, tmp_path))
    [plain] = train.main(tiny_args("--pathology", "Cardiomegaly"))
    train_plain, val_plain = made
    [aug] = train.main(tiny_args("--pathology", "Cardiomegaly", "--augmented", "flip", "contrast",
                                 "--out-dir", str(tmp_path / "aug")))
    train_aug, val_aug = made[2:]
    assert len(train_aug) == 3 * len(train_plain) == 3 * plain["n_train"] and aug["n_sources"] == 3
    assert [s.folder.name.split("+")[-1] for s in train_aug.sources[1:]] == ["flip", "contrast1.5"]
    # a copy is its source row again: same labels (and hence patient) as the original
    n = len(train_plain)
    for i in (0, n // 2, n - 1):
        assert torch.equal(train_aug[i][1], train_aug[i + n][1]) and torch.equal(train_aug[i][1], train_aug[i + 2 * n][1])
        assert torch.equal(train_aug[i + n][0], train_aug[i][0].flip(-1))
    # validation: the same rows, from the base cache only
    assert aug["n_val"] == plain["n_val"] and len(val_aug) == len(val_plain)
    assert len(val_aug.sources) == 1 and val_aug.sources[0].folder == val_plain.sources[0].folder
    assert (val_aug.slots == val_plain.slots).all() and torch.equal(val_aug.targets, val_plain.targets)
    assert not set(val_aug.slots) & set(train_aug.slots)


def test_missing_augmentation_is_a_clear_error(tiny_args, capsys):
    with pytest.raises(dataset.UserError, match=r"augmented copy 'flip' is not built .*experiments/flip_images\.py"):
        train.main(tiny_args("--pathology", "Cardiomegaly", "--augmented", "flip"))
    assert dataset.run_cli(train.main, tiny_args("--pathology", "Cardiomegaly", "--augmented", "contrast")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: augmented copy 'contrast' is not built") and "experiments/contrast_images.py" in err
