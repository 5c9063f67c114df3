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
EQUALIZE_MODES = ("none", "hist", "clahe")  # contrast equalisation when the cache is built (decode.py): --equalize
DEMO_ROOT = Path("demo_data")  # where the synthetic demo data is made when no --data-root is given (demo.py)
MAX_IMAGE_SIZE = 4096  # --image-size bound: the cache holds size^2 bytes per image (16 MiB each at 4096)
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


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(files: dict[str, Path | None] | None = None, folders: dict[str, Path | list | None] | None = None,
                  inputs: dict[str, Path | None] | None = None, data_root: Path | None = None,
                  probe: bool = True) -> None:
    """The one guard for what a script writes, called before any work starts. `files`: flag ->
    an output file; `folders`: flag -> a folder (or several) the script writes into; `inputs`: flag
    -> a file the run reads (CSVs, checkpoints, weights). Each output must not be an input (a file
    output is not one, a folder output holds none), must not lie under the data root (read-only
    on a cluster, and never written), and must be writable: a probe file is created and removed
    where it would go (probe=False: not created, for a torchrun process that writes nothing). Raises
    UserError naming the flag, the path and why."""
    root = _resolved(data_root) if data_root is not None else None
    ins = {flag: _resolved(path) for flag, path in (inputs or {}).items() if path is not None}
    outs = [(flag, path, False) for flag, path in (files or {}).items() if path is not None]
    for flag, paths in (folders or {}).items():
        outs += [(flag, path, True) for path in (paths if isinstance(paths, list) else [paths]) if path is not None]
    for flag, path, is_folder in outs:
        out = _resolved(path)
        if root is not None and _within(out, root):
            raise UserError(f"{flag} {path}: lies under the data root {data_root}, which is never written; "
                            f"choose a path outside it")
        for in_flag, src in ins.items():
            if (_within(src, out) if is_folder else src == out):
                what = "holds" if is_folder and src != out else "is"
                raise UserError(f"{flag} {path}: {what} the run's input {in_flag} {src}, which it would overwrite; "
                                f"choose another path")
        _probe(flag, path, out if is_folder else out.parent, is_folder, out, probe)


def _probe(flag: str, path: Path, folder: Path, is_folder: bool, out: Path, create: bool = True) -> None:
    """Create the folder (as the run would) and a probe file in it, then remove the probe."""
    if is_folder and out.exists() and not out.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder")
    if not is_folder and out.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    if not create:
        return
    probe = folder / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot be written ({e.strerror or e} in {folder})") from e
    _discard(probe)


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
    "CXR_TEST_STEP_DELAY": "seconds each optimizer step sleeps: steps as slow as large images make them, so that "
                           "the ranks' agreement after a SIGTERM is shown to be bounded in seconds, not steps",
}


def test_hook(name: str) -> float | None:
    """The value of test hook `name` (one of TEST_HOOKS) as a float, or None when it is not set."""
    assert name in TEST_HOOKS, name
    value = os.environ.get(name)
    return float(value) if value else None


# ---------------------------------------------------------------------------------------------
# Flags that several scripts take, declared once

class Parser(argparse.ArgumentParser):
    """argparse with a bad flag reported in one line, `error: MESSAGE (see SCRIPT --help)`, exit 2,
    instead of the usage block; when the value came from a --config file, the line names it."""
    config_source: tuple | None = None  # (path, {dest: value}, argv), set by config.parse_args

    def __init__(self, *a, prog: str | None = None, **k):
        # the script's own name, also when main(argv) is called from a test or another script
        # (argparse would take sys.argv[0]: pytest's, or the caller's)
        super().__init__(*a, prog=prog or Path(sys._getframe(1).f_code.co_filename).name, **k)

    def error(self, message: str):
        if self.config_source:
            path, values, argv = self.config_source
            named = {a.dest for a in self._actions if any(f in message for f in a.option_strings)}
            typed = {a.dest for a in self._actions for t in argv if t.split("=")[0] in a.option_strings}
            if named & (set(values) - typed):
                message += f" (set in --config {path})"
        self.exit(2, f"error: {message} (see {Path(self.prog).name} --help)\n")


