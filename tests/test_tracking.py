"""tracking.py: TensorBoard event files read back with TensorBoard's own reader, the resumed run's
purge, quiet ranks and unwritable folders, wandb through a stand-in module, and the manifests."""
import hashlib
import json
import subprocess
import sys
import time
import types
import warnings
from datetime import datetime
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

import tracking
from common import UserError

ROOT = Path(__file__).resolve().parents[1]


def read_events(folder: Path) -> EventAccumulator:
    ea = EventAccumulator(str(folder))
    ea.Reload()
    return ea


def steps_values(ea: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, round(e.value, 6)) for e in ea.Scalars(tag)]


@pytest.mark.filterwarnings("error")
def test_scalars_and_image_grid_read_back(tmp_path):
    log = tracking.RunLog(tmp_path / "run")
    log.scalars(0, {"train/loss": 0.5, "train/lr": 1e-3, "val/auc/Cardiomegaly": None, "val/mse": float("nan")})
    log.scalars(16, {"train/loss": torch.tensor(0.25), "train/lr": 2e-3})
    log.image_grid("train/batch", torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), step=0)
    log.image_grid("train/batch_float", torch.rand(10, 1, 8, 8) * 2 - 0.5, step=16)  # clamped to [0, 1]
    log.close()
    log.scalars(32, {"train/loss": 9.0})  # closed: ignored, no error

    ea = read_events(tmp_path / "run" / "tb")
    assert steps_values(ea, "train/loss") == [(0, 0.5), (16, 0.25)]
    assert steps_values(ea, "train/lr") == [(0, 0.001), (16, 0.002)]
    assert "val/auc/Cardiomegaly" not in ea.Tags()["scalars"] and "val/mse" not in ea.Tags()["scalars"]
    (grid,) = ea.Images("train/batch")
    assert (grid.step, grid.width, grid.height) == (0, 4 * 10 + 2, 12)  # one row of 4 tiles, 2 px padding
    (grid,) = ea.Images("train/batch_float")
    assert (grid.step, grid.width, grid.height) == (16, 8 * 10 + 2, 2 * 10 + 2)  # 8 per row


def test_resumed_run_keeps_one_value_per_step(tmp_path):
    log = tracking.RunLog(tmp_path)
    for step in range(0, 80, 8):  # steps are sample counts
        log.scalars(step, {"train/loss": float(step)})
    log.scalars(40, {"val/auc": 0.7})  # validated, then last.pt saved at step 40; killed at step 72
    log.close()
    # event files are read in the order of their names, which start with the second they were made
    time.sleep(1.05 - time.time() % 1)
    log = tracking.RunLog(tmp_path, purge_step=40 + 1)
    for step in range(48, 96, 8):
        log.scalars(step, {"train/loss": 1000.0 + step})
    log.scalars(88, {"val/auc": 0.8})
    log.close()
    assert len(list((tmp_path / "tb").iterdir())) == 2
    ea = read_events(tmp_path / "tb")
    assert steps_values(ea, "train/loss") == [(s, float(s)) for s in range(0, 48, 8)] + \
        [(s, 1000.0 + s) for s in range(48, 96, 8)]
    assert steps_values(ea, "val/auc") == [(40, 0.7), (88, 0.8)]


@pytest.mark.parametrize("kind,enabled", [("tensorboard", False), ("none", True)])
def test_quiet_rank_or_kind_none_writes_nothing(tmp_path, kind, enabled):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tracking.RunLog(tmp_path / "run", kind=kind, enabled=enabled, purge_step=3) as log:
            log.scalars(0, {"train/loss": 1.0})
            log.image_grid("train/batch", torch.zeros(2, 1, 8, 8), 0)
            log.hparams({"lr": 0.1}, {"val_mse": 0.2})
    assert not (tmp_path / "run").exists()


