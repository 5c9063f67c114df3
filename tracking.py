"""What a run reports while and after it runs: the live log (TensorBoard event files in RUN/tb/, or
Weights & Biases when asked for) and the run manifest (RUN/manifest.json: the code, the versions, the
device, the data, the times and why the run ended), and the manifest make_submission.py writes beside
its CSV.

Logging never kills a run: a log folder that cannot be written, or a write that fails, warns once
and the log goes quiet while training goes on.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import platform
import re
import socket
import subprocess
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from common import UserError, jsonable, write_text

LOG_KINDS = ("tensorboard", "wandb", "none")
EXIT_REASONS = ("finished", "early stop", "SIGTERM", "SIGINT")  # or "error: MESSAGE"


def check_kind(kind: str) -> None:
    """Raise UserError when `kind` (--log) cannot be used here: wandb is asked for, not installed."""
    if kind not in LOG_KINDS:
        raise ValueError(f"log kind {kind!r} is not one of {LOG_KINDS}")
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise UserError("--log wandb: the wandb package is not installed; `python -m pip install wandb`, "
                            "or use --log tensorboard") from e


class RunLog:
    """The live log of one run. Only rank 0 writes: any other rank passes enabled=False and gets an
    instance whose methods do nothing, as does kind="none".

    kind="tensorboard": event files in folder/"tb" (torch's SummaryWriter). TensorBoard hides the
    events of an earlier process in that folder at or after `purge_step`: a resumed run passes the
    global step last.pt was saved at plus 1 (what was logged up to that save is kept, what the killed
    run logged after it is hidden), so that every curve keeps one value per step. kind="wandb": a Weights & Biases
    run (files under folder/"wandb"), named `name`, its config `settings`; a resumed run is a new
    wandb run. Call close() at the end, also after an error (or use `with RunLog(...) as log:`)."""

    def __init__(self, folder: Path, kind: str = "tensorboard", enabled: bool = True, purge_step: int | None = None,
                 name: str = "", settings: dict | None = None):
        check_kind(kind)  # on every rank, so that all of them stop alike
        self.kind = kind if enabled else "none"
        self.folder = Path(folder) / "tb" if kind == "tensorboard" else Path(folder)
        self._writer = self._run = None
        try:
            if self.kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                # flush every 30 s (not 120) so that the dashboard follows the run closely
                self._writer = SummaryWriter(str(self.folder), purge_step=purge_step, flush_secs=30)
            elif self.kind == "wandb":
                import wandb
                self.folder.mkdir(parents=True, exist_ok=True)
                self._run = wandb.init(dir=str(self.folder), name=name or None, config=jsonable(settings or {}))
        except Exception as e:  # noqa: BLE001 - whatever the logger raises, training goes on
            self._fail(e)

    def _try(self, fn) -> None:
        """fn(), unless the log is closed or quiet; the first failure warns and silences the log."""
        if self._writer is None and self._run is None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        warnings.warn(f"{self.folder}: the run's {self.kind} log cannot be written "
                      f"({type(e).__name__}: {e}); training goes on without it", stacklevel=3)
        with contextlib.suppress(Exception):
            self._close()

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Log tag -> value at `step` (the global sample count); None and NaN values are left out."""
        kept = _numbers(values)
        if self._writer is not None:
            self._try(lambda: [self._writer.add_scalar(k, v, step) for k, v in kept.items()])
        elif self._run is not None and kept:
            self._try(lambda: self._run.log(kept, step=step))

    def image_grid(self, tag: str, images: torch.Tensor, step: int) -> None:
        """Log the first 64 of `images`, (B, 1, H, W) uint8 or float in [0, 1], as one grid image."""
        if self._writer is None and self._run is None:
            return
        from torchvision.utils import make_grid
        images = images[:64].detach().cpu()
        images = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        grid = make_grid(images, nrow=8, padding=2)  # (3, H', W') float in [0, 1]
        if self._writer is not None:
            self._try(lambda: self._writer.add_image(tag, grid, step))
        elif self._run is not None:
            import wandb
            pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H', W', 3)
            self._try(lambda: self._run.log({tag: wandb.Image(pixels)}, step=step))

    def hparams(self, settings: dict, metrics: dict[str, float | None], step: int | None = None) -> None:
        """Log the run's settings with its final metrics, once, at the end: TensorBoard's HParams tab
        then shows every run under --logdir side by side. Values become int, float or str (a bool
        'true' / 'false', a list joined with ', ', None 'none'); metrics are logged as hparam/NAME
        (distinct from the curves' tags), None and NaN left out; `step`: the last global step."""
        hp = {str(k): _hparam_value(v) for k, v in settings.items()}
        kept = {f"hparam/{k}": v for k, v in _numbers(metrics).items()}
        if self._writer is not None:
            # run_name="." keeps them in this run's own folder: add_hparams puts them in the subfolder
            # run_name names (a timestamp by default), which TensorBoard shows as a run of its own
            self._try(lambda: self._writer.add_hparams(hp, kept, run_name=".", global_step=step))
        elif self._run is not None:
            self._try(lambda: (self._run.config.update(jsonable(settings), allow_val_change=True),
                               self._run.summary.update(kept)))

    def steps(self, steps: list) -> None:
        """train.py's optimizer steps since its last check: (global sample count, learning rate, (2,)
        tensor of the step's loss sum and labelled entries on the device), as train/loss and
        train/lr; one transfer from the device for all of them."""
        if steps and (self._writer is not None or self._run is not None):
            values = torch.stack([step for _, _, step in steps]).tolist()
            for (samples, lr, _), (loss, n) in zip(steps, values):
                self.scalars(samples, {"train/loss": loss / max(n, 1), "train/lr": lr})

    def validation(self, step: int, row: dict, per_pathology: dict) -> None:
        """A validation of train.py: history.csv's row (val/val_loss, val/val_mse, ... and
        train/epoch_loss, train/images_per_s) and each pathology's numbers (val/METRIC/NAME)."""
        values = {f"val/{k}": v for k, v in row.items() if k.startswith("val_") or k == "const_mse"}
        values.update({f"val/{k}/{name}": m.get(k) for name, m in per_pathology.items()
                       for k in ("val_mse", "val_mse_cv", "val_mse_cal", "const_mse", "val_auc")})
        values.update({"train/epoch_loss": row["train_loss"], "train/images_per_s": row["train_images_per_s"]})
        self.scalars(step, values)

    def close(self) -> None:
        """Flush and close; the instance does nothing afterwards."""
        self._try(self._close)

    def _close(self) -> None:
        writer, run, self._writer, self._run = self._writer, self._run, None, None
        if writer is not None:
            writer.close()
        if run is not None:
            run.finish()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _numbers(values: dict) -> dict[str, float]:
    """The entries that are numbers: None and NaN left out (tensors become floats)."""
    return {k: float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}


