"""Cluster runs: torchrun on a cold cache, two "nodes", one builder per cache, autocast on older
GPUs, SIGTERM / SIGKILL at a fixed point of training (with loader workers too), resuming on another
GPU count, per-rank seeds, and the grid search's freeze axis."""
import csv
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import buildlock
import cache as cache_module
import dataset
import demo
import runtime
import train
from experiments import gridsearch
from model import Checkpoint, load_checkpoint
from tests.conftest import ROOT

# A test-only stretch of the cache build (seconds per chunk of 8 images: the 81 demo images take
# ~16 s) against a process-group timeout that it outlasts but training's own waits do not.
SLOW_BUILD = {"CXR_TEST_DECODE_DELAY": "1.5", "CXR_PG_TIMEOUT_S": "10"}


def free_port() -> int:
    """A port nothing listens on now, so concurrent test runs on one machine do not collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, log=None, **env):
    """python ARGS in the repo, one thread, with extra environment variables; output to pipes or a file."""
    out = open(log, "w") if log else subprocess.PIPE
    try:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT if log else subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env},
                                start_new_session=True)  # its own process group, to be signalled as SLURM does
    finally:
        if log:
            out.close()


def torchrun(*flags):
    return ["-m", "torch.distributed.run", "--master-addr", "127.0.0.1", *flags, "train.py"]


def read_csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def only_cache(cache_dir):
    [folder] = [f for f in cache_dir.iterdir() if f.is_dir()]
    return cache_module.ImageCache(folder)


# ---------------------------------------------------------------------------------------------
# 1, 8: torchrun on a cold cache whose build outlasts the process group's timeout; a free port

@pytest.mark.slow
def test_torchrun_on_a_cold_cache_finishes_and_writes_one_set_of_files(tiny_args, tmp_path, demo_root):
    """Also: validation under torchrun scores every row with the weights best.pt saves. Each rank's
    BatchNorm statistics come from its own last batches; with batch 4 the second rank scores some
    validation rows, which must not come from its own statistics. --accum-steps 2 runs DDP's no_sync;
    --val-per-epoch 2 --keep-top 2 --average-top 2 validate inside the epoch and average under DDP."""
    [s1] = train.main(tiny_args("--pathology", "Cardiomegaly", "--out-dir", str(tmp_path / "one")))
    ddp = tiny_args("--pathology", "Cardiomegaly", "--out-dir", str(tmp_path / "two"),
                    "--cache-dir", str(tmp_path / "cold"), "--batch-size", "4", "--accum-steps", "2",
                    "--val-per-epoch", "2", "--keep-top", "2", "--average-top", "2")
    t0 = time.time()
    proc = launch([*torchrun("--nproc-per-node", "2", "--master-port", str(free_port())), *ddp], **SLOW_BUILD)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, (out + err)[-3000:]
    assert time.time() - t0 > 15  # the build did outlast the 10 s timeout
    assert err.count("waiting for the image cache") == 1  # one process built it, the other waited on the files
    assert not only_cache(tmp_path / "cold").missing_shards()
    folder = tmp_path / "two" / "cardiomegaly"
    assert sorted(p.name for p in folder.iterdir()) == ["args.yaml", "best.pt", "curves.png", "history.csv", "last.pt",
                                                        "manifest.json", "summary.json", "tb", "top",
                                                        "val_predictions.csv"]
    assert len({p.name.split(".")[4] for p in (folder / "tb").glob("events.out.tfevents.*")}) == 1  # one writer's pid
    s2 = json.loads((folder / "summary.json").read_text())
    assert (s2["n_train"], s2["n_val"]) == (s1["n_train"], s1["n_val"])
    assert s2["averaged"]["k"] == 2 and json.loads((folder / "manifest.json").read_text())["world_size"] == 2
    val = pd.read_csv(folder / "val_predictions.csv")
    assert len(val) == s2["n_val"] and val["path"].is_unique  # every validation row, once
    epochs = [r["epoch"] for r in read_csv_rows(folder / "history.csv")]
    assert len(epochs) == 2 and 0.5 <= float(epochs[0]) < 1 and epochs[1] == "1"  # two validations in the epoch
    assert out.count("Cardiomegaly epoch 1/1") == 1  # only rank 0 logs

    # every row's raw prediction, and the gathered metrics, are those of best.pt's weights in one process
    from cache import cached_table
    from dataset import XrayDataset, read_train_csv
    table, cache = cached_table(read_train_csv(demo_root / "student_labels" / "train2023.csv"), demo_root, 32,
                                tmp_path / "cache", "train2023", workers=1, progress=False)
    rows = table.set_index("path").loc[val["path"]]
    targets = rows[["Cardiomegaly"]].to_numpy()
    model, ckpt = load_checkpoint(folder / "best.pt")
    pred = train.predict(model, XrayDataset([cache], rows["slot"], targets), 4, train.Runtime(torch.device("cpu")))
    assert np.abs(pred[:, 0] - val["raw"].to_numpy()).max() < 1e-5
    m = train.pathology_metrics(pred[:, 0], targets[:, 0], 0.0, ckpt.calibration["Cardiomegaly"])
    gathered = s2["per_pathology"]["Cardiomegaly"]
    assert m["n"] == gathered["n"] == s2["n_val"]
    for key in ("val_mse", "val_mse_cal", "val_auc"):
        assert m[key] == pytest.approx(gathered[key], abs=1e-5), key


def test_every_train_flag_reaches_train_py_through_torchruns_command_line():
    """torchrun reads an abbreviation of its own flags anywhere on the line: `--log` (its --log-dir,
    --logs-specs) stopped `torchrun ... train.py --log none` before train.py started. Every flag has
    a spelling that torchrun hands to train.py untouched."""
    from torch.distributed.run import get_args_parser

    def passes(option):
        try:
            return get_args_parser().parse_args(["train.py", option, "1"]).training_script_args == [option, "1"]
        except SystemExit:
            return False

    actions = [a for a in train.make_parser()._actions if a.option_strings and a.dest != "help"]
    blocked = {a.dest: [o for o in a.option_strings if o.startswith("--") and not passes(o)] for a in actions}
    assert {dest: opts for dest, opts in blocked.items() if opts} == {"log": ["--log"]}
    assert [a for a in actions if not any(passes(o) for o in a.option_strings if o.startswith("--"))] == []
    args = train.make_parser().parse_args(["--pathology", "Cardiomegaly", "--live-log", "none"])
    assert args.log == "none"  # the spelling for torchrun lines is the same flag


def test_a_config_key_may_use_either_spelling_of_a_flag(tmp_path):
    import config
    (tmp_path / "c.yaml").write_text("live-log: none\nepochs: 3\n")
    assert config.read_config(tmp_path / "c.yaml", train.make_parser()) == {"log": "none", "epochs": 3}
    (tmp_path / "c.yaml").write_text("no-resume: true\n")  # a switch's --no-NAME is not a key
    with pytest.raises(Exception, match="'no-resume' is not a flag of train.py"):
        config.read_config(tmp_path / "c.yaml", train.make_parser())

# ---------------------------------------------------------------------------------------------
# 2: two nodes with node-local caches; one builder per shared cache; the demo data made once

@pytest.mark.slow
def test_two_nodes_build_their_own_caches_and_only_global_rank_0_writes(tiny_args, tmp_path):
    """The README's two-"node" recipe: node 1's cache takes longer than the process-group timeout
    to build, while node 0 (its own cache quickly built) waits for it outside any collective."""
    port, procs = free_port(), []
    for node in (0, 1):
        argv = tiny_args("--pathology", "Cardiomegaly", "--cache-dir", str(tmp_path / f"node{node}_tmpdir"),
                         "--out-dir", str(tmp_path / f"out{node}"))
        flags = ("--nnodes", "2", "--node-rank", str(node), "--master-port", str(port), "--nproc-per-node", "1")
        env = SLOW_BUILD if node == 1 else {"CXR_PG_TIMEOUT_S": SLOW_BUILD["CXR_PG_TIMEOUT_S"]}
        procs.append(launch([*torchrun(*flags), *argv], log=tmp_path / f"node{node}.log", **env))
    for node, proc in enumerate(procs):
        assert proc.wait(timeout=400) == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    for node in (0, 1):
        assert not only_cache(tmp_path / f"node{node}_tmpdir").missing_shards()
    folder = tmp_path / "out0" / "cardiomegaly"
    assert sorted(p.name for p in folder.iterdir()) == ["args.yaml", "best.pt", "curves.png", "history.csv", "last.pt",
                                                        "manifest.json", "summary.json", "tb", "val_predictions.csv"]
    assert not (tmp_path / "out1").exists()  # global rank 1 (node 1's local rank 0) writes nothing
    assert "Cardiomegaly epoch 1/1" in (tmp_path / "node0.log").read_text()


def _in_processes(target, n, *args, timeout=120):
    """Run target(*args) in n forked processes at once; all must end well within timeout."""
    procs = [mp.get_context("fork").Process(target=target, args=args) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung and [p.exitcode for p in procs] == [0] * n


def test_processes_sharing_a_cache_dir_decode_each_image_once(demo_root, tmp_path, monkeypatch, capfd):
    paths = list(dict.fromkeys(dataset.read_train_csv(demo_root / "student_labels" / "train2023.csv")["path"]))
    log, real = tmp_path / "decoded.txt", cache_module._decode_chunk

    def counted(task):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {task[0]}\n")
        time.sleep(0.05)
        return real(task)
    monkeypatch.setattr(cache_module, "_decode_chunk", counted)
    _in_processes(dataset.build_cache, 3, paths, demo_root, 32, tmp_path / "cache", "t", "resize", 1, False)
    decoded = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(start) for _, start in decoded) == list(range(0, len(paths), 8))  # every chunk once
    assert len({pid for pid, _ in decoded}) == 1
    assert capfd.readouterr().err.count("waiting for the image cache") == 2
    cache = dataset.build_cache(paths, demo_root, 32, tmp_path / "cache", "t", workers=1, progress=False)
    assert not cache.missing_shards() and len(log.read_text().splitlines()) == len(decoded)
    assert not (cache.folder / "build.lock").exists()


def test_a_dead_builders_lock_is_taken_over(demo_root, tmp_path, capfd):
    paths = list(dict.fromkeys(dataset.read_train_csv(demo_root / "student_labels" / "train2023.csv")["path"]))[:8]
    folder, _ = cache_module.cache_folder(tmp_path / "cache", "t", demo_root, paths, 32, "resize")
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "build.lock").write_text(f"{socket.gethostname()} {int(dead.stdout)}\n")  # killed on this host
    _in_processes(dataset.build_cache, 1, paths, demo_root, 32, tmp_path / "cache", "t", "resize", 1, False, timeout=60)
    assert "taking over the image cache" in capfd.readouterr().err
    # another host's builder that stopped touching its lock long ago
    (folder / "shard_00000.pt").unlink()
    (folder / "build.lock").write_text("some-other-node 4242\n")
    os.utime(folder / "build.lock", (time.time() - buildlock.LOCK_STALE_S - 5,) * 2)
    _in_processes(dataset.build_cache, 1, paths, demo_root, 32, tmp_path / "cache", "t", "resize", 1, False, timeout=60)
    assert not cache_module.ImageCache(folder).missing_shards() and not (folder / "build.lock").exists()


def test_processes_wanting_the_demo_data_at_once_make_it_once(tmp_path, monkeypatch):
    log, real = tmp_path / "made.txt", demo.make_demo

    def small(root, progress=True):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(root, n_train_patients=4, n_test_patients=2, progress=False)
    monkeypatch.setattr(demo, "make_demo", small)
    _in_processes(demo.ensure_demo, 3, tmp_path / "demo_data", False)
    assert len(log.read_text().splitlines()) == 1
    assert (tmp_path / "demo_data" / "student_labels" / "train2023.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_data", "made.txt"]  # no lock or half-made copy left


# ---------------------------------------------------------------------------------------------
# 3: bf16 only where the card has it

@pytest.mark.parametrize("capability, dtype", [((6, 0), torch.float16), ((7, 0), torch.float16),
                                               ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_autocast_dtype_is_bf16_only_on_cards_that_compute_it_natively(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # True on a V100 too: emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    flags = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_tf32")]  # what setup_runtime turns on
    before = [getattr(m, name) for m, name in flags]
    try:
        args = train.parse_args(["--pathology", "Cardiomegaly", "--device", "cuda"])
        rt = train.setup_runtime(args, distributed=False)  # what make_submission.py does
    finally:
        for (m, name), value in zip(flags, before):
            setattr(m, name, value)
    assert rt.amp_dtype == dtype and rt.device == torch.device("cuda:0")
    assert runtime.amp_dtype_for(torch.device("cuda:0"), enabled=False) is None
    assert runtime.amp_dtype_for(torch.device("cpu"), enabled=True) is None


# ---------------------------------------------------------------------------------------------
# 4, 8: SIGTERM / SIGKILL at a fixed point (the first step of epoch 2), with and without loader workers

# train.py with two changes: at the first training step of epoch 2 it says so (a marker file) and
# sleeps until the test signals it, so the kill point is the same on every run; and when it saves
# last.pt on an interrupt it says so too (MARKER.saving) and takes 2 s longer, for a second signal.
PAUSED_TRAIN = """
import signal, sys, time
from pathlib import Path
import train
marker, epochs = Path(sys.argv[1]), []
real_epoch, real_loss, real_save = train.train_until, train.loss_terms, train.save_last

