"""One training state, right wherever a cluster moves the job: resumed on another number of
processes (positions and the schedule counted in samples), in another precision, with another
--epochs, a fold trained later; SIGTERM acted on within seconds under torchrun; every flag saying
whether a resume may change it."""
import csv
import os
import signal
import time

import pytest
import torch

import train
from model import Checkpoint
from runtime import Runtime
from sampler import EpochSampler
from state import lr_factor
from tests.conftest import ROOT
from tests.test_cluster import free_port, launch, torchrun, wait_for


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Positions in samples: any number of processes before and after a resume

@pytest.mark.parametrize("before, after, pos", [(1, 2, 24), (2, 1, 16), (1, 4, 8), (3, 2, 30)])
def test_an_epoch_resumed_on_another_number_of_ranks_trains_every_sample_once(before, after, pos):
    """The samples trained before `pos` on `before` ranks and after it on `after` ranks are the epoch's
    draw, each position once; at most 2 x after - 1 samples at the very end are left out."""
    n, batch = 53, 4

    def trained(world, start):
        ranks = [EpochSampler(None, n, batch, seed=3, rank=r, world=world) for r in range(world)]
        for s in ranks:
            s.set_epoch(2, start)
        return [i for step in zip(*[list(s) for s in ranks]) for b in step for i in b]
    draw = EpochSampler(None, n, batch, seed=3)
    draw.set_epoch(2)
    order = draw.draw().tolist()
    first = trained(before, 0)[:pos]  # what the run trained before it was stopped at `pos`
    assert first == order[:pos]
    rest = trained(after, pos)
    assert first + rest == order[:len(first) + len(rest)] and n - len(first) - len(rest) < 2 * after


def test_the_learning_rate_is_a_function_of_the_samples_drawn():
    total, warmup = 1000.0, 100.0
    assert lr_factor(0, total, warmup, step=10) == pytest.approx(0.1)  # the first step does not train at 0
    assert lr_factor(100, total, warmup) == pytest.approx(1.0)
    assert lr_factor(550, total, warmup) == pytest.approx(0.5)
    assert lr_factor(1000, total, warmup) == pytest.approx(0.0)
    # the same point of the run gets the same rate, however many samples a step holds
    assert lr_factor(700, total, warmup, step=8) == lr_factor(700, total, warmup, step=64)


# A 2-process run paused (both ranks) at its 10th training step, the 3rd of epoch 2, until SIGTERM.
PAUSED = """
import signal, sys, time
from pathlib import Path
import train
marker, calls = Path(sys.argv[1]), []
real = train.loss_terms

def pause(*a, **k):
    calls.append(1)
    if len(calls) == 10:
        Path(f"{marker}.{train.os.environ['RANK']}").touch()
        while getattr(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), "requested", None) is None:
            time.sleep(0.05)
    return real(*a, **k)

train.loss_terms = pause
sys.exit(train.run_cli(train.main, sys.argv[2:]))
"""


@pytest.mark.slow
def test_saved_on_two_processes_resumed_on_one_with_history_deleted(tiny_args, tmp_path):
    """The issue's check: 2 epochs on 2 processes (gloo), SIGTERM in epoch 2, history.csv deleted,
    --resume on 1 process: both epochs' samples and lr match an uninterrupted 1-process run's
    (samples within one global batch, lr within 2%)."""
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--batch-size", "4", "--patience", "0")
    train.main(argv + ["--out-dir", str(tmp_path / "straight")])
    script = tmp_path / "paused.py"
    script.write_text("import os\n" + PAUSED.replace("train.os.environ", "os.environ"))
    marker = tmp_path / "paused"
    cmd = ["-m", "torch.distributed.run", "--master-addr", "127.0.0.1", "--nproc-per-node", "2", "--master-port",
           str(free_port()), str(script), str(marker), *argv, "--out-dir", str(tmp_path / "moved")]
    proc = launch(cmd, PYTHONPATH=str(ROOT))
    for r in (0, 1):
        wait_for(tmp_path / f"paused.{r}", proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=200)
    folder = tmp_path / "moved" / "cardiomegaly"
    ts = Checkpoint.load(folder / "last.pt").training_state
    # stopped in epoch 2 at a check after its 4th step: a whole number of 2-process steps of 2 x 4 samples
    assert ts["epoch"] == 1 and 32 <= ts["pos"] <= 48 and ts["pos"] % 8 == 0, (ts["epoch"], ts["pos"], err[-2000:])
    assert err.count("SIGTERM: stopping after this step") == 1, err[-2000:]  # rank 0 says it, for both
    (folder / "history.csv").unlink()
    train.main(argv + ["--out-dir", str(tmp_path / "moved"), "--resume"])
    straight, moved = rows(tmp_path / "straight" / "cardiomegaly" / "history.csv"), rows(folder / "history.csv")
    assert [r["epoch"] for r in moved] == ["1", "2"]
    for a, b in zip(straight, moved):
        assert abs(int(a["samples"]) - int(b["samples"])) < 2 * 4  # within one global batch of 2 x 4
        assert float(b["lr"]) == pytest.approx(float(a["lr"]), rel=0.02, abs=1e-12)
    assert float(moved[-1]["lr"]) == 0.0


# ---------------------------------------------------------------------------------------------
# Precision

def runtime_with(dtype):
    def setup(args, distributed=True, join=True):
        return Runtime(torch.device("cpu"), amp_dtype=dtype, progress=False)
    return setup