def test_unwritable_folder_warns_once_and_goes_quiet(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    folder = tmp_path / "a_file" / "run"
    with pytest.warns(UserWarning) as caught:
        log = tracking.RunLog(folder)
        log.scalars(0, {"train/loss": 1.0})
        log.image_grid("train/batch", torch.zeros(2, 1, 8, 8), 0)
        log.hparams({"lr": 0.1}, {"val_mse": 0.2})
        log.close()
    assert len(caught) == 1
    assert f"{folder / 'tb'}: the run's tensorboard log cannot be written" in str(caught[0].message)


def test_failed_write_warns_once_and_goes_quiet(tmp_path, monkeypatch):
    log = tracking.RunLog(tmp_path)
    log.scalars(0, {"train/loss": 1.0})

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(log._writer, "add_scalar", disk_full)
    with pytest.warns(UserWarning, match="No space left on device") as caught:
        log.scalars(1, {"train/loss": 2.0})
        log.scalars(2, {"train/loss": 3.0})
        log.hparams({"lr": 0.1}, {"val_mse": 0.2})
        log.close()
    assert len(caught) == 1


@pytest.mark.filterwarnings("error")
def test_hparams_land_in_the_run_folder_with_their_metrics(tmp_path):
    settings = {"lr": 0.001, "epochs": 3, "amp": True, "pathology": ["Cardiomegaly", "Edema"], "weights": None,
                "out-dir": tmp_path / "ckpt"}
    with tracking.RunLog(tmp_path) as log:
        log.scalars(32, {"val/loss": 0.4})
        log.hparams(settings, {"val_mse": 0.25, "val_auc": float("nan"), "best_epoch": 2}, step=32)
    # one folder, one run: TensorBoard pairs the hparams with the curves beside them
    assert [p for p in (tmp_path / "tb").iterdir() if p.is_dir()] == []
    ea = read_events(tmp_path / "tb")
    start = hp_metadata.parse_session_start_info_plugin_data(
        ea.PluginTagToContent(hp_metadata.PLUGIN_NAME)[hp_metadata.SESSION_START_INFO_TAG])
    hp = start.hparams
    assert hp["lr"].number_value == 0.001 and hp["epochs"].number_value == 3 and hp["amp"].string_value == "true"
    assert hp["pathology"].string_value == "Cardiomegaly, Edema" and hp["weights"].string_value == "none"
    assert hp["out-dir"].string_value == str(tmp_path / "ckpt")
    assert steps_values(ea, "hparam/val_mse") == [(32, 0.25)]
    assert steps_values(ea, "hparam/best_epoch") == [(32, 2.0)]
    assert "hparam/val_auc" not in ea.Tags()["scalars"]
    assert steps_values(ea, "val/loss") == [(32, 0.4)]


class FakeConfig(dict):
    def update(self, values, allow_val_change=False):
        super().update(values)


class FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False
        self.config, self.summary = FakeConfig(), {}

    def log(self, data, step=None):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module that records what RunLog gives it."""
    module = types.ModuleType("wandb")
    module.runs = []
    module.init = lambda **kwargs: module.runs.append(FakeRun(**kwargs)) or module.runs[-1]
    module.Image = lambda pixels: ("image", tuple(pixels.shape), str(pixels.dtype))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


@pytest.mark.filterwarnings("error")
def test_wandb_when_asked(tmp_path, fake_wandb):
    log = tracking.RunLog(tmp_path, kind="wandb", name="cardiomegaly", settings={"lr": 0.1, "out-dir": tmp_path})
    log.scalars(16, {"train/loss": 0.5, "val/auc": None})
    log.image_grid("train/batch", torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 16)
    log.hparams({"lr": 0.1, "pathology": ["Edema"], "amp": True}, {"val_mse": 0.2, "val_auc": None})
    log.close()
    (run,) = fake_wandb.runs
    assert run.init == {"dir": str(tmp_path), "name": "cardiomegaly", "config": {"lr": 0.1, "out-dir": str(tmp_path)}}
    assert run.logged == [(16, {"train/loss": 0.5}), (16, {"train/batch": ("image", (12, 22, 3), "uint8")})]
    assert run.config == {"lr": 0.1, "pathology": ["Edema"], "amp": True} and run.summary == {"hparam/val_mse": 0.2}
    assert run.finished and not (tmp_path / "tb").exists()
    tracking.RunLog(tmp_path, kind="wandb", enabled=False).close()  # rank 1: no wandb run
    assert len(fake_wandb.runs) == 1


def test_wandb_asked_but_not_installed_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    for enabled in (True, False):  # every rank stops alike
        with pytest.raises(UserError, match=r"^--log wandb: the wandb package is not installed; .*--log tensorboard$"):
            tracking.RunLog(tmp_path, kind="wandb", enabled=enabled)
    assert not any(tmp_path.iterdir())


def test_run_manifest_from_start_to_end(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_bytes(b"Path,Sex\n" + b"x" * (3 << 20))  # over 1 MiB: hashed in several pieces
    out = tmp_path / "run"
    m = tracking.start_manifest(out, device=torch.device("cpu"), world_size=1, data_root=tmp_path,
                                train_csv=tracking.file_fingerprint(csv), cache_key="k32")
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(on_disk)) and on_disk["exit_reason"] is None and on_disk["ended"] is None
    assert on_disk["train_csv"] == {"path": str(csv.resolve()), "bytes": csv.stat().st_size,
                                    "sha256": hashlib.sha256(csv.read_bytes()).hexdigest()}
    assert (on_disk["device"], on_disk["world_size"], on_disk["data_root"], on_disk["cache_key"]) == \
        ("cpu", 1, str(tmp_path), "k32")
    assert on_disk["device_name"] and on_disk["resumed"] is False
    assert (on_disk["torch"], on_disk["python"]) == (torch.__version__, sys.version.split()[0])
    assert on_disk["torchvision"] and on_disk["timm"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert on_disk["git_commit"] == head and isinstance(on_disk["git_dirty"], bool)
    assert datetime.fromisoformat(on_disk["started"]).utcoffset().total_seconds() == 0

    tracking.finish_manifest(out, m, "SIGTERM", best_epoch=1)
    done = json.loads((out / "manifest.json").read_text())
    assert done["exit_reason"] == "SIGTERM" and done["best_epoch"] == 1 and done["seconds"] >= 0
    assert datetime.fromisoformat(done["ended"]) >= datetime.fromisoformat(done["started"])
    with pytest.raises(ValueError):
        tracking.finish_manifest(out, m, "crashed")

    m2 = tracking.start_manifest(out, resumed=True, device="cpu", world_size=2)
    tracking.finish_manifest(out, m2, "error: --data-root X: no such directory")
    again = json.loads((out / "manifest.json").read_text())
    assert again["resumed"] is True and again["world_size"] == 2
    assert again["exit_reason"] == "error: --data-root X: no such directory"
    assert [a["exit_reason"] for a in again["earlier"]] == ["SIGTERM"]


def test_environment_without_git_is_null_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "__file__", str(tmp_path / "tracking.py"))  # not a checkout
    env = tracking.environment()
    assert env["git_commit"] is None and env["git_dirty"] is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    env = tracking.environment()
    assert env["git_commit"] is None and env["git_dirty"] is None and env["torch"] == torch.__version__


def test_submission_manifest_lists_every_checkpoint(tmp_path):
    out_csv = tmp_path / "sub" / "submission.csv"
    out_csv.parent.mkdir()
    out_csv.write_text("Id,No Finding\n1,0.5\n")
    checkpoints = []
    for fold in (0, 1):
        path = tmp_path / "ckpt" / "cardiomegaly" / f"fold{fold}" / "best.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(bytes([fold]) * 100)
        checkpoints.append({"path": path, "pathology": "Cardiomegaly", "fold": fold})
    tracking.submission_manifest(out_csv, checkpoints)
    written = json.loads((tmp_path / "sub" / "submission.manifest.json").read_text())
    assert tracking.submission_manifest_path(out_csv) == tmp_path / "sub" / "submission.manifest.json"
    assert [(c["pathology"], c["fold"], c["bytes"], c["sha256"]) for c in written["checkpoints"]] == \
        [("Cardiomegaly", f, 100, hashlib.sha256(bytes([f]) * 100).hexdigest()) for f in (0, 1)]
    assert written["submission"]["sha256"] == hashlib.sha256(out_csv.read_bytes()).hexdigest()
    assert written["torch"] == torch.__version__ and "git_commit" in written and written["written"]