def _hparam_value(v) -> int | float | str:
    if v is None:
        return "none"
    if isinstance(v, bool):  # torch's add_hparams tests int before bool: True would show as 1.0
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


# ---------------------------------------------------------------------------------------------
# Manifests

def now() -> str:
    """The time now, ISO 8601 in UTC to the second: '2026-03-01T12:00:00+00:00'."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment() -> dict:
    """The code and software in use: the commit of this code's git checkout and whether its tracked
    files differ from it (both null without git or outside a checkout), Python, torch, torchvision,
    timm and CUDA versions, the host."""
    here = Path(__file__).resolve().parent
    commit = _git(here, "rev-parse", "HEAD")
    status = _git(here, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": _version("torchvision"), "timm": _version("timm"), "cuda": torch.version.cuda,
            "host": socket.gethostname()}


def _git(folder: Path, *args: str) -> str | None:
    """git's output (stripped), or None when git is missing, fails or is not in a checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device | str) -> str:
    """What the device is: the GPU's name on CUDA, else the processor's."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":  # Linux names the model here; platform.processor() often says only 'x86_64'
        with contextlib.suppress(OSError):
            found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
            if found:
                return found.group(1).strip()
    return platform.processor() or platform.machine() or device.type


def file_fingerprint(path: Path) -> dict:
    """{"path" (absolute), "bytes", "sha256"} of a file, hashed in 1 MiB pieces (any size)."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as e:
        raise UserError(f"{path}: cannot be read to record its fingerprint ({e.strerror or e})") from e
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def start_manifest(folder: Path, resumed: bool = False, **fields) -> dict:
    """Write folder/manifest.json as a run starts and return it, for finish_manifest. It holds
    environment(), `started`, `ended` and `exit_reason` (null until the end: a manifest left so was
    killed without notice, e.g. SIGKILL), `resumed` and `fields`. The fields train.py passes:
    device (its name is added as device_name), world_size, data_root, train_csv
    (file_fingerprint(CSV)), cache_key. A resumed run keeps the earlier attempts' manifests in
    `earlier`, oldest first."""
    manifest = {**environment(), "started": now(), "ended": None, "exit_reason": None, "resumed": resumed}
    if fields.get("device") is not None:
        fields = {**fields, "device": str(fields["device"]), "device_name": device_name(fields["device"])}
    manifest.update(fields)
    if resumed:  # an earlier attempt's manifest, when it is there and readable
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            old = json.loads((Path(folder) / "manifest.json").read_text())
            manifest["earlier"] = old.pop("earlier", []) + [old]
    _write_json(Path(folder) / "manifest.json", manifest)
    return manifest


def finish_manifest(folder: Path, manifest: dict, exit_reason: str, **fields) -> dict:
    """Complete the manifest at the end of the run: `ended`, `seconds`, `exit_reason` (one of
    EXIT_REASONS, or 'error: MESSAGE') and any further fields; written atomically, and returned."""
    if exit_reason not in EXIT_REASONS and not exit_reason.startswith("error: "):
        raise ValueError(f"exit reason {exit_reason!r}: not one of {EXIT_REASONS} nor 'error: MESSAGE'")
    ended = now()
    seconds = (datetime.fromisoformat(ended) - datetime.fromisoformat(manifest["started"])).total_seconds()
    manifest.update(fields, ended=ended, seconds=seconds, exit_reason=exit_reason)
    _write_json(Path(folder) / "manifest.json", manifest)
    return manifest


def submission_manifest_path(out_csv: Path) -> Path:
    """Where submission_manifest writes: `<out_csv stem>.manifest.json` beside the CSV."""
    return Path(out_csv).with_name(Path(out_csv).stem + ".manifest.json")


def submission_manifest(out_csv: Path, checkpoints: list[dict], **fields) -> None:
    """Write the manifest of a submission CSV (call it once the CSV is written): the CSV's
    fingerprint, each checkpoint used ({"path", "pathology", "fold", ...} given, its bytes and
    sha256 added), environment(), the time and any further fields."""
    manifest = {**environment(), "written": now(), "submission": file_fingerprint(out_csv), **fields,
                "checkpoints": [{**c, **file_fingerprint(c["path"])} for c in checkpoints]}
    _write_json(submission_manifest_path(out_csv), manifest)


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(jsonable(data), indent=2, default=str) + "\n")