@pytest.mark.parametrize("saved, resumed", [(None, torch.float16), (torch.float16, None),
                                            (torch.bfloat16, torch.float16)], ids=["fp32-fp16", "fp16-fp32", "bf16-fp16"])
def test_a_resume_works_across_precisions(tiny_args, tmp_path, monkeypatch, capsys, saved, resumed):
    """A run saved where no gradient scaler was needed (fp32, bf16: the scaler's state is empty)
    resumes where fp16 needs one (a V100, a T4), and the other way round."""
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--batch-size", "8")
    monkeypatch.setattr(train, "setup_runtime", runtime_with(saved))
    train.main(argv + ["--epochs", "1"])
    scaler = Checkpoint.load(tmp_path / "ckpt" / "cardiomegaly" / "last.pt").training_state["scaler"]
    assert bool(scaler) == (saved == torch.float16)  # fp16 saves its loss scale, the others nothing
    monkeypatch.setattr(train, "setup_runtime", runtime_with(resumed))
    capsys.readouterr()
    [s] = train.main(argv + ["--resume"])
    assert s["epochs_run"] == 2 and s["validations"] == 2
    assert ("gradient scaler starts afresh" in capsys.readouterr().out) == (resumed == torch.float16 and not scaler)
    scaler = Checkpoint.load(tmp_path / "ckpt" / "cardiomegaly" / "last.pt").training_state["scaler"]
    assert bool(scaler) == (resumed == torch.float16)


# ---------------------------------------------------------------------------------------------
# --epochs on a resume; a fold trained later; the flags

def test_resume_with_more_epochs_continues_the_schedule_of_the_new_length(tiny_args, tmp_path, capsys):
    argv = tiny_args("--pathology", "Cardiomegaly", "--patience", "0")
    train.main(argv + ["--epochs", "1"])
    capsys.readouterr()
    train.main(argv + ["--epochs", "3", "--resume"])
    assert "--epochs 1 -> 3: the cosine schedule now runs over 3 epochs" in capsys.readouterr().out
    hist = rows(tmp_path / "ckpt" / "cardiomegaly" / "history.csv")
    lr = [float(r["lr"]) for r in hist]
    assert [r["epoch"] for r in hist] == ["1", "2", "3"] and lr[0] == 0.0  # the first run ended its own schedule
    n = 50 * 3  # the new schedule at epochs 2 and 3 of 3 (warm-up: half an epoch)
    assert lr[1] == pytest.approx(3e-4 * lr_factor(100, n, 25)) and lr[2] == 0.0


def test_a_fold_left_out_is_trained_later_and_the_out_of_fold_row_appears(tiny_args, tmp_path, capsys):
    argv = tiny_args("--pathology", "Cardiomegaly", "--folds", "2")
    train.main(argv + ["--fold", "0"])
    assert not (tmp_path / "ckpt" / "cardiomegaly" / "oof_summary.json").exists()
    capsys.readouterr()
    train.main(argv + ["--fold", "1", "--resume"])  # as a re-submitted array task would
    out = capsys.readouterr().out
    assert "no " in out and "training fold1 from the start" in out
    assert any(line.split()[2:3] == ["oof"] for line in out.splitlines())  # the fold column
    assert (tmp_path / "ckpt" / "cardiomegaly" / "oof_summary.json").is_file()


def test_every_flag_says_whether_a_resume_may_change_it():
    """Declared where the flag is: a new flag without a marker fails here (and would count as must-keep)."""
    unmarked = [a.option_strings[0] for a in train.make_parser()._actions
                if a.option_strings and a.dest != "help" and not hasattr(a, "on_resume")]
    assert unmarked == []
    rules = {a.dest: a.on_resume for a in train.make_parser()._actions if hasattr(a, "on_resume")}
    assert rules["lr"] == rules["arch"] == rules["image_size"] == rules["seed"] == "must keep"
    assert rules["out_dir"] == rules["device"] == rules["epochs"] == rules["data_root"] == "may change"


# ---------------------------------------------------------------------------------------------
# SIGTERM under torchrun: the ranks agree within seconds, not steps

@pytest.mark.slow
def test_sigterm_under_torchrun_saves_last_pt_within_seconds_of_slow_steps(tiny_args, tmp_path):
    """Steps of 1.5 s (large images, --accum-steps): the ranks used to agree only every 20 steps
    (30 s here, as long as torchrun waits before SIGKILL). Now within CHECK_SECONDS plus a step or two."""
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "1", "--batch-size", "2", "--save-every", "0")
    proc = launch([*torchrun("--nproc-per-node", "2", "--master-port", str(free_port())), *argv],
                  CXR_TEST_STEP_DELAY="1.5")
    folder = tmp_path / "ckpt" / "cardiomegaly"
    t0 = time.time()
    while not (folder / "args.yaml").is_file():  # written when training starts
        assert proc.poll() is None and time.time() - t0 < 200, proc.communicate()
        time.sleep(0.2)
    time.sleep(2)  # a step or two in: 10 more steps (15 s) to the epoch's end, where the old check was
    signalled = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    saved = (folder / "last.pt").stat().st_mtime
    assert Checkpoint.load(folder / "last.pt").interrupted
    assert saved - signalled < train.CHECK_SECONDS + 2 * 1.5 + 2  # the check, a step or two, the save
