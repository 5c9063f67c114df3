"""The shipped starting points, configs/*.yaml: each is a valid --config of train.py (every key a
flag, every value one it takes), and says in its comments how to run it."""
import pytest

import train
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_documented_configs_are_shipped():
    assert {p.stem for p in CONFIGS} >= {"demo", "cpu_first_try", "gpu_320", "slurm_folds", "recommended_cpu",
                                         "recommended_gpu"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_each_config_is_a_valid_train_config(path, tmp_path):
    text = path.read_text()
    assert f"--config configs/{path.name}" in text  # the command that runs it, in its comments
    extra = [] if path.stem == "demo" else ["--data-root", str(tmp_path)]
    args = train.parse_args(["--config", str(path), *extra])
    assert args.config == path and args.pathology