# What a --resume may do with a flag, said where the flag is declared: may_change(p.add_argument(...))
# for where files are and how the run executes; must_keep(...) for what is trained. A flag of
# train.py without either is a test failure (tests/test_flags.py), and is compared as must-keep.
def may_change(action: argparse.Action) -> argparse.Action:
    """Mark a flag that a --resume may change (paths, devices, progress bars, --epochs)."""
    action.on_resume = "may change"
    return action


def must_keep(action: argparse.Action) -> argparse.Action:
    """Mark a flag that a --resume must keep: it changes what is trained (data, model, recipe)."""
    action.on_resume = "must keep"
    return action


def add_data_flags(p: argparse.ArgumentParser, csv_flag: str = "--csv", csv_help: str = "the CSV to read",
                   image: bool = True):
    """The "data" group: --data-root, the CSV flag, --image-size, --square and --equalize (unless
    image=False: the submission takes them from each checkpoint), --cache-dir, --workers. Returns the
    group, for a script's own data flags."""
    g = p.add_argument_group("data")
    may_change(g.add_argument("--data-root", type=Path,
                              help="dataset root; none: the demo dataset in ./demo_data, made on first use"))
    may_change(g.add_argument(csv_flag, type=Path, help=csv_help))
    if image:
        must_keep(g.add_argument("--image-size", type=int,
                                 help=f"side of the square images, px, at most {MAX_IMAGE_SIZE} (default 224; 64 on "
                                 "the demo data)"))
        must_keep(g.add_argument("--square", choices=SQUARE_MODES, default="resize",
                                 help="how non-square images become square: resize (squash) or crop (central square)"))
        must_keep(g.add_argument("--equalize", choices=EQUALIZE_MODES, default="none",
                                 help="contrast equalisation applied when the cache is built (part of its key): none, "
                                 "hist (histogram equalisation) or clahe (OpenCV's contrast-limited adaptive one)"))
    may_change(g.add_argument("--cache-dir", type=Path, default=Path("cache"),
                              help="image cache folder (never under the data root)"))
    may_change(g.add_argument("--workers", type=int, default=default_workers(),
                              help="processes that decode images into the cache"))
    return g


def add_device_flags(p: argparse.ArgumentParser, amp: bool = True):
    """The "device" group: --device, --amp (unless amp=False), --progress. Returns the group."""
    g = p.add_argument_group("device")
    may_change(g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto"))
    if amp:
        may_change(g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                                  help="autocast on CUDA: bf16 on compute capability 8.0+, else fp16 with a gradient "
                                  "scaler"))
    may_change(g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars"))
    return g


def check_common_flags(p: argparse.ArgumentParser, args: argparse.Namespace, min_size: int = 8,
                       max_size: int = MAX_IMAGE_SIZE) -> None:
    """parser.error for the first of common_flag_errors(args, min_size, max_size): call it right
    after parsing, once --image-size has its default."""
    for message in common_flag_errors(args, min_size, max_size):
        p.error(message)


def common_flag_errors(args: argparse.Namespace, min_size: int = 8, max_size: int = MAX_IMAGE_SIZE,
                       why_min: str = "") -> list[str]:
    """One line for each bad value of the flags add_data_flags declares, where the script has them:
    --image-size outside min_size..max_size px (the upper bound stops a size whose cache could never
    fit, 100000 px: 10 GB an image, in one line instead of an out-of-memory traceback; why_min says
    why a script needs more than 8, as train.py does), --workers below 1, a --cache-dir that is a file
    or lies under the data root (the demo's folder without --data-root), where nothing is written.
    Reads nothing but the two paths' file types."""
    size, workers = getattr(args, "image_size", None), getattr(args, "workers", None)
    cache_dir = getattr(args, "cache_dir", None)
    out = []
    if size is not None and size < min_size:
        out.append(f"--image-size must be at least {min_size}{why_min}, got {size}")
    if size is not None and size > max_size:
        out.append(f"--image-size must be at most {max_size} (the cache holds size^2 bytes per image), got {size}")
    if workers is not None and workers < 1:
        out.append(f"--workers must be at least 1, got {workers}")
    if cache_dir is not None:
        root = getattr(args, "data_root", None)
        if root is None:
            root = DEMO_ROOT
        if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
            out.append(f"--cache-dir {cache_dir}: is a file, not a folder; choose a folder")
        elif _within(_resolved(cache_dir), _resolved(root)):
            out.append(f"--cache-dir {cache_dir}: lies under the data root {root}, which is never written; choose a "
                       f"folder outside it")
    return out