def count_epochs(*a, **k):
    epochs.append(1)
    return real_epoch(*a, **k)

def pause_in_epoch_2(*a, **k):
    if len(epochs) == 2 and not marker.exists():
        marker.touch()  # then wait for the signal (a SIGKILL ends it here), as a long step would
        while getattr(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), "requested", None) is None:
            time.sleep(0.05)
    return real_loss(*a, **k)

def slow_save(*a, **k):
    if k.get("interrupted"):
        Path(str(marker) + ".saving").touch()
        time.sleep(2)
    return real_save(*a, **k)

train.train_until, train.loss_terms, train.save_last = count_epochs, pause_in_epoch_2, slow_save
sys.exit(train.run_cli(train.main, sys.argv[2:]))
"""


def wait_for(path, proc, timeout=200):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.1)


@pytest.mark.parametrize("sig, loader_workers, twice", [(signal.SIGKILL, 0, False), (signal.SIGTERM, 0, False),
                                                        (signal.SIGTERM, 2, False), (signal.SIGTERM, 0, True)],
                         ids=["sigkill", "sigterm", "sigterm-with-loader-workers", "sigterm-twice"])
def test_killed_training_resumes_and_checkpoints_always_load(tiny_args, tmp_path, sig, loader_workers, twice):
    """Signals go to the whole process group, loader workers included, as SLURM sends them. Under
    srun torchrun a worker gets SIGTERM twice, from SLURM and then forwarded by torchrun: the second
    must not cut the saving of last.pt short."""
    marker, out = tmp_path / "in_epoch_2", tmp_path / "ckpt" / "cardiomegaly"
    argv = tiny_args("--pathology", "Cardiomegaly", "--epochs", "3", "--patience", "0",
                     "--loader-workers", str(loader_workers))
    proc = launch(["-c", PAUSED_TRAIN, str(marker), *argv])
    wait_for(marker, proc)
    os.killpg(proc.pid, sig)
    if twice:
        wait_for(tmp_path / "in_epoch_2.saving", proc)
        os.killpg(proc.pid, sig)
    out_text, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGTERM else -sig), err[-3000:]
    if sig == signal.SIGTERM:  # handled like Ctrl-C: last.pt at the batch where it stopped, in epoch 2
        assert "saved" in out_text and "--resume" in out_text and "Traceback" not in err, err[-3000:]
    last = Checkpoint.load(out / "last.pt")
    assert last.training_state["epoch"] == 1 and Checkpoint.load(out / "best.pt").epoch == 1
    assert last.interrupted == (sig == signal.SIGTERM)
    assert (last.training_state["pos"] > 0) == (sig == signal.SIGTERM)
    [s] = train.main(tiny_args("--pathology", "Cardiomegaly", "--epochs", "2", "--patience", "0", "--resume"))
    assert s["epochs_run"] == 2
    assert [int(r["epoch"]) for r in read_csv_rows(out / "history.csv")] == [1, 2]


# ---------------------------------------------------------------------------------------------
# 5: resuming on another GPU count

def test_resume_on_fewer_or_more_gpus_restores_the_streams_that_fit(monkeypatch):
    restored, visible = {}, [1]

    def set_one(state, device="cuda"):  # as torch's: an index past the visible GPUs is an IndexError
        i = device if isinstance(device, int) else torch.device(device).index or 0
        if i >= visible[0]:
            raise IndexError("tuple index out of range")
        restored[i] = int(state[0])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible[0])
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_one)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [set_one(s, i) for i, s in enumerate(states)])
    saved = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "cuda": [torch.tensor([10 + i], dtype=torch.uint8) for i in range(4)]}  # a 4-GPU run's last.pt
    runtime.set_rng_state(saved)
    assert restored == {0: 10}
    restored.clear()
    visible[0] = 8
    runtime.set_rng_state(saved)
    assert restored == {0: 10, 1: 11, 2: 12, 3: 13}


# ---------------------------------------------------------------------------------------------
# 6: one random stream per rank

def test_each_rank_draws_its_own_dropout_masks(tiny_args, monkeypatch):
    draws = {}

    def record(names, folder, data, is_val, split, args, rt):
        draws[(rt.world, rt.rank)] = torch.nn.functional.dropout(torch.ones(64), 0.5)
        return None
    monkeypatch.setattr(train, "train_job", record)
    monkeypatch.setattr(train, "join_process_group", lambda rt: None)  # two ranks' view, without a group
    monkeypatch.setattr(train, "on_main", lambda rt, fn: fn())  # ... so rank 0's checks run here, unbroadcast
    monkeypatch.setattr(train, "check_same_table", lambda *a: None)
    argv = tiny_args("--pathology", "Cardiomegaly")
    for world, rank in [(1, 0), (2, 0), (2, 1)]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", str(rank))
        with pytest.raises(dataset.UserError, match="nothing to train"):
            train.main(argv)
    assert not torch.equal(draws[(2, 0)], draws[(2, 1)])
    assert torch.equal(draws[(2, 0)], draws[(1, 0)])  # rank 0 draws what a single process draws
    # resumed: rank 0 continues last.pt's stream exactly, the others derive their own from it
    saved = runtime.rng_state()
    after = {}
    for rank in (0, 1, 0):
        runtime.set_rng_state(saved, rank=rank)
        after.setdefault(rank, []).append(torch.rand(8))
    assert torch.equal(after[0][0], after[0][1]) and not torch.equal(after[0][0], after[1][0])


# ---------------------------------------------------------------------------------------------
# 7: the grid's freeze axis

def test_grid_freeze_values_train_different_parameters_for_the_whole_run(tiny_args, tmp_path):
    grid = tmp_path / "grid"
    rows = gridsearch.main(["--pathology", "Cardiomegaly", "--hidden", "8", "--freeze", "3", "5", "--lr", "1e-3",
                            *tiny_args("--epochs", "2"), "--out-dir", str(grid)])
    by_freeze = {r["freeze"]: r for r in rows}
    assert by_freeze[3]["trainable_params"] > by_freeze[5]["trainable_params"] > 0
    assert by_freeze[3]["unfreeze_epoch"] == by_freeze[5]["unfreeze_epoch"] == "never"  # frozen for the whole run
    with open(grid / "results.csv") as f:
        assert {r["freeze"]: int(r["trainable_params"]) for r in csv.DictReader(f)} == {
            "3": by_freeze[3]["trainable_params"], "5": by_freeze[5]["trainable_params"]}
    a, b = (Checkpoint.load(grid / f"hidden8_freeze{f}_lr0.001" / "cardiomegaly" / "last.pt").state_dict
            for f in (3, 5))
    stem_to_layer2 = [k for k in a if k.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1",
                                                    "backbone.layer2"))]
    layer3 = [k for k in a if k.startswith("backbone.layer3") and a[k].is_floating_point()]
    # both start from the same weights (same seed); stem..layer2 are frozen in both for both epochs
    assert stem_to_layer2 and all(torch.equal(a[k], b[k]) for k in stem_to_layer2)
    assert any(not torch.equal(a[k], b[k]) for k in layer3)  # layer3 trains with --freeze 3 only


def test_loader_workers_are_stopped_when_training_ends_so_the_process_can_exit(tiny_args):
    """Loader workers ignore SIGTERM (SLURM), so the interpreter's exit-time terminate() cannot stop
    them: left alive (the loader sits in a reference cycle), they hung the process at exit on a GPU
    machine. train.main must stop them itself. The garbage collector is off here, as it may well be
    at the moment a real run ends."""
    script = ("import gc, multiprocessing, sys; gc.disable(); import train; "
              f"train.main({tiny_args('--pathology', 'Cardiomegaly', '--loader-workers', '2')!r}); "
              "print('children', len(multiprocessing.active_children()), flush=True)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "children 0" in proc.stdout


# ---------------------------------------------------------------------------------------------
# A rank whose training table differs from rank 0's (a node-local read that went wrong)

ONE_ROW_SHORT_ON_RANK_1 = """
import os, sys
import train
real = train.read_table

