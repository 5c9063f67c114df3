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

import pytest
import torch

import dataset
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
    return dataset.ImageCache(folder)


# ---------------------------------------------------------------------------------------------
# 2: two nodes with node-local caches; one builder per shared cache; the demo data made once

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
    log, real = tmp_path / "decoded.txt", dataset._decode_chunk

    def counted(task):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {task[0]}\n")
        time.sleep(0.05)
        return real(task)
    monkeypatch.setattr(dataset, "_decode_chunk", counted)
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
    folder, _ = dataset.cache_folder(tmp_path / "cache", "t", demo_root, paths, 32, "resize")
    folder.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "build.lock").write_text(f"{socket.gethostname()} {int(dead.stdout)}\n")  # killed on this host
    _in_processes(dataset.build_cache, 1, paths, demo_root, 32, tmp_path / "cache", "t", "resize", 1, False, timeout=60)
    assert "taking over the image cache" in capfd.readouterr().err
    # another host's builder that stopped touching its lock long ago
    (folder / "shard_00000.pt").unlink()
    (folder / "build.lock").write_text("some-other-node 4242\n")
    os.utime(folder / "build.lock", (time.time() - dataset.LOCK_STALE_S - 5,) * 2)
    _in_processes(dataset.build_cache, 1, paths, demo_root, 32, tmp_path / "cache", "t", "resize", 1, False, timeout=60)
    assert not dataset.ImageCache(folder).missing_shards() and not (folder / "build.lock").exists()


def test_processes_wanting_the_demo_data_at_once_make_it_once(tmp_path, monkeypatch):
    log, real = tmp_path / "made.txt", dataset.make_demo

    def small(root, progress=True):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(root, n_train_patients=4, n_test_patients=2, progress=False)
    monkeypatch.setattr(dataset, "make_demo", small)
    _in_processes(dataset.ensure_demo, 3, tmp_path / "demo_data", False)
    assert len(log.read_text().splitlines()) == 1
    assert (tmp_path / "demo_data" / "student_labels" / "train2023.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_data", "made.txt"]  # no lock or half-made copy left
