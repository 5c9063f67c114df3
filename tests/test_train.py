"""train.py and model.py: loss, sampler, freezing, checkpoints, and whole tiny runs."""
import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch

import sampler
import train
from model import masked_mse
from common import UserError
from model import Checkpoint, build_model, load_checkpoint, model_config, set_frozen

SPEC_HISTORY = ["epoch", "train_loss", "val_loss", "val_mse", "val_auc", "lr", "seconds"]


def test_masked_mse_counts_only_labelled_entries_and_masks_gradient():
    pred = torch.tensor([[0.5, -0.2], [0.1, 0.9], [-1.0, 0.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.0, -1.0], [-1.0, 1.0]])
    mask = torch.tensor([[True, False], [True, True], [False, True]])
    loss = masked_mse(pred, target, mask)
    labelled = [(0.5 - 1.0) ** 2, (0.1 - 0.0) ** 2, (0.9 + 1.0) ** 2, (0.0 - 1.0) ** 2]
    assert loss.item() == pytest.approx(np.mean(labelled))
    loss.backward()
    assert pred.grad[0, 1] == 0 and pred.grad[2, 0] == 0
    assert (pred.grad[mask] != 0).all()
    # nothing labelled: zero loss, zero gradient, no NaN
    assert masked_mse(pred, target, torch.zeros_like(mask)).item() == 0.0


def test_sample_weights_are_inverse_frequency_and_balance_each_value():
    t = np.array([1, -1, -1, -1, 0, np.nan], dtype=np.float32)[:, None]
    w = sampler.sample_weights(t)
    # 5 labelled rows, 3 values: weight = 5 / (3 * count)
    assert w[0] == pytest.approx(5 / 3) and w[1] == pytest.approx(5 / 9) and w[4] == pytest.approx(5 / 3)
    assert w[5] == 0.0  # a blank row is never drawn
    totals = {v: w[t[:, 0] == v].sum() for v in (-1, 0, 1)}
    assert totals[-1] == pytest.approx(totals[0]) == pytest.approx(totals[1])
    # several pathologies: the mean of the row's weights over its labelled pathologies
    t2 = np.array([[1, np.nan], [-1, 1], [-1, -1], [-1, np.nan]], dtype=np.float32)
    w2 = sampler.sample_weights(t2)
    assert w2[1] == pytest.approx((4 / (2 * 3) + 2 / (2 * 1)) / 2)


def test_epoch_sampler_draws_one_weighted_sample_per_epoch_whatever_the_number_of_ranks():
    w = np.array([0.0, 1.0, 0.0, 1.0])
    one = sampler.EpochSampler(w, 40, 8, seed=1)
    idx = [i for b in one for i in b]
    assert len(idx) == 40 and set(idx) <= {1, 3}
    assert idx == one.draw().tolist()  # one process trains the epoch's draw in order
    for world in (2, 3):
        ranks = [list(sampler.EpochSampler(w, 40, 8, seed=1, rank=r, world=world)) for r in range(world)]
        assert len({len(r) for r in ranks}) == 1  # ranks stay in step
        # step by step, the ranks' batches together are the next world x 8 samples of the same draw
        joined = [i for step in zip(*ranks) for b in step for i in b]
        assert joined == idx[:len(joined)] and len(idx) - len(joined) < 2 * world
    one.set_epoch(1)
    assert [i for b in one for i in b] != idx  # a new draw each epoch


def test_freeze_and_unfreeze_toggle_requires_grad_and_batchnorm_mode():
    model = build_model(model_config(["Cardiomegaly"], hidden=16))
    set_frozen(model, 2)
    model.train()
    assert not any(p.requires_grad for p in model.backbone.conv1.parameters())
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.layer2.parameters())
    assert not model.backbone.bn1.training and model.backbone.layer2[0].bn1.training
    set_frozen(model, 0)
    assert all(p.requires_grad for p in model.parameters()) and model.backbone.bn1.training


