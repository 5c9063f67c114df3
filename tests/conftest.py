"""Shared fixtures: a small demo dataset made once per session, and tiny training flags."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import make_demo  # noqa: E402

# 32 px, one epoch, ResNet-18 from random init, one cache worker: seconds per training run on a
# 2-core CPU. Tests where the backbone matters pass their own --arch (the later flag wins).
TINY = ["--image-size", "32", "--epochs", "1", "--batch-size", "16", "--weights", "none", "--arch", "resnet18",
        "--workers", "1", "--no-progress"]


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
