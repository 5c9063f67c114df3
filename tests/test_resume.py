"""--resume as a preempted cluster job uses it: on another device, from the middle of an epoch, after
a hard kill, and refused when the command is another run; and the failures that must end in one
line with last.pt kept (a NaN loss, a full disk, too few batches for the ranks)."""
import argparse
import os
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch

import train
from common import UserError
from model import Checkpoint
from runtime import Runtime
from sampler import EpochSampler


def run_files(folder):
    """What a finished run leaves that a resume must reproduce: weights and history."""
    return (Checkpoint.load(folder / "best.pt"), Checkpoint.load(folder / "last.pt"),
            pd.read_csv(folder / "history.csv").drop(columns=["seconds", "train_seconds", "train_images_per_s"]))


def assert_same_run(a, b):
    (best_a, last_a, hist_a), (best_b, last_b, hist_b) = a, b
    assert best_a.epoch == best_b.epoch and last_a.epoch == last_b.epoch
    for x, y in ((best_a, best_b), (last_a, last_b)):
        for k in x.state_dict:
            assert torch.equal(x.state_dict[k], y.state_dict[k]), k  # bit-identical
    pd.testing.assert_frame_equal(hist_a, hist_b, check_exact=True)


def signal_at_call(monkeypatch, n, signum=signal.SIGTERM):
    """Deliver `signum` to this process during the n-th training loss (mid-epoch); returns the real
    loss function, to put back."""
    real, calls = train.loss_terms, []

    def loss_terms(*a, **k):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signum)
        return real(*a, **k)
    monkeypatch.setattr(train, "loss_terms", loss_terms)
    return real


@pytest.mark.parametrize("extra", [[], ["--ema", "0.9", "--accum-steps", "2"]], ids=["plain", "ema-accum"])
def test_sigterm_mid_epoch_then_resume_is_bit_identical_to_an_uninterrupted_run(tiny_args, tmp_path, monkeypatch,
                                                                                 extra):
    """Dropout on, 2 epochs: SIGTERM in the middle of epoch 2 saves last.pt at that batch; --resume
    goes on from the next batch with the same sample order, schedule and random streams."""
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--dropout", "0.3", "--patience", "0", *extra)
    train.main(argv + ["--out-dir", str(tmp_path / "straight")])
    real = signal_at_call(monkeypatch, 6)  # 4 batches per epoch: the second batch of epoch 2
    with pytest.raises(SystemExit) as e:
        train.main(argv + ["--out-dir", str(tmp_path / "split")])
    assert e.value.code == 130
    last = Checkpoint.load(tmp_path / "split" / "cardiomegaly" / "last.pt")
    assert last.interrupted and last.training_state["epoch"] == 1 and last.training_state["pos"] == 32
    monkeypatch.setattr(train, "loss_terms", real)
    train.main(argv + ["--out-dir", str(tmp_path / "split"), "--resume"])
    assert_same_run(run_files(tmp_path / "straight" / "cardiomegaly"), run_files(tmp_path / "split" / "cardiomegaly"))


class HardKill(BaseException):
    """A node failure: no signal, nothing saved on the way out."""


def test_a_hard_kill_loses_at_most_save_every_and_resumes_exactly(tiny_args, tmp_path, monkeypatch):
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--patience", "0", "--save-every", "1e-9")
    train.main(argv + ["--out-dir", str(tmp_path / "straight")])
    real, calls = train.loss_terms, []

    def die(*a, **k):
        calls.append(1)
        if len(calls) == 7:  # the third of epoch 2's four batches
            raise HardKill
        return real(*a, **k)
    monkeypatch.setattr(train, "loss_terms", die)
    with pytest.raises(HardKill):
        train.main(argv + ["--out-dir", str(tmp_path / "split")])
    last = Checkpoint.load(tmp_path / "split" / "cardiomegaly" / "last.pt")
    ts = last.training_state
    assert ts["epoch"] == 1 and ts["pos"] == 32 and not last.interrupted  # saved mid-epoch 2
    monkeypatch.setattr(train, "loss_terms", real)
    train.main(argv + ["--out-dir", str(tmp_path / "split"), "--resume"])
    assert_same_run(run_files(tmp_path / "straight" / "cardiomegaly"), run_files(tmp_path / "split" / "cardiomegaly"))