def test_fracture_gets_the_regularized_head():
    cfg = model_config(["Fracture", "Cardiomegaly"], head="auto", hidden=512, dropout=0.2)
    assert cfg["heads"][0] == {"pathology": "Fracture", "variant": "regularized", "hidden": 128, "dropout": 0.5}
    assert cfg["heads"][1]["variant"] == "mlp" and cfg["heads"][1]["hidden"] == 512


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config(["Cardiomegaly", "Fracture"], hidden=32)).eval()
    meta = {"view": "lateral", "epoch": 3, "metrics": {"val_mse": 0.5}, "train_config": {"lr": 1e-3},
            "preprocess": {"image_size": 32, "square": "resize", "mean": 0.449, "std": 0.226, "uncertain": "keep"},
            "calibration": {"Cardiomegaly": {"kind": "affine", "a": 0.5, "b": -0.2, "n": 10}, "Fracture": None}}
    Checkpoint.of(model, **meta).save(tmp_path / "m.pt")
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert ckpt.pathologies == ["Cardiomegaly", "Fracture"] and ckpt.view == "lateral"
    assert ckpt.calibration["Fracture"] is None and ckpt.calibration["Cardiomegaly"]["a"] == 0.5
    torch.load(tmp_path / "m.pt", weights_only=True)  # loads with weights_only, per SPEC