def read_table(args, rt):  # a transient read error on rank 1's node: one row fewer there
    table, root, csv = real(args, rt)
    if os.environ["RANK"] == "1":
        attrs, table = table.attrs, table.drop(table.index[3]).reset_index(drop=True)
        table.attrs = attrs
    return table, root, csv

train.read_table = read_table
sys.exit(train.run_cli(train.main, sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_rank_with_another_training_table_stops_every_rank_in_one_line(tiny_args, tmp_path, demo_root):
    script = tmp_path / "rank1.py"
    script.write_text(ONE_ROW_SHORT_ON_RANK_1)
    argv = tiny_args("--pathology", "Cardiomegaly")
    proc = launch(["-m", "torch.distributed.run", "--master-addr", "127.0.0.1", "--nproc-per-node", "2",
                   "--master-port", str(free_port()), str(script), *argv], PYTHONPATH=str(ROOT))
    out, err = proc.communicate(timeout=300)
    table = dataset.read_train_csv(demo_root / "student_labels" / "train2023.csv")
    table = table[[(demo_root / p).is_file() for p in table["path"]]]
    lines = [line for line in (out + err).splitlines() if "training table differs" in line]
    assert proc.returncode != 0 and lines, (out + err)[-3000:]
    assert all(line.startswith("error: rank 1's training table differs from rank 0's: ") for line in lines)
    assert f"where rank 0 has {table['path'].iloc[3]}" in lines[0]  # the first path that differs, named
    assert not (tmp_path / "ckpt" / "cardiomegaly" / "last.pt").exists()  # nothing trained
