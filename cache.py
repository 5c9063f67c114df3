"""The grayscale uint8 image cache: decoding, shards, build locks and recovery, augmented copies.

Decoding (load_image): every image becomes uint8 (S, S), S = --image-size.
    JPEG, 8-bit PNG      as PIL decodes them, converted to 'L'; JPEG in draft mode (fast)
    16-bit PNG/TIFF      PIL modes I;16 / I / F, brought to uint8 by to_uint8 (below)
    DICOM (.dcm, .dicom, or any file with the 'DICM' prefix)   decode_dicom: pydicom's modality
                         LUT (RescaleSlope/Intercept), then to_uint8 over the VOI LUT's or the
                         window's range when the file has one; MONOCHROME1 inverted
    then the square mode ('resize' squashes, 'crop' takes the central square) and a bilinear resize.
One rule for more than 8 bits (to_uint8): a range [lo, hi] maps linearly onto 0..255, clipped
outside; [lo, hi] is the file's display range (DICOM window or VOI LUT) when it declares one, else
the image's own min..max. A file that cannot be read (missing, truncated, a DICOM without pixel
data or in a codec that is not installed) is recorded per image as "missing" or "unreadable (why)".

Cache layout (never under the data root): CACHE_DIR/<csv stem>-<size>px-<key>/
    meta.json            the key's inputs: image paths (row order = slot order), size, square mode
    shard_00000.pt ...   {"images": uint8 (n, S, S)}, shard_size images each (default 1024,
                         --shard-size), loaded with torch.load(mmap=True). Written to a temporary
                         name and renamed, so a shard file that exists is complete.
    shard_00000.json     {"ok": [bool], "errors": [str]} for that shard, written just before it.
The key hashes everything that changes pixels: the data root, the ordered image paths, the size, the
square mode and the decoder's version (CACHE_VERSION, or JPEG_CACHE_VERSION for a cache of JPEGs
only, whose pixels have not changed), but not the shard size, which only changes the layout: a
cache built with any shard size is found by every script. Augmented copies (experiments/) live
beside it as <folder>+<name>. A build killed mid-write leaves a '.NAME.tmp-HOST-PID' file; the next
build on that host removes it once that process is gone.

torch is imported inside the functions that need it (see common.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from common import SQUARE_MODES, UserError, _discard, default_workers, save_torch, test_hook, write_text

CACHE_VERSION = 2  # 2: 16-bit PNG/TIFF rescaled by to_uint8 (version 1 clipped them at 255), DICOM read
JPEG_CACHE_VERSION = 1  # JPEG pixels are unchanged since version 1: a cache of JPEGs only keeps its key
SHARD_SIZE = 1024
LOCK_STALE_S = 600  # a build lock untouched this long is taken over: its builder hung, or its host died
LOCK_POLL_S = 1.0   # how often a process waiting on another's build looks again
N_NAMED = 10  # bad images named in a warning; the count covers them all


class ImageError(ValueError):
    """A file that is there but holds no image this project can read; the message says why, briefly
    (it goes into the cache's status and the warning that names the image)."""


DICOM_SUFFIXES = (".dcm", ".dicom")
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL modes of 16-bit PNG/TIFF, 32-bit TIFF


def load_image(path: Path, size: int, square: str = "resize") -> np.ndarray:
    """Decode one image to uint8 (size, size) grayscale.

    JPEG and 8-bit PNG decode as PIL gives them (convert('L')), untouched. 16-bit PNG/TIFF (PIL
    modes I;16, I, F) and DICOM are brought to uint8 by to_uint8's rule (DICOM: see decode_dicom).
    A file is read as DICOM when its name ends .dcm / .dicom, or when PIL cannot identify it and it
    starts like a DICOM file (a 'DICM' prefix), so PACS exports without an extension work too.

    JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT, to the smallest scale
    that keeps both sides >= size; a 2300 x 2750 X-ray at 256 px decodes at 1/8, about 20x faster
    than a full decode. Non-square images are made square by `square`: 'resize' squashes the whole
    image to size x size (aspect ratio not kept, nothing cut off: the default, as in the original);
    'crop' takes the central square of side min(w, h), then resizes. Bilinear, whatever the format.
    Raises FileNotFoundError, ImageError (DICOM without pixel data, missing codec, ...) or PIL's own
    errors for a file that is not an image."""
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return _square(Image.fromarray(decode_dicom(path)), size, square)
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        if not _is_dicom(path):
            raise
        return _square(Image.fromarray(decode_dicom(path)), size, square)
    with im:
        im.draft("L", (size, size))
        im = Image.fromarray(to_uint8(np.asarray(im))) if im.mode in WIDE_MODES else im.convert("L")
        return _square(im, size, square)


def _square(im: Image.Image, size: int, square: str) -> np.ndarray:
    """A mode 'L' image -> uint8 (size, size), by `square` ('resize' or 'crop'; see load_image)."""
    w, h = im.size
    box = None
    if square == "crop":
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(im, dtype=np.uint8)


def to_uint8(a: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """The one rule that brings wider-than-8-bit pixels to uint8 (H, W): the range [lo, hi] maps
    linearly onto 0..255, lo -> 0 and hi -> 255, rounded to nearest (half up); values outside it
    clip to 0 or 255. [lo, hi] is `window` when the file declares a display range (a DICOM window or
    VOI LUT, see decode_dicom), else the image's own min..max.

    Why min..max rather than a percentile range (say 0.5-99.5 %): it clips nothing, needs no tuning
    constant, and gives back an 8-bit image stored in 16 bits bit for bit (a 16-bit PNG of values
    k * 257, k spanning 0..255 -> k); a 12-bit image in a 16-bit file fills 0..255 instead of 1/16
    of it. Its cost, a few extreme pixels (burned-in white text) compressing the contrast of the
    rest, is the same for every image of a set, and a file that wants a display range carries a
    window, which wins. A constant image (hi == lo) is all 0. Non-finite values are an ImageError."""
    a = np.asarray(a, dtype=np.float64)
    lo, hi = (a.min(), a.max()) if window is None else (float(window[0]), float(window[1]))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageError("non-finite pixel values")
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.floor((np.clip(a, lo, hi) - lo) * (255.0 / (hi - lo)) + 0.5).astype(np.uint8)


def decode_dicom(path: Path) -> np.ndarray:
    """A single-frame grayscale DICOM -> uint8 (H, W), at full resolution, as a radiologist's viewer
    shows it by default:

    1. the modality LUT (RescaleSlope / RescaleIntercept, or a Modality LUT Sequence), by pydicom's
       apply_modality_lut;
    2. the display range, mapped onto 0..255 by to_uint8: a VOI LUT Sequence when there is one
       (applied by pydicom's apply_voi; range 0..2**n - 1, n = the LUT's bits per entry, its third
       LUTDescriptor value), else the first WindowCenter / WindowWidth pair (range center -+ width/2,
       in modality units: DICOM's LINEAR_EXACT; LINEAR differs by half a stored unit, and a SIGMOID
       VOILUTFunction is read as linear), else the image's own min..max;
    3. MONOCHROME1 (low values bright) inverted: 255 - v, so bone is bright as in MONOCHROME2.

    A file that is not DICOM, has no pixel data, is compressed with a codec no installed pydicom
    plugin decodes, or holds several frames or colour, raises ImageError saying which."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
    except ImportError as e:
        raise ImageError("DICOM needs pydicom: pip install pydicom") from e
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise ImageError("not a DICOM file") from e
    if "PixelData" not in ds:
        raise ImageError("DICOM without pixel data")
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is not None and ts.is_compressed:
        try:
            available = get_decoder(ts).is_available
        except NotImplementedError:  # a transfer syntax pydicom has no decoder for at all
            available = False
        if not available:
            raise ImageError(f"DICOM compressed as {ts.name}, no decoder installed for it "
                             "(pydicom plugins: pylibjpeg, gdcm)")
    kind = ds.get("PhotometricInterpretation", "")
    if kind not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"DICOM {kind or 'without PhotometricInterpretation'}: only MONOCHROME1/2 are read")
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise ImageError(f"DICOM with {ds.NumberOfFrames} frames: one is expected")
    try:
        values = apply_modality_lut(ds.pixel_array, ds)
    except Exception as e:  # truncated pixel data, inconsistent Rows/Columns/BitsAllocated
        reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        raise ImageError(f"DICOM pixel data unreadable ({reason[:100]})") from e
    if ds.get("VOILUTSequence"):  # a table indexed by modality values, which are integers
        values = apply_voi(np.rint(values).astype(np.int64), ds)
        window = (0, 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        window = _dicom_window(ds)
    out = to_uint8(values, window)
    return 255 - out if kind == "MONOCHROME1" else out


def _dicom_window(ds) -> tuple[float, float] | None:
    """(center - width/2, center + width/2) of the first WindowCenter / WindowWidth pair; None when
    the file has none, or an empty or non-positive one."""
    try:
        center, width = (float(np.atleast_1d(ds.get(k))[0]) for k in ("WindowCenter", "WindowWidth"))
    except (TypeError, ValueError, IndexError):
        return None
    return (center - width / 2, center + width / 2) if width > 0 else None


def _is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then 'DICM'."""
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def _decode_chunk(task):
    """Worker: decode one chunk. Returns (start, uint8 (n, S, S), ok (n,), errors [str])."""
    start, paths, size, square = task
    time.sleep(test_hook("CXR_TEST_DECODE_DELAY") or 0.0)
    images = np.zeros((len(paths), size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    errors = [""] * len(paths)
    for i, p in enumerate(paths):
        try:
            images[i] = load_image(p, size, square)
            ok[i] = True
        except FileNotFoundError:
            errors[i] = "missing"
        except ImageError as e:  # says what is wrong in a few words: DICOM without pixel data, ...
            errors[i] = f"unreadable ({e})"
        except Exception as e:  # truncated JPEG, random bytes, empty file, not an image
            errors[i] = f"unreadable ({type(e).__name__}: {e})"[:200]
    return start, images, ok, errors


class ImageCache:
    """A built image cache: get(slots) -> uint8 (B, 1, S, S). Shards load lazily, memory-mapped, so
    a DataLoader worker or another rank shares the OS page cache rather than a copy."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            meta = json.loads((self.folder / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{self.folder / 'meta.json'}: unreadable cache index ({e}); delete {self.folder} "
                            f"and rerun dataset.py") from e
        self.meta = meta
        self.paths: list[str] = meta["paths"]
        self.size: int = meta["size"]
        self.square: str = meta["square"]
        self.shard_size: int = meta["shard_size"]
        self._shards: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_shards(self) -> int:
        return -(-len(self.paths) // self.shard_size)

    def shard_path(self, k: int) -> Path:
        return self.folder / f"shard_{k:05d}.pt"

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.n_shards)
                if not (self.shard_path(k).is_file() and self.shard_path(k).with_suffix(".json").is_file())]

    def shard(self, k: int) -> dict:
        if k not in self._shards:
            import torch
            try:
                self._shards[k] = torch.load(self.shard_path(k), mmap=True, weights_only=True)
            except FileNotFoundError as e:
                raise UserError(f"{self.shard_path(k)}: cache shard missing; rerun dataset.py to finish the cache") from e
            except Exception as e:
                raise UserError(f"{self.shard_path(k)}: corrupt cache shard ({e}); delete it and rerun dataset.py") from e
        return self._shards[k]

    def status(self) -> tuple[np.ndarray, list[str]]:
        """ok (N,) bool and the error text of each slot ('' when ok); reads no pixels."""
        ok, errors = [], []
        for k in range(self.n_shards):
            s = _read_status(self, k)
            ok += s["ok"]
            errors += s["errors"]
        return np.array(ok, dtype=bool), errors

    def get(self, slots) -> "torch.Tensor":
        """uint8 (B, 1, S, S) for the given slot numbers."""
        import torch
        slots = np.asarray(slots, dtype=np.int64)
        out = torch.empty((len(slots), 1, self.size, self.size), dtype=torch.uint8)
        shard_of = slots // self.shard_size
        for k in np.unique(shard_of):
            sel = np.nonzero(shard_of == k)[0]
            out[torch.from_numpy(sel), 0] = self.shard(int(k))["images"][torch.from_numpy(slots[sel] % self.shard_size)]
        return out


def cache_folder(cache_dir: Path, name: str, data_root: Path, paths: list[str], size: int,
                 square: str, shard_size: int = SHARD_SIZE) -> tuple[Path, dict]:
    """The cache folder for these inputs, and the meta that keys it (shard_size is recorded, not keyed)."""
    jpeg_only = all(p.lower().endswith((".jpg", ".jpeg")) for p in paths)
    meta = {"version": JPEG_CACHE_VERSION if jpeg_only else CACHE_VERSION, "data_root": str(Path(data_root).resolve()), "size": int(size),
            "square": square, "paths": list(paths)}
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{name}-{size}px-{key}", {**meta, "shard_size": int(shard_size)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BuildLock:
    """This process's claim, by lock file, to build what other processes wait for (see claim_build).
    touch() as the work goes on (a heartbeat); release() (or leaving a `with`) removes the file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def touch(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self) -> None:
        if _lock_owner(self.path) == _lock_text():  # not a lock that another process has taken over since
            _discard(self.path)

    def __enter__(self) -> "BuildLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_text() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def _lock_owner(path: Path) -> str | None:
    """'HOST PID' from a lock file; None when there is none (or it is not written yet)."""
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def _lock_stale(path: Path) -> bool:
    """A lock whose builder is gone: a dead process on this host, or no heartbeat for LOCK_STALE_S
    (the builder hung, or its host died: another host's pid cannot be checked)."""
    owner = _lock_owner(path)
    try:
        age = time.time() - Path(path).stat().st_mtime
    except OSError:
        return False  # released meanwhile
    host, _, pid = (owner or "").partition(" ")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return True
    return age > LOCK_STALE_S


def claim_build(lock: Path, done: Callable[[], bool], what: str) -> BuildLock | None:
    """For work that several processes need at once (torchrun's ranks, the nodes of a job, array
    tasks): returns None once done() holds, or a BuildLock when this process is to do the work.

    A process that finds the work undone tries to create `lock` (O_CREAT | O_EXCL: exactly one
    wins, on one host or on many sharing the folder); the others wait on the files, polling with
    no timeout, never inside a torch.distributed collective (whose timeout a long build outlasts).
    A dead builder's lock is taken over (see _lock_stale). Correctness never rests on the lock:
    every file is written atomically, so a second builder could only waste time."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while not done():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_stale(lock):
                print(f"taking over {what} from {_lock_owner(lock)}, which is gone", file=sys.stderr, flush=True)
                _discard(lock)
                continue
            if not told:
                print(f"waiting for {what}, being built by {_lock_owner(lock) or 'another process'}",
                      file=sys.stderr, flush=True)
                told = True
            while lock.exists() and not _lock_stale(lock):
                time.sleep(LOCK_POLL_S)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_lock_text() + "\n")
        return BuildLock(lock)
    return None


def _remove_stale_tmp(folder: Path) -> None:
    """Remove the temporary files that killed writers on this host left in folder (see atomic_write).
    Another host's are left alone: its process may still be writing (shared cluster filesystem)."""
    host = socket.gethostname()
    for f in Path(folder).glob(".*.tmp-*"):
        h, _, pid = f.name.rsplit(".tmp-", 1)[1].rpartition("-")
        if h == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            _discard(f)


def _write_shards(cache: ImageCache, chunks, n_images: int, desc: str, progress: bool,
                  tick: Callable[[], None] = lambda: None) -> None:
    """Assemble ordered (start, images, ok, errors) chunks into shards; save each one as it fills.
    tick() after every chunk (the build lock's heartbeat)."""
    import torch
    buf: dict[int, list] = {}
    with tqdm(total=n_images, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start, images, ok, errors in chunks:
            tick()
            k = start // cache.shard_size
            buf.setdefault(k, []).append((images, ok, errors))
            bar.update(len(ok))
            n_k = min(cache.shard_size, len(cache) - k * cache.shard_size)
            if sum(len(o) for _, o, _ in buf[k]) == n_k:
                parts = buf.pop(k)
                status = {"ok": [bool(o) for p in parts for o in p[1]], "errors": [e for p in parts for e in p[2]]}
                _save_shard(cache, k, torch.from_numpy(np.concatenate([p[0] for p in parts])), status)


def _save_shard(cache: ImageCache, k: int, images, status: dict) -> None:
    """Status first, pixels second: a shard whose .pt exists is complete, with its status."""
    write_text(cache.shard_path(k).with_suffix(".json"), json.dumps(status))
    save_torch({"images": images}, cache.shard_path(k))


def build_cache(paths: list[str], data_root: Path, size: int, cache_dir: Path, name: str = "images",
                square: str = "resize", workers: int | None = None, progress: bool = True,
                chunk: int = 8, shard_size: int | None = None) -> ImageCache:
    """Build, or finish, the cache of `paths` (relative to data_root). Returns it complete.

    Only the shards that are missing are decoded, in parallel over `workers` processes; a killed
    build therefore keeps every shard it finished. Nothing is written under data_root. shard_size
    (images per shard file, default SHARD_SIZE) applies to a new cache; an existing one keeps its own.
    A complete shard with an image that failed before (missing, unreadable) but decodes now is redone."""
    if size < 8:
        raise UserError(f"--image-size must be at least 8, got {size}")
    if square not in SQUARE_MODES:
        raise UserError(f"unknown square mode {square!r} (choose from {', '.join(SQUARE_MODES)})")
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    data_root = Path(data_root)
    folder, meta = cache_folder(cache_dir, name, data_root, paths, size, square, shard_size or SHARD_SIZE)
    _refuse_inside(folder, data_root)
    if not (folder / "meta.json").is_file():
        write_text(folder / "meta.json", json.dumps(meta))
    cache = ImageCache(folder)
    claim = claim_build(folder / "build.lock", lambda: not _todo(cache, data_root), f"the image cache {folder}")
    if claim is None:  # complete, or completed meanwhile by another process
        return cache
    with claim:
        _build_shards(cache, _todo(cache, data_root), data_root, workers, chunk, f"caching {name} at {size}px",
                      progress, claim.touch)
    return cache


def _todo(cache: ImageCache, data_root: Path) -> list[int]:
    """The shards to (re)build: missing ones, and complete ones with an image that decodes now."""
    todo = cache.missing_shards()
    return todo + _recovered_shards(cache, data_root, skip=todo)


def _build_shards(cache: ImageCache, todo: list[int], data_root: Path, workers: int | None, chunk: int, desc: str,
                  progress: bool, tick: Callable[[], None]) -> None:
    """Decode the images of shards `todo` over `workers` processes and save each shard as it fills."""
    if not todo:
        return
    paths, size, square = cache.paths, cache.size, cache.square
    _remove_stale_tmp(cache.folder)
    tasks = []
    for k in todo:
        lo, hi = k * cache.shard_size, min((k + 1) * cache.shard_size, len(paths))
        for s in range(lo, hi, chunk):
            tasks.append((s, [data_root / p for p in paths[s:min(s + chunk, hi)]], size, square))
    n_images = sum(len(t[1]) for t in tasks)
    workers = max(1, min(workers or default_workers(), len(tasks)))
    if workers == 1:
        _write_shards(cache, map(_decode_chunk, tasks), n_images, desc, progress, tick)
    else:
        import multiprocessing as mp
        # fork: workers start at once and need nothing pickled but the task (paths, size).
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(workers) as pool:
            _write_shards(cache, pool.imap(_decode_chunk, tasks), n_images, desc, progress, tick)


def _read_status(cache: ImageCache, k: int) -> dict:
    return json.loads(cache.shard_path(k).with_suffix(".json").read_text())


def _recovered_shards(cache: ImageCache, data_root: Path, skip: list[int]) -> list[int]:
    """Complete shards holding an image that failed before but decodes now (a missing file copied
    in, a broken one replaced): they are redone, so fixing the data needs no cache surgery. Only the
    failed images are tried, so a rerun on a complete cache stays quick."""
    redo = []
    for k in range(cache.n_shards):
        if k in skip:
            continue
        for j, ok in enumerate(_read_status(cache, k)["ok"]):
            path = Path(data_root) / cache.paths[k * cache.shard_size + j]
            if not ok and path.is_file():
                try:
                    load_image(path, cache.size, cache.square)
                except Exception:
                    continue
                redo.append(k)
                break
    return redo


def derive_cache(base: ImageCache, name: str, transform: Callable, progress: bool = True) -> ImageCache:
    """Build, or finish, an augmented copy of `base`: slot i is transform(base slot i).
    `transform` maps uint8 (n, S, S) -> uint8 (n, S, S). It lives beside base as <folder>+<name>."""
    import torch
    folder = base.folder.with_name(f"{base.folder.name}+{name}")
    if not (folder / "meta.json").is_file():
        write_text(folder / "meta.json", json.dumps({**base.meta, "transform": name, "base": base.folder.name}))
    cache = ImageCache(folder)
    todo = cache.missing_shards()
    # a base shard redone since (an image that failed before reads now) is redone here too
    todo += [k for k in range(cache.n_shards) if k not in todo
             and _read_status(cache, k) != _read_status(base, k)]
    if todo:
        _remove_stale_tmp(folder)
    for k in tqdm(todo, desc=f"building {name} copies", unit="shard", disable=not progress):
        images = transform(base.shard(k)["images"].clone()).to(torch.uint8).contiguous()
        status = json.loads(base.shard_path(k).with_suffix(".json").read_text())
        _save_shard(cache, k, images, status)
    return cache


def find_augmented(base: ImageCache, name: str) -> ImageCache:
    """The built augmented copy 'name' of base ('flip', 'contrast' or an exact 'contrast1.5')."""
    exact = base.folder.with_name(f"{base.folder.name}+{name}")
    found = [exact] if exact.is_dir() else sorted(base.folder.parent.glob(f"{base.folder.name}+{name}*"))
    if len(found) > 1:
        raise UserError(f"several '{name}' copies are built ({', '.join(f.name.split('+')[-1] for f in found)}); "
                        f"name one exactly, e.g. --augmented {found[0].name.split('+')[-1]}")
    if not found or ImageCache(found[0]).missing_shards():
        raise UserError(f"augmented copy '{name}' is not built for {base.folder}; run "
                        f"python experiments/{name.rstrip('0123456789.')}_images.py with the same "
                        f"--data-root, --csv, --image-size and --cache-dir")
    return ImageCache(found[0])


def _refuse_inside(folder: Path, data_root: Path) -> None:
    f, r = Path(folder).resolve(), Path(data_root).resolve()
    if f == r or r in f.parents:
        raise UserError(f"--cache-dir {folder.parent} is inside the data root {data_root}; "
                        f"nothing is ever written there: choose another --cache-dir")


def attach_cache(df: pd.DataFrame, cache: ImageCache, on_bad: str = "drop", what: str = "image") -> pd.DataFrame:
    """Add the 'slot' column (row -> cache slot). Rows whose image was missing or unreadable are
    dropped with one warning (count and first paths), or, with on_bad='error', are an error."""
    slot_of = {p: i for i, p in enumerate(cache.paths)}
    df = df.copy()
    df["slot"] = df["path"].map(slot_of).astype(np.int64)
    ok, errors = cache.status()
    bad = ~ok[df["slot"].to_numpy()]
    if bad.any():
        first = [f"{p} ({errors[s]})" for p, s in zip(df["path"][bad][:N_NAMED], df["slot"][bad][:N_NAMED])]
        if on_bad == "error":
            raise UserError(f"{int(bad.sum())} {what}(s) missing or unreadable under {cache.meta['data_root']}: "
                            + "; ".join(first))
        warnings.warn(f"dropped {int(bad.sum())} rows whose image is missing or unreadable: "
                      + "; ".join(first) + (" ..." if bad.sum() > N_NAMED else ""), stacklevel=2)
    df = df[~bad].reset_index(drop=True)
    df.attrs["n_bad_images"] = int(bad.sum())
    return df


def cached_table(df: pd.DataFrame, data_root: Path, size: int, cache_dir: Path, name: str,
                 square: str = "resize", workers: int | None = None, on_bad: str = "drop",
                 progress: bool = True) -> tuple[pd.DataFrame, ImageCache]:
    """Cache the images of a table read by read_train_csv/read_test_csv; return (table with 'slot', cache)."""
    attrs = dict(df.attrs)
    paths = list(dict.fromkeys(df["path"]))
    cache = build_cache(paths, data_root, size, cache_dir, name, square, workers, progress)
    out = attach_cache(df, cache, on_bad)
    out.attrs = {**attrs, **out.attrs}
    return out, cache