def test_corrupt_checkpoint_is_an_error_naming_the_file(tmp_path):
    model = build_model(model_config(["Cardiomegaly"], hidden=8))
    meta = {"view": "all", "epoch": 1, "metrics": {}, "train_config": {}, "calibration": {},
            "preprocess": {"image_size": 32, "square": "resize", "mean": 0.449, "std": 0.226, "uncertain": "keep"}}
    Checkpoint.of(model, **meta).save(tmp_path / "best.pt")
    data = (tmp_path / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.pt: corrupt or truncated"):
        Checkpoint.load(tmp_path / "cut.pt")
    Checkpoint.of(model, **{**meta, "preprocess": {**meta["preprocess"], "square": "fisheye"}}).save(tmp_path / "odd.pt")
    with pytest.raises(UserError, match="odd.pt: made for preprocessing"):
        Checkpoint.load(tmp_path / "odd.pt")


def test_a_tiny_batch_can_be_overfit():
    torch.manual_seed(0)
    model = build_model(model_config(["Cardiomegaly"], hidden=32, dropout=0.0))
    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    y = torch.tensor([1, -1, 0, 1, -1, -1, 1, 0], dtype=torch.float32)[:, None]
    mask = torch.ones_like(y, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model.train()
    for _ in range(40):
        loss = masked_mse(model(x), y, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.02


def read_csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_full_tiny_run_writes_every_file_of_a_model_folder(tiny_args, tmp_path):
    summaries = train.main(tiny_args("--pathology", "Cardiomegaly", "--epochs", "2"))
    out = tmp_path / "ckpt" / "cardiomegaly"
    assert sorted(p.name for p in out.iterdir()) == ["args.yaml", "best.pt", "curves.png", "history.csv", "last.pt",
                                                  "manifest.json", "summary.json", "tb", "val_predictions.csv"]
    rows = read_csv_rows(out / "history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [int(r["samples"]) for r in rows] == [50, 50]  # 50 rows: 3 batches of 16, then one of 2
    assert set(SPEC_HISTORY) <= set(rows[0]) and {"val_mse_cal", "const_mse"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("pathology", "n_train", "n_val", "best_epoch", "val_loss", "val_mse", "val_auc", "config"):
        assert key in summary
    assert summary["pathology"] == "Cardiomegaly" and summary["n_train"] > 0 and summary["n_val"] > 0
    assert summary["config"]["epochs"] == 2 and summaries[0]["best_epoch"] == summary["best_epoch"]
    best = Checkpoint.load(out / "best.pt")
    assert best.epoch == summary["best_epoch"] and best.preprocess["image_size"] == 32
    assert best.pathologies == ["Cardiomegaly"] and "Cardiomegaly" in best.calibration
    assert Checkpoint.load(out / "last.pt").epoch == 2


def test_early_stopping_stops(tiny_args, tmp_path, monkeypatch):
    losses = iter([0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    real = train.validate

    def worse_each_epoch(*a, **k):
        return {**real(*a, **k), "val_loss": next(losses)}
    monkeypatch.setattr(train, "validate", worse_each_epoch)
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly", "--epochs", "6", "--patience", "2"))
    assert s["epochs_run"] == 3 and s["best_epoch"] == 1 and s["early_stopped"]
    assert len(read_csv_rows(tmp_path / "ckpt" / "cardiomegaly" / "history.csv")) == 3


def test_unknown_pathology_is_a_clear_error(tiny_args, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args("--pathology", "Cardiomegally"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown pathology 'Cardiomegally'" in err and "Cardiomegaly" in err and "Support Devices" in err


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "-1"], "--epochs must be at least 1"),
    (["--image-size", "0"], "--image-size must be at least 32"),
    (["--weights", "resnet"], "--weights 'resnet' is not imagenet, none or an existing file"),
    (["--freeze", "7", "--arch", "resnet18"], "--freeze must be between 0 and 5"),
    (["--freeze", "-1"], "--freeze must be >= 0, got -1"),
    # timm archs: the bound is the model's own number of layer groups, known before any data is read
    (["--freeze", "9", "--arch", "timm/test_resnet"], "--freeze must be between 0 and 5 for timm/test_resnet"),
    (["--freeze", "14", "--arch", "timm/vit_tiny_patch16_224"],
     "--freeze must be between 0 and 13 for timm/vit_tiny_patch16_224"),
])
def test_bad_arguments_are_rejected_before_any_work(tiny_args, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args("--pathology", "Cardiomegaly", *flags))
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ckpt").exists()


def test_view_filters_rows_and_names_the_folder(tiny_args, tmp_path, demo_root):
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly", "--view", "lateral"))
    out = tmp_path / "ckpt" / "cardiomegaly_lateral"
    assert (out / "best.pt").is_file() and Checkpoint.load(out / "best.pt").view == "lateral"
    import pandas as pd
    df = pd.read_csv(demo_root / "student_labels" / "train2023.csv")
    lateral = df[(df["Frontal/Lateral"] == "Lateral") & df["Cardiomegaly"].notna()]
    assert 0 < s["n_train"] + s["n_val"] <= len(lateral)


def test_multi_head_writes_one_checkpoint_for_all_its_pathologies(tiny_args, tmp_path):
    names = ["Cardiomegaly", "Pleural Effusion", "Fracture"]
    [s] = train.main(tiny_args("--pathology", *names, "--multi-head"))
    ckpt = Checkpoint.load(tmp_path / "ckpt" / "multi_head" / "best.pt")
    assert ckpt.pathologies == names and set(ckpt.calibration) == set(names)
    assert set(s["per_pathology"]) == set(names)
    assert all(s["per_pathology"][n]["n"] > 0 for n in names)


def test_resume_of_a_finished_run_does_nothing(tiny_args, tmp_path):
    train.main(tiny_args("--pathology", "Cardiomegaly"))
    best = tmp_path / "ckpt" / "cardiomegaly" / "best.pt"
    before = best.stat().st_mtime_ns
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly", "--resume"))
    assert best.stat().st_mtime_ns == before and s["epochs_run"] == 1


def test_failed_checkpoint_write_keeps_the_previous_one(tiny_args, tmp_path, monkeypatch):
    train.main(tiny_args("--pathology", "Cardiomegaly"))
    best = tmp_path / "ckpt" / "cardiomegaly" / "best.pt"
    before = best.read_bytes()

    def disk_full(obj, f, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=r"could not write .*\.pt: No space left on device"):
        train.main(tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--resume"))
    assert best.read_bytes() == before
    assert not [p for p in best.parent.iterdir() if ".tmp" in p.name]


def test_imagenet_weights_that_cannot_be_downloaded_are_one_clear_error(monkeypatch):
    import torchvision

    def offline(self, *a, **k):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", offline)
    from weights import load_pretrained
    with pytest.raises(UserError, match=r"could not download the ImageNet ResNet-50 weights .*--weights PATH .*--weights none"):
        load_pretrained(build_model(model_config(["Cardiomegaly"], hidden=8)), "imagenet")


def test_weights_path_loads_a_torchvision_state_dict_with_conv1_summed_over_colour(tmp_path):
    import torchvision
    from weights import load_pretrained
    reference = torchvision.models.resnet50(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    model = build_model(model_config(["Cardiomegaly"], hidden=8))
    load_pretrained(model, str(tmp_path / "resnet50.pth"))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True))
    assert torch.equal(model.backbone.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)


def test_a_version_1_checkpoint_still_loads(tmp_path):
    """Files written before the Checkpoint type (a plain dict, version 1, no 'split') keep loading."""
    torch.manual_seed(0)
    model = build_model(model_config(["Cardiomegaly"], hidden=8)).eval()
    old = {"format": "cxr-regression", "version": 1, "model_config": {k: v for k, v in model.config.items() if k != "arch"},
           "pathologies": ["Cardiomegaly"], "state_dict": model.state_dict(), "view": "all", "epoch": 4,
           "preprocess": {"image_size": 32, "square": "resize", "mean": 0.449, "std": 0.226, "uncertain": "keep"},
           "metrics": {"val_loss": 0.5}, "train_config": {}, "calibration": {"Cardiomegaly": None}}
    torch.save(old, tmp_path / "old.pt")
    loaded, ckpt = load_checkpoint(tmp_path / "old.pt")
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert ckpt.epoch == 4 and ckpt.split == {} and ckpt.training_state is None and not ckpt.interrupted


def test_last_pt_alone_resumes_a_run_and_its_history(tiny_args, tmp_path):
    """The whole state is in last.pt: with history.csv deleted, a resume still ends with every epoch's row."""
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "1")
    train.main(argv)
    folder = tmp_path / "ckpt" / "cardiomegaly"
    first = read_csv_rows(folder / "history.csv")
    ts = Checkpoint.load(folder / "last.pt").training_state
    assert ts["epoch"] == 1 and ts["pos"] == 0 and [r["epoch"] for r in ts["history"]] == [1]
    assert ts["optimizer"]["state"], "optimiser moments saved"
    (folder / "history.csv").unlink()
    train.main(argv + ["--epochs", "2", "--resume"])
    rows = read_csv_rows(folder / "history.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == first[0]


def test_sampler_cap_bounds_how_often_a_rare_value_is_drawn():
    # 1 uncertain row in 200: inverse frequency would draw it 200 / (3 * 1) = 67 times a uniform draw
    t = np.array([0.0] + [1.0] * 60 + [-1.0] * 139, dtype=np.float32)[:, None]
    old = sampler.sample_weights(t)
    assert old[0] == pytest.approx(200 / 3)
    w = sampler.sample_weights(t, cap=5.0)
    assert w.max() == pytest.approx(5.0) and w[0] == pytest.approx(5.0)
    assert w.mean() == pytest.approx(1.0)  # still a re-weighting of a uniform draw
    assert w[1] > w[61]  # the ordering of the rest is kept: positives (30%) still outweigh negatives
    assert np.array_equal(sampler.sample_weights(t, cap=0.0), old)  # 0: the old, unbounded rule


def test_out_of_sample_score_is_cross_validated_not_refitted_on_the_same_rows():
    """Pure-noise outputs: the map fitted on the validation rows looks better in-sample than it is;
    the cross-validated score (what picks best.pt) must not beat the constant predictor by luck."""
    from calibration import fit_calibration
    rng = np.random.default_rng(3)
    y = rng.uniform(-1, 1, 40)
    t = rng.choice([-1.0, 1.0], 40)
    prior = 0.0
    cal = fit_calibration("isotonic", y, t, prior=prior)
    m = train.pathology_metrics(y, t, prior, cal)
    assert m["val_mse_cv"] == pytest.approx(cal["cv_mse"])
    assert m["val_mse_cv"] >= m["val_mse_cal"] - 1e-12  # in-sample is the optimistic one
    refit = fit_calibration("isotonic", y, t)  # no guard: the map itself, scored on its own rows
    in_sample = float(np.mean((np.clip(refit["a"] * y + refit["b"], -1, 1) - t) ** 2))
    assert refit["cv_mse"] > in_sample  # the in-sample score of a noise fit is optimistic


def test_history_and_summary_report_in_and_out_of_sample_scores(tiny_args, tmp_path):
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly"))
    rows = read_csv_rows(tmp_path / "ckpt" / "cardiomegaly" / "history.csv")
    assert {"val_mse_cv", "val_mse_cal"} <= set(rows[0])
    best = Checkpoint.load(tmp_path / "ckpt" / "cardiomegaly" / "best.pt")
    assert float(rows[0]["val_loss"]) == pytest.approx(best.calibration["Cardiomegaly"]["cv_mse"], abs=1e-6)
    assert s["val_loss"] == pytest.approx(s["per_pathology"]["Cardiomegaly"]["val_mse_cv"])


def test_uncertain_policy_shapes_training_targets_only(tiny_args, tmp_path):
    """--uncertain ones / ignore change what the model trains on, never what it is scored against:
    validation (val_predictions.csv, n_val, best.pt's choice) keeps the source labels, uncertain = 0,
    as the leaderboard scores them."""
    import pandas as pd
    runs = {}
    for policy in ("keep", "ones", "ignore"):
        summary = train.main(tiny_args("--pathology", "Cardiomegaly", "--uncertain", policy,
                                       "--out-dir", str(tmp_path / policy)))[0]
        runs[policy] = summary, pd.read_csv(tmp_path / policy / "cardiomegaly" / "val_predictions.csv")
    keep, keep_val = runs["keep"]
    assert (keep_val["target"] == 0).sum() > 0, "the demo has uncertain validation rows"
    for policy in ("ones", "ignore"):
        summary, val = runs[policy]
        assert summary["n_val"] == keep["n_val"] == len(val)
        pd.testing.assert_frame_equal(val[["path", "target"]], keep_val[["path", "target"]])
    # the training targets do follow the policy: ignore masks the uncertain training rows
    assert runs["ignore"][0]["n_train"] < keep["n_train"] == runs["ones"][0]["n_train"]
    per = {p: s["per_pathology"]["Cardiomegaly"] for p, (s, _) in runs.items()}
    assert per["keep"]["n_uncertain_loss"] == per["ones"]["n_uncertain_loss"] > 0 == per["ignore"]["n_uncertain_loss"]
    assert [per[p]["uncertain"] for p in ("keep", "ones", "ignore")] == ["keep", "ones", "ignore"]
    # the constant predictor stays the mean of the source labels the metric scores
    assert per["keep"]["train_mean"] == per["ones"]["train_mean"]


def test_summary_reports_normalised_mse_beside_mse(tiny_args, tmp_path):
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly"))
    per = s["per_pathology"]["Cardiomegaly"]
    t = pd.read_csv(tmp_path / "ckpt" / "cardiomegaly" / "val_predictions.csv")["target"].dropna()
    assert per["val_nmse"] == pytest.approx(per["val_mse_cv"] / t.var(ddof=0))
    assert "val_nmse" in read_csv_rows(tmp_path / "ckpt" / "cardiomegaly" / "history.csv")[0]


def test_timm_arch_with_layer_decay_ema_and_checkpointing_trains_and_submits(tiny_args, tmp_path, demo_root):
    """--arch timm/NAME, --layer-decay, --ema and --grad-checkpointing through train.main, then the
    submission rebuilds the model from best.pt alone."""
    import make_submission
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly", "--arch", "timm/resnet10t", "--layer-decay", "0.5",
                               "--ema", "0.5", "--grad-checkpointing", "--epochs", "2"))
    folder = tmp_path / "ckpt" / "cardiomegaly"
    last, best = Checkpoint.load(folder / "last.pt"), Checkpoint.load(folder / "best.pt")
    lrs = [g["lr"] for g in last.training_state["optimizer"]["param_groups"]]
    assert len(lrs) > 2 and all(b == pytest.approx(a * 0.5) for a, b in zip(lrs, lrs[1:]))  # heads first, x0.5 deeper
    assert last.training_state["ema"] is not None and best.model_config["arch"] == "timm/resnet10t"
    ema = {k.removeprefix("module."): v for k, v in last.training_state["ema"].items() if k.startswith("module.")}
    if best.epoch == 2:  # best.pt holds the average, not the raw weights it was averaged from
        assert all(torch.equal(ema[k], best.state_dict[k]) for k in best.state_dict)
        assert not all(torch.equal(last.state_dict[k], best.state_dict[k]) for k in best.state_dict)
    out = make_submission.main(["--data-root", str(demo_root), "--checkpoints", str(tmp_path / "ckpt"),
                                "--out", str(tmp_path / "sub.csv"), "--cache-dir", str(tmp_path / "cache"),
                                "--fill-missing", "0", "--no-progress"])
    assert out["submission"]["Cardiomegaly"].between(-1, 1).all()


def test_freeze_at_a_timm_models_bound_trains_only_the_heads(tiny_args, tmp_path):
    train.main(tiny_args("--pathology", "Cardiomegaly", "--out-dir", str(tmp_path / "first")))
    first = Checkpoint.load(tmp_path / "first" / "cardiomegaly" / "best.pt").state_dict
    train.main(tiny_args("--pathology", "Cardiomegaly", "--freeze", "5", "--unfreeze-epoch", "never",
                         "--weights", str(tmp_path / "first" / "cardiomegaly" / "best.pt")))
    after = Checkpoint.load(tmp_path / "ckpt" / "cardiomegaly" / "best.pt").state_dict
    backbone = [k for k in after if k.startswith("backbone.") and after[k].is_floating_point()]
    heads = [k for k in after if k.startswith("heads.")]
    assert backbone and all(torch.equal(after[k], first[k]) for k in backbone)  # BatchNorm statistics too
    assert not all(torch.equal(after[k], first[k]) for k in heads)