def test_resume_loads_last_pt_on_the_cpu_whatever_the_device(tiny_args, tmp_path, monkeypatch):
    """A GPU run that loaded last.pt onto its device put the saved RNG states there, and
    torch.set_rng_state takes a CPU ByteTensor only. 'meta' stands in for the GPU: the resume must
    load on the CPU and move to the device only what belongs there."""
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "1")
    train.main(argv)
    saved = Checkpoint.load(tmp_path / "ckpt" / "cardiomegaly" / "last.pt").training_state["rng"]["torch"]
    moved = []

    def on_meta(args, distributed=True, join=True):
        rt = Runtime(torch.device("meta"), progress=False)
        moved.append(rt)
        return rt
    monkeypatch.setattr(train, "setup_runtime", on_meta)
    [s] = train.main(argv + ["--resume"])  # finished: restores everything, trains nothing
    assert moved and s["epochs_run"] == 1
    assert torch.equal(torch.get_rng_state(), saved)


def test_resume_is_refused_when_the_command_is_another_run(tiny_args, tmp_path, demo_root, capsys):
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "2")
    train.main(argv + ["--epochs", "1"])  # one of two epochs done
    for flags, needle in [(["--seed", "1"], "--seed 0 -> 1"), (["--val-frac", "0.3"], "--val-frac 0.2 -> 0.3"),
                          (["--arch", "resnet50"], "--arch timm/test_resnet -> resnet50"),
                          (["--uncertain", "ones"], "--uncertain keep -> ones"),
                          (["--split-seed", "3"], "the validation patients differ"),
                          (["--image-size", "40"], "--image-size 32 -> 40")]:
        with pytest.raises(UserError, match="--resume: .*last.pt is another run") as e:
            train.main(argv + ["--resume", *flags])
        assert needle in str(e.value) and "another --out-dir" in str(e.value)
    train.main(argv + ["--resume", "--epochs", "2", "--patience", "5"])  # where and how long may change
    # finished, then asked again with another seed: refused too, not the old summary
    with pytest.raises(UserError, match=r"--seed 0 -> 1"):
        train.main(argv + ["--resume", "--seed", "1"])


def test_resume_is_refused_when_the_readable_images_changed(tiny_args, tmp_path, demo_root):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--data-root", str(root))
    train.main(argv + ["--epochs", "1"])
    table = pd.read_csv(root / "student_labels" / "train2023.csv")
    gone = next(p for p, v in zip(table["Path"], table["Cardiomegaly"]) if v == v and (root / p).is_file())
    (root / gone).unlink()
    with pytest.raises(UserError, match="the training rows, their labels or the split.s patients differ"):
        train.main(argv + ["--resume", "--cache-dir", str(tmp_path / "cache2")])


def test_a_nan_loss_is_one_clear_error_and_last_pt_keeps_the_good_state(tiny_args, tmp_path, monkeypatch):
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "3")
    real, calls = train.loss_terms, []

    def nan_in_epoch_2(out, targets, mask):
        calls.append(1)
        loss, n = real(out, targets, mask)
        return (loss * float("nan"), n) if len(calls) > 5 else (loss, n)  # from epoch 2
    monkeypatch.setattr(train, "loss_terms", nan_in_epoch_2)
    with pytest.raises(UserError, match=r"training loss is not finite in epoch 2 .*last.pt keeps the last state saved"):
        train.main(argv)
    folder = tmp_path / "ckpt" / "cardiomegaly"
    last = Checkpoint.load(folder / "last.pt")
    assert last.epoch == 1 and all(torch.isfinite(v.float()).all() for v in last.state_dict.values())
    assert Checkpoint.load(folder / "best.pt").epoch == 1


