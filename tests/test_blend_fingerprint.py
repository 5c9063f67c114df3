"""A blend remembers what it was fitted on (blendfile.py): blend.json records per member its best.pt's
epoch and validation loss and a hash of its validation predictions, and make_submission.py --blend
refuses a member that changed since, in one line naming it. A model folder with best.pt but no
summary.json (an unfinished run) is named in a warning by blend.py and make_submission.py.

Members are model folders made without training (untrained ResNet-18 checkpoints at 32 px, made-up
validation predictions), so each test takes seconds."""
import json
import shutil
from pathlib import Path

import pytest

import make_submission
from common import UserError
from experiments import blend
from tests.test_submission_guard import fake_run, make_ckpt, refused, write_val_predictions


@pytest.fixture
def runs(tmp_path) -> Path:
    """runs/a/cardiomegaly and runs/b/cardiomegaly: two finished members sharing a validation split."""
    fake_run(tmp_path / "runs" / "a" / "cardiomegaly", seed=0)
    fake_run(tmp_path / "runs" / "b" / "cardiomegaly", seed=1)
    return tmp_path / "runs"


def fit(parent: Path, *runs: str) -> Path:
    out = parent / "blend.json"
    blend.main(["--runs", *[str(parent / r) for r in runs], "--out", str(out), "--min-rows", "10", "--folds", "2",
                "--no-progress"])
    return out


def submit_argv(demo_root, parent, blend_json, out) -> list[str]:
    return ["--data-root", str(demo_root), "--checkpoints", str(parent), "--blend", str(blend_json), "--out", str(out),
            "--cache-dir", str(parent.parent / "cache"), "--fill-missing", "0", "--workers", "1", "--no-progress"]


def test_blend_json_records_each_members_fingerprint(runs):
    made = json.loads(fit(runs, "a", "b").read_text())
    assert made["version"] == 2 and set(made["fingerprints"]) == {"a/cardiomegaly", "b/cardiomegaly"}
    a = made["fingerprints"]["a/cardiomegaly"]
    assert a["checkpoints"] == [{"epoch": 1, "val_loss": 0.5}] and a["predictions"] == "val_predictions.csv"
    assert len(a["sha256"]) == 64 and a["sha256"] != made["fingerprints"]["b/cardiomegaly"]["sha256"]


def test_a_retrained_member_is_refused_until_the_blend_is_fitted_again(demo_root, runs, tmp_path, capsys):
    blend_json = fit(runs, "a", "b")
    out = tmp_path / "sub.csv"
    make_submission.main(submit_argv(demo_root, runs, blend_json, out))
    # b retrained: another best epoch, another checkpoint, other validation predictions
    make_ckpt(runs / "b" / "cardiomegaly" / "best.pt", epoch=3, val_loss=0.25, seed=5)
    write_val_predictions(runs / "b" / "cardiomegaly" / "val_predictions.csv", seed=7)
    err = refused(capsys, make_submission.main, submit_argv(demo_root, runs, blend_json, out), out)
    assert err == (f"error: --blend {blend_json}: member b/cardiomegaly changed since the blend was fitted (best.pt "
                   f"epoch 1 -> 3, best.pt val loss 0.5 -> 0.25, val_predictions.csv differs), and its weights and "
                   f"calibration were fitted on the old one's outputs; rerun experiments/blend.py on its runs")
    fit(runs, "a", "b")
    make_submission.main(submit_argv(demo_root, runs, blend_json, out))


def test_each_part_of_the_fingerprint_is_checked(demo_root, runs, tmp_path, capsys):
    blend_json = fit(runs, "a", "b")
    out = tmp_path / "sub.csv"
    argv = submit_argv(demo_root, runs, blend_json, out)
    folder = runs / "a" / "cardiomegaly"
    preds = folder / "val_predictions.csv"
    kept = preds.read_bytes()
    preds.write_bytes(kept)  # rewritten alike: the same member
    make_submission.main(argv)

    write_val_predictions(preds, seed=9)
    assert "member a/cardiomegaly changed since the blend was fitted (val_predictions.csv differs)" in refused(
        capsys, make_submission.main, argv, out)
    preds.unlink()
    assert "(val_predictions.csv is gone)" in refused(capsys, make_submission.main, argv, out)
    preds.write_bytes(kept)
    shutil.copy(folder / "best.pt", tmp_path / "best.pt")
    make_ckpt(folder / "best.pt", epoch=2)  # same val loss and predictions, another epoch
    assert "member a/cardiomegaly changed since the blend was fitted (best.pt epoch 1 -> 2)" in refused(
        capsys, make_submission.main, argv, out)
    make_ckpt(folder / "best.pt", val_loss=0.75)
    assert "(best.pt val loss 0.5 -> 0.75)" in refused(capsys, make_submission.main, argv, out)
    shutil.copy(tmp_path / "best.pt", folder / "best.pt")
    make_submission.main(argv)


