"""What every script shares: one-line errors, atomic writes, text tables, JSON-safe values, the
argparse flags that several scripts declare, and the one place that reads test hooks.

Nothing here imports torch at module level: `python dataset.py` on a complete cache returns in well
under a second, which matters when a SLURM array starts hundreds of jobs.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

SQUARE_MODES = ("resize", "crop")  # how non-square images become square (cache.py): --square
class UserError(Exception):
    """An error the user caused (bad path, bad value): scripts print it as one line and exit 2."""


def run_cli(main: Callable, argv=None) -> int:
    """Run a script's main(); a UserError becomes one 'error: ...' line on stderr and exit code 2."""
    warnings.formatwarning = lambda msg, category, *a, **k: f"warning: {msg}\n"
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain text table; floats get 4 decimals, NaN/None print as '-'."""
    def cell(v):
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what SLURM gave this job, not the whole node
    except AttributeError:
        return os.cpu_count() or 1


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) then rename tmp to path: path is either the old file or the new one, whole.
    A failed write (disk full, read-only folder) leaves the old file as it was and raises UserError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise UserError(f"could not write {path}: {e.strerror or e}") from e
    except BaseException:
        _discard(tmp)
        raise


def _discard(path: Path) -> None:
    """Remove a temporary file if it is there; never raise (its folder may not even exist)."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def save_torch(obj, path: Path) -> None:
    """torch.save, atomically. torch's writer reports a full disk or an exceeded quota as a
    RuntimeError ('PytorchStreamWriter failed writing file ...'), not an OSError: it is turned into
    one, so the caller gets atomic_write's one-line UserError and the old file stays as it was."""
    import torch

    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            raise OSError(f"{str(e).splitlines()[0]} (disk full or over quota?)") from e
    atomic_write(path, write)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def jsonable(x):
    """Dicts/lists as JSON accepts them: NaN and inf -> None, numpy scalars/arrays -> Python, paths
    -> strings (summary.json's configuration holds argparse's Path values)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x




# ---------------------------------------------------------------------------------------------
# Test hooks: the only place production code reads them. Each slows or shortens something so that
# a test can prove a property on a small machine; unset (as for every user), they change nothing.
TEST_HOOKS = {
    "CXR_TEST_DECODE_DELAY": "seconds each cache-decoding chunk sleeps: a build slower than a collective's timeout",
    "CXR_PG_TIMEOUT_S": "torch.distributed's process-group timeout, seconds: no process may wait in a collective "
                        "while a cache is built",
}


def test_hook(name: str) -> float | None:
    """The value of test hook `name` (one of TEST_HOOKS) as a float, or None when it is not set."""
    assert name in TEST_HOOKS, name
    value = os.environ.get(name)
    return float(value) if value else None


# ---------------------------------------------------------------------------------------------
# Flags that several scripts take, declared once

def add_data_flags(p: argparse.ArgumentParser, csv_flag: str = "--csv", csv_help: str = "the CSV to read",
                   image: bool = True):
    """The "data" group: --data-root, the CSV flag, --image-size and --square (unless image=False:
    the submission takes them from each checkpoint), --cache-dir, --workers. Returns the group, for
    a script's own data flags."""
    g = p.add_argument_group("data")
    g.add_argument("--data-root", type=Path, help="dataset root; none: the demo dataset in ./demo_data, made on first use")
    g.add_argument(csv_flag, type=Path, help=csv_help)
    if image:
        g.add_argument("--image-size", type=int, help="side of the square images, px (default 224; 64 on the demo data)")
        g.add_argument("--square", choices=SQUARE_MODES, default="resize",
                       help="how non-square images become square: resize (squash) or crop (central square)")
    g.add_argument("--cache-dir", type=Path, default=Path("cache"), help="image cache folder (never under the data root)")
    g.add_argument("--workers", type=int, default=default_workers(), help="processes that decode images into the cache")
    return g


def add_device_flags(p: argparse.ArgumentParser, amp: bool = True):
    """The "device" group: --device, --amp (unless amp=False), --progress. Returns the group."""
    g = p.add_argument_group("device")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    if amp:
        g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                       help="autocast on CUDA: bf16 on compute capability 8.0+, else fp16 with a gradient scaler")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    return g


def check_common_flags(p: argparse.ArgumentParser, args: argparse.Namespace, min_size: int = 8) -> None:
    """parser.error for a bad --image-size or --workers, where the script has them."""
    size, workers = getattr(args, "image_size", None), getattr(args, "workers", None)
    if size is not None and size < min_size:
        p.error(f"--image-size must be at least {min_size}, got {size}")
    if workers is not None and workers < 1:
        p.error(f"--workers must be at least 1, got {workers}")