def test_a_full_disk_in_torch_save_is_one_clear_error(tiny_args, tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError, not OSError."""
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "2")
    real, calls = torch.save, []

    def full_after_two(obj, f, *a, **k):
        calls.extend([] if "shard" in str(f) else [1])  # image cache shards go through torch.save too
        if len(calls) > 2:  # epoch 1's best.pt and last.pt are written
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_after_two)
    with pytest.raises(UserError, match=r"could not write .*\.pt: .*unexpected pos.*disk full"):
        train.main(argv)
    assert Checkpoint.load(tmp_path / "ckpt" / "cardiomegaly" / "last.pt").epoch == 1


def test_too_few_rows_for_the_ranks_is_refused_and_a_small_last_chunk_is_left_out():
    with pytest.raises(UserError, match="3 training rows make no batch of at least 2 rows for each of the 2 processes"):
        EpochSampler(None, 3, 16, seed=0, rank=0, world=2)
    ranks = [list(EpochSampler(None, 40, 16, seed=0, rank=r, world=2)) for r in range(2)]
    assert [[len(b) for b in r] for r in ranks] == [[16, 4], [16, 4]]  # the last 8 rows split between the ranks
    assert [len(b) for b in EpochSampler(None, 35, 16, seed=0, rank=1, world=2)] == [16]  # 3 left: too few for 2


def test_warmup_with_plateau_is_refused_not_ignored(tiny_args, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(tiny_args("--pathology", "Cardiomegaly", "--schedule", "plateau", "--warmup-epochs", "1"))
    assert "--warmup-epochs works with --schedule cosine only" in capsys.readouterr().err
    assert train.parse_args(tiny_args("--pathology", "Cardiomegaly", "--schedule", "plateau")).warmup_epochs == 0


def test_split_seed_lets_seeds_share_a_split(tiny_args, tmp_path):
    [a] = train.main(tiny_args("--pathology", "Cardiomegaly", "--out-dir", str(tmp_path / "a")))
    [b] = train.main(tiny_args("--pathology", "Cardiomegaly", "--seed", "1", "--split-seed", "0",
                               "--out-dir", str(tmp_path / "b")))
    [c] = train.main(tiny_args("--pathology", "Cardiomegaly", "--seed", "1", "--out-dir", str(tmp_path / "c")))
    assert a["split"]["val_patients_sha1"] == b["split"]["val_patients_sha1"] != c["split"]["val_patients_sha1"]
    wa = Checkpoint.load(tmp_path / "a" / "cardiomegaly" / "best.pt").state_dict
    wb = Checkpoint.load(tmp_path / "b" / "cardiomegaly" / "best.pt").state_dict
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)  # another initialisation on the same split
    assert c["config"]["split_seed"] == 1  # the default follows --seed: older runs keep their split


def test_gradient_accumulation_is_exact_under_the_masked_loss():
    """Two micro-batches with different numbers of labelled entries, accumulated, give the update of
    one batch holding both: each entry weighs the same, not each micro-batch."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2), torch.nn.Tanh())
    images = torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8)
    targets = torch.tensor(np.random.default_rng(0).choice([-1.0, 1.0], (6, 2)), dtype=torch.float32)
    mask = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0], [1, 0], [0, 0]], dtype=torch.bool)

    def one_step(batches):
        model = torch.nn.Sequential(*[m for m in net])  # same modules: start from the same weights
        start = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        settings = argparse.Namespace(online_augment=[], augment="none")
        state = train.TrainState(settings, model, None, opt, torch.amp.GradScaler("cpu", enabled=False), None,
                                 net=model, totals=torch.zeros(2))
        scaled = [(b[0].float() / 255.0, b[1], b[2]) for b in batches]
        train.train_step(state, scaled, Runtime(torch.device("cpu")))
        after = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(start)
        return after, state.totals

    whole, t_whole = one_step([(images, targets, mask)])
    parts, t_parts = one_step([(images[:2], targets[:2], mask[:2]), (images[2:], targets[2:], mask[2:])])
    for k in whole:
        assert torch.allclose(whole[k], parts[k], atol=1e-6), k
    assert torch.allclose(t_whole, t_parts) and t_whole[1] == 5