def test_a_blend_without_fingerprints_is_refused(demo_root, runs, tmp_path, capsys):
    blend_json = fit(runs, "a", "b")
    old = json.loads(blend_json.read_text())
    del old["fingerprints"]
    blend_json.write_text(json.dumps({**old, "version": 1}))
    err = refused(capsys, make_submission.main, submit_argv(demo_root, runs, blend_json, tmp_path / "sub.csv"),
                  tmp_path / "sub.csv")
    assert err == (f"error: --blend {blend_json}: records no fingerprints of its members (written by an older "
                   f"experiments/blend.py), so a retrained member would go unnoticed; rerun experiments/blend.py")


def test_a_retrained_fold_of_a_kfold_member_is_refused(demo_root, tmp_path, capsys):
    """A K-fold member's fingerprint holds each fold's best.pt and its oof_predictions.csv."""
    parent = tmp_path / "runs"
    folder = parent / "a" / "cardiomegaly"
    split = {"seed": 0, "folds": 3, "folds_sha1": "f0f0"}
    for i in range(3):
        make_ckpt(folder / f"fold{i}" / "best.pt", seed=i, split={**split, "fold": i})
        (folder / f"fold{i}" / "summary.json").write_text(json.dumps({"best_epoch": 1, "val_loss": 0.5,
                                                                     "split": {**split, "fold": i}}))
    write_val_predictions(folder / "oof_predictions.csv", fold=3)
    blend_json = fit(parent, "a")
    fingerprint = json.loads(blend_json.read_text())["fingerprints"]["a/cardiomegaly"]
    assert fingerprint["predictions"] == "oof_predictions.csv" and len(fingerprint["checkpoints"]) == 3
    out = tmp_path / "sub.csv"
    make_submission.main(submit_argv(demo_root, parent, blend_json, out))
    make_ckpt(folder / "fold1" / "best.pt", epoch=2, seed=1, split={**split, "fold": 1})
    assert "member a/cardiomegaly changed since the blend was fitted (fold1/best.pt epoch 1 -> 2)" in refused(
        capsys, make_submission.main, submit_argv(demo_root, parent, blend_json, out), out)


def test_an_unfinished_model_folder_is_named_by_blend_and_by_make_submission(demo_root, runs, tmp_path):
    """run a also holds pleural_effusion/best.pt without summary.json: a run still training (as with
    train.py --pathology all stopped part way). It is left out of the blend, said in one warning, and
    make_submission.py, which routes Pleural Effusion to that best.pt, says so too."""
    unfinished = runs / "a" / "pleural_effusion"
    make_ckpt(unfinished / "best.pt", names=("Pleural Effusion",))
    write_val_predictions(unfinished / "val_predictions.csv")
    with pytest.warns(UserWarning, match=r"1 model folder\(s\) with best.pt but no summary.json \(a run still training "
                                         rf"or stopped before its end\) left out of the blend: {unfinished}; finish"):
        blend_json = fit(runs, "a", "b")
    made = json.loads(blend_json.read_text())
    assert list(made["pathologies"]) == ["Cardiomegaly"] and set(made["fingerprints"]) == {"a/cardiomegaly",
                                                                                         "b/cardiomegaly"}
    with pytest.warns(UserWarning, match=rf"1 model folder\(s\) with best.pt but no summary.json .*: {unfinished}; "
                                         r"their best epoch so far is used"):
        result = make_submission.main(submit_argv(demo_root, runs, blend_json, tmp_path / "sub.csv"))
    assert {r["source"] for r in result["rows"] if r["pathology"] == "Pleural Effusion"} == {
        "a/pleural_effusion/best.pt"}
    with pytest.raises(UserError, match=rf"no model folder in it .*; {unfinished} has best.pt but no summary.json: "
                                        r"finish its training first"):
        blend.main(["--runs", str(unfinished), "--out", str(tmp_path / "b.json"), "--no-progress"])


def test_submission_out_that_is_a_members_validation_predictions_is_refused(demo_root, runs, capsys):
    """With --blend, the members' predictions are inputs too (their hashes are checked): --out may
    not be one."""
    blend_json = fit(runs, "a", "b")
    preds = runs / "a" / "cardiomegaly" / "val_predictions.csv"
    err = refused(capsys, make_submission.main, submit_argv(demo_root, runs, blend_json, preds), preds)
    assert err.startswith(f"error: --out {preds}: is the run's input --checkpoints (a/cardiomegaly/val_predictions.csv)")
