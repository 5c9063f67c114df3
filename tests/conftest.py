"""Shared fixtures: a small demo dataset made once per session, and tiny training flags."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import make_demo  # noqa: E402

# 32 px, one epoch, timm's test_resnet (0.37M parameters: 1.5 MB checkpoints, a step 4x faster than
# ResNet-18's) from random init, one cache worker: a second or two per training run on a 2-core CPU.
# Tests where the backbone matters pass their own --arch (the later flag wins).
TINY = ["--image-size", "32", "--epochs", "1", "--batch-size", "16", "--weights", "none", "--arch", "timm/test_resnet",
        "--workers", "1", "--no-progress"]


def pytest_configure(config):
    """Under pytest-xdist (`-n N`, set in pytest.ini), share the cores: each worker and every process it
    starts gets cores / N threads, so N workers do not oversubscribe the CPU (torch's default is every core)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small CS 156b-layout dataset (about 80 training and 15 test images, 320 x 384 JPEGs)."""
    return make_demo(tmp_path_factory.mktemp("demo") / "data", n_train_patients=40, n_test_patients=8,
                     progress=False)


@pytest.fixture
def tiny_args(demo_root, tmp_path):
    """tiny_args('--pathology', 'Cardiomegaly') -> a full train.py argv on the demo data under tmp_path."""
    def make(*extra):
        return ["--data-root", str(demo_root), "--cache-dir", str(tmp_path / "cache"),
                "--out-dir", str(tmp_path / "ckpt"), *TINY, *extra]
    return make
