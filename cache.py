"""The grayscale uint8 image cache: shards, their checks and recovery, augmented copies (one process
builds, the others wait: buildlock.py). Decoding (JPEG, PNG, 16-bit PNG/TIFF, DICOM; --equalize) is decode.py's.

Cache layout (never under the data root): CACHE_DIR/<csv stem>-<size>px-<key>/
    meta.json          the key's inputs (image paths in slot order, data root, size, square mode,
                       equalization) and the shard size; created exclusively, always read back
    shard_00000.pt     {"images": uint8 (n, S, S)}, shard_size images each (default 1024), loaded
                       with torch.load(mmap=True); written to a temporary name and renamed
    shard_00000.json   its status, written just before it: per image "ok", "errors" and "stat"
                       ([size, mtime_ns] of the file decoded, null when none); "sha1" of the pixels
The key (cache_key) hashes what changes pixels, not the shard size: a cache built with any shard
size is found by every script. File contents are covered per shard by their stats (one stat per
image and run): a shard whose files changed since (an image replaced in place, restored, removed)
is rebuilt, and so is one that is damaged or does not fit the meta; a meta.json that is damaged or
holds another cache's inputs is rewritten first. Augmented copies (experiments/) live beside it as
<folder>+<name>; each copy shard records the sha1 of the base shard it was made from ("base_sha1"),
so a base shard rebuilt since makes it out of date. A build killed mid-write leaves a
'.NAME.tmp-HOST-PID' file; the next build on that host removes it once that process is gone.

torch is imported inside the functions that need it (see common.py).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import sys
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from buildlock import claim_build, pid_alive
from common import (EQUALIZE_MODES, MAX_IMAGE_SIZE, SQUARE_MODES, UserError, _discard, default_workers, save_torch,
                    test_hook, write_text)
# decoding lives in decode.py; its names are also imported from here by the scripts and tests
from decode import CLAHE_CLIP, CLAHE_TILES, ImageError, decode_dicom, equalize_image, load_image, to_uint8  # noqa: F401

CACHE_VERSION = 2  # 2: 16-bit PNG/TIFF rescaled by to_uint8 (version 1 clipped them at 255), DICOM read
JPEG_CACHE_VERSION = 1  # JPEG pixels are unchanged since version 1: a cache of JPEGs only keeps its key
SHARD_SIZE = 1024
N_NAMED = 10  # bad images named in a warning; the count covers them all
STAT_THREADS = 8  # shards checked at once: os.stat releases the GIL, so a network filesystem's round trips overlap
# each --equalize setting as keyed, with its parameters: changing them makes a new cache
EQUALIZE_KEYS = {"hist": "hist", "clahe": f"clahe-clip{CLAHE_CLIP}-tiles{CLAHE_TILES}"}
KEY_FIELDS = ("version", "data_root", "size", "square", "paths")  # with 'equalize' when it is not 'none'


def file_stat(path: Path) -> list[int] | None:
    """[size, mtime_ns] of the file at path (links followed): what the cache records of each image to
    notice a file replaced, restored or removed under the same name. None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a path with a NUL byte
        return None
    return [st.st_size, st.st_mtime_ns]


def _decode_chunk(task):
    """Worker: decode one chunk. Returns (start, uint8 (n, S, S), ok (n,), errors [str], stats [file_stat])."""
    start, paths, size, square, equalize = task
    time.sleep(test_hook("CXR_TEST_DECODE_DELAY") or 0.0)
    images = np.zeros((len(paths), size, size), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    errors = [""] * len(paths)
    stats = [file_stat(p) for p in paths]  # before reading: a file replaced meanwhile shows as changed next time
    for i, p in enumerate(paths):
        try:
            images[i] = load_image(p, size, square, equalize)
            ok[i] = True
        except FileNotFoundError:
            errors[i] = "missing"
        except ImageError as e:  # says what is wrong in a few words: not a regular file, DICOM without pixel data, ...
            errors[i] = f"unreadable ({e})"
        except Exception as e:  # truncated JPEG, random bytes, empty file, not an image
            errors[i] = f"unreadable ({type(e).__name__}: {e})"[:200]
    return start, images, ok, errors, stats


class ImageCache:
    """A built image cache: get(slots) -> uint8 (B, 1, S, S). Shards load lazily, memory-mapped, so
    a DataLoader worker or another rank shares the OS page cache rather than a copy. The folder's
    meta.json is read from disk and checked against the key in the folder's name (read_meta)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta, problem = read_meta(self.folder)
        if problem:
            raise UserError(f"{self.folder / 'meta.json'}: {problem}; rerun the command that built it (dataset.py, "
                            f"or the experiments/ script of a +copy) with the same flags: it rewrites the index and "
                            f"rebuilds what does not fit it")
        self.meta = meta
        self.paths: list[str] = meta["paths"]
        self.size: int = meta["size"]
        self.square: str = meta["square"]
        self.equalize: str = meta.get("equalize", "none")
        self.shard_size: int = meta["shard_size"]
        self._shards: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_shards(self) -> int:
        return -(-len(self.paths) // self.shard_size)

    def shard_len(self, k: int) -> int:
        """Images in shard k: shard_size, fewer in the last."""
        return min(self.shard_size, len(self.paths) - k * self.shard_size)

    def shard_path(self, k: int) -> Path:
        return self.folder / f"shard_{k:05d}.pt"

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.n_shards)
                if not (self.shard_path(k).is_file() and self.shard_path(k).with_suffix(".json").is_file())]

    def shard(self, k: int) -> dict:
        """Shard k, {"images": uint8 (n, S, S)}, memory-mapped; a UserError when it is not that."""
        if k not in self._shards:
            import torch
            path = self.shard_path(k)
            try:
                loaded = torch.load(path, mmap=True, weights_only=True)
            except FileNotFoundError as e:
                raise UserError(f"{path}: cache shard missing; rerun dataset.py to finish the cache") from e
            except Exception as e:
                raise UserError(f"{path}: corrupt cache shard ({e}); rerun the command that built the cache with the "
                                f"same flags (it rebuilds the shard)") from e
            images = loaded.get("images") if isinstance(loaded, dict) else None
            want = (self.shard_len(k), self.size, self.size)
            if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and tuple(images.shape) == want):
                got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(loaded).__name__
                raise UserError(f"{path}: cache shard holds {got}, not uint8 {want}: it belongs to another cache; "
                                f"rerun the command that built it with the same flags (it rebuilds the shard)")
            self._shards[k] = loaded
        return self._shards[k]

    def status(self) -> tuple[np.ndarray, list[str]]:
        """ok (N,) bool and the error text of each slot ('' when ok); reads no pixels."""
        ok, errors = [], []
        for k in range(self.n_shards):
            s = _read_status(self, k)
            if s is None:
                raise UserError(f"{self.shard_path(k).with_suffix('.json')}: unreadable cache status; rerun the command "
                                f"that built the cache with the same flags (it rebuilds the shard)")
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


def cache_key(meta: dict) -> str:
    """The 12 hex digits that name a cache folder: a hash of what changes pixels (KEY_FIELDS: the
    decoder's version, CACHE_VERSION or JPEG_CACHE_VERSION for JPEGs only, the data root, size,
    square mode, ordered paths; and the equalization unless 'none': older caches keep their key)."""
    keyed = {k: meta[k] for k in KEY_FIELDS}
    if meta.get("equalize", "none") != "none":
        keyed["equalize"] = EQUALIZE_KEYS[meta["equalize"]]
    return hashlib.sha1(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def cache_folder(cache_dir: Path, name: str, data_root: Path, paths: list[str], size: int, square: str,
                 shard_size: int = SHARD_SIZE, equalize: str = "none") -> tuple[Path, dict]:
    """The cache folder for these inputs, and the meta that keys it (shard_size is recorded, not keyed)."""
    jpeg_only = all(p.lower().endswith((".jpg", ".jpeg")) for p in paths)
    meta = {"version": JPEG_CACHE_VERSION if jpeg_only else CACHE_VERSION, "data_root": str(Path(data_root).resolve()),
            "size": int(size), "square": square, "paths": list(paths), "equalize": equalize,
            "shard_size": int(shard_size)}
    return Path(cache_dir) / f"{name}-{size}px-{cache_key(meta)}", meta


def read_meta(folder: Path, want: dict | None = None) -> tuple[dict | None, str | None]:
    """(meta.json of folder, None), or (None, what is wrong with it): unreadable, a field missing or
    of the wrong type, or inputs other than those its folder's name (or `want`, when given) is keyed
    by: another cache copied in. A copy's (+name) meta must also name its base and shard size."""
    path = Path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable cache index ({e})"
    types = {"version": int, "data_root": str, "size": int, "square": str, "paths": list, "shard_size": int}
    bad = [k for k, t in types.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), t)]
    if bad:
        return None, f"cache index without a valid {', '.join(bad)}"
    if not (all(isinstance(p, str) for p in meta["paths"]) and meta["square"] in SQUARE_MODES and meta["shard_size"] >= 1
            and 8 <= meta["size"] <= MAX_IMAGE_SIZE and meta.get("equalize", "none") in EQUALIZE_MODES):
        return None, "cache index with an impossible value (paths, square, shard_size, size or equalize)"
    if want is not None:
        fields = [*KEY_FIELDS, "equalize"] + (["transform", "base", "shard_size"] if "base" in want else [])
        field = lambda d, k: d.get(k, "none") if k == "equalize" else d.get(k)  # noqa: E731 (absent: before --equalize)
        differ = [k for k in fields if field(meta, k) != field(want, k)]
        if differ:
            return None, "holds a cache of other inputs: " + ", ".join(
                f"{k} {_brief(field(meta, k))}, not {_brief(field(want, k))}" for k in differ)
    elif not str(meta.get("base", Path(folder).name)).endswith(f"-{meta['size']}px-{cache_key(meta)}") or (
            "base" in meta and Path(folder).name != f"{meta['base']}+{meta.get('transform')}"):
        return None, "holds a cache of other inputs than its folder's name says (copied in from another cache?)"
    return meta, None


def _brief(v) -> str:
    return f"{len(v)} paths" if isinstance(v, list) else repr(v)


def _create_exclusive(path: Path, text: str) -> None:
    """Create `path` holding `text` unless it exists; never replace it. The text is written whole to a
    temporary file, then hard-linked to `path`: os.link fails when `path` exists, so of two processes
    (on one host or several sharing the folder) exactly one creates it, and both read that one back.
    On a filesystem without hard links (some FUSE mounts) the build lock decides instead."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            return
        except OSError:
            pass
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}") from e
    finally:
        _discard(tmp)
    claim = claim_build(path.with_name("build.lock"), path.exists, f"the creation of {path}")
    if claim is not None:
        with claim:
            write_text(path, text)


def _open_cache(folder: Path, want: dict) -> ImageCache:
    """The cache in folder, holding `want`'s inputs: meta.json created exclusively when missing, or
    rewritten (under the build lock, saying why) when it is damaged or holds another cache; the
    shards that do not fit it are then found by the shard checks and rebuilt. Read back from disk."""
    path = folder / "meta.json"
    if not path.exists():
        _create_exclusive(path, json.dumps(want))
    if read_meta(folder, want)[1] is not None:
        claim = claim_build(folder / "build.lock", lambda: read_meta(folder, want)[1] is None, f"the repair of {path}")
        if claim is not None:
            with claim:
                print(f"{path}: {read_meta(folder, want)[1]}; rewritten, and every shard checked against it",
                      file=sys.stderr, flush=True)
                write_text(path, json.dumps(want))
    return ImageCache(folder)


def _remove_stale_tmp(folder: Path) -> None:
    """Remove the temporary files that killed writers on this host left in folder (see atomic_write).
    Another host's are left alone: its process may still be writing (shared cluster filesystem)."""
    host = socket.gethostname()
    for f in Path(folder).glob(".*.tmp-*"):
        h, _, pid = f.name.rsplit(".tmp-", 1)[1].rpartition("-")
        if h == host and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            _discard(f)


# ---------------------------------------------------------------------------------------------
# Building, checking and rebuilding shards

def _write_shards(cache: ImageCache, chunks, n_images: int, desc: str, progress: bool,
                  tick: Callable[[], None] = lambda: None) -> None:
    """Assemble ordered (start, images, ok, errors, stats) chunks into shards; save each one as it
    fills. tick() after every chunk (the build lock's heartbeat)."""
    import torch
    buf: dict[int, list] = {}
    with tqdm(total=n_images, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start, *chunk in chunks:
            tick()
            k = start // cache.shard_size
            buf.setdefault(k, []).append(chunk)
            bar.update(len(chunk[1]))
            if sum(len(c[1]) for c in buf[k]) == cache.shard_len(k):
                parts = buf.pop(k)
                status = {"ok": [bool(o) for p in parts for o in p[1]], "errors": [e for p in parts for e in p[2]],
                          "stat": [s for p in parts for s in p[3]]}
                _save_shard(cache, k, torch.from_numpy(np.concatenate([p[0] for p in parts])), status)


def _save_shard(cache: ImageCache, k: int, images, status: dict) -> None:
    """Status first (with the sha1 of the pixels), pixels second: a shard whose .pt exists is
    complete, with its status. images: uint8 (n, S, S), saved as a tensor of exactly that storage."""
    images = images.contiguous()
    if images.untyped_storage().nbytes() != images.numel():  # a view saves its whole storage: _stored_bytes differs
        images = images.clone()
    status = {**status, "sha1": hashlib.sha1(images.numpy().data).hexdigest()}
    write_text(cache.shard_path(k).with_suffix(".json"), json.dumps(status))
    save_torch({"images": images}, cache.shard_path(k))


def _read_status(cache: ImageCache, k: int) -> dict | None:
    """Shard k's status, or None when it is missing, unreadable or does not fit the shard (lists
    of another length: a truncated file, or one of another cache)."""
    try:
        s = json.loads(cache.shard_path(k).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    n = cache.shard_len(k)
    fits = isinstance(s, dict) and all(isinstance(s.get(f), list) and len(s[f]) == n for f in ("ok", "errors"))
    if not fits or ("stat" in s and not (isinstance(s["stat"], list) and len(s["stat"]) == n)):
        return None
    return s


def _stored_bytes(path: Path) -> int | None:
    """Bytes of tensor data in a shard file, read from its zip directory (torch.save writes a zip
    whose tensor storages are the entries '<name>/data/<i>', uncompressed): the shard's shape is
    checked without importing torch or reading pixels. None when it is not such a file."""
    try:
        with zipfile.ZipFile(path) as z:
            return sum(i.file_size for i in z.infolist() if i.filename.split("/")[-2:-1] == ["data"])
    except (OSError, zipfile.BadZipFile, ValueError):
        return None


def _shard_problem(cache: ImageCache, k: int, data_root: Path) -> str | None:
    """Why shard k must be (re)built, or None when it holds the pixels of its files as they are now:
    'missing' (not finished), 'damaged' (status unreadable, or pixels of another shape or size),
    'older' (built before file stats were recorded), 'changed: PATH' (a file replaced, restored or
    removed since: its size or mtime differs), 'readable: PATH' (an image that failed before, and
    whose file is unchanged, decodes now: a transient read error). One stat per image."""
    problem, status = _stored_problem(cache, k)
    if problem:
        return problem
    if "stat" not in status:
        return "older"
    paths = cache.paths[k * cache.shard_size:k * cache.shard_size + cache.shard_len(k)]
    now = [file_stat(data_root / p) for p in paths]
    changed = next((p for p, was, st in zip(paths, status["stat"], now) if was != st), None)
    if changed is not None:
        return f"changed: {changed}"
    for p, ok, st in zip(paths, status["ok"], now):
        if not ok and st is not None:
            try:
                load_image(data_root / p, cache.size, cache.square, cache.equalize)
            except Exception:
                continue
            return f"readable: {p}"
    return None


def _problems(check: Callable[[int], str | None], n_shards: int) -> dict[int, str]:
    """{shard: why it must be rebuilt} over all shards, STAT_THREADS shards at a time."""
    with ThreadPoolExecutor(max(1, min(STAT_THREADS, n_shards))) as pool:
        return {k: why for k, why in enumerate(pool.map(check, range(n_shards))) if why}


WHY = {"missing": "unfinished", "damaged": "damaged (unreadable, or of another shape)",
       "older": "built before file stats were recorded", "changed": "whose files changed since",
       "readable": "with an image that reads now", "base": "made from base pixels rebuilt since"}


def _report(folder: Path, todo: dict[int, str], n_shards: int) -> None:
    """One line on stderr when shards are rebuilt for any reason but never having been finished."""
    kinds: dict[str, list[str]] = {}
    for why in todo.values():
        kinds.setdefault(why.split(":")[0], []).append(why)
    if set(kinds) <= {"missing"}:
        return
    parts = [f"{len(v)} {WHY[kind]}" + (f" (e.g. {v[0].split(': ', 1)[1]})" if ": " in v[0] else "")
             for kind, v in kinds.items()]
    print(f"rebuilding {len(todo)} of {n_shards} shards of {folder}: {'; '.join(parts)}", file=sys.stderr, flush=True)


def build_cache(paths: list[str], data_root: Path, size: int, cache_dir: Path, name: str = "images",
                square: str = "resize", workers: int | None = None, progress: bool = True,
                chunk: int = 8, shard_size: int | None = None, equalize: str = "none") -> ImageCache:
    """Build, or finish, the cache of `paths` (relative to data_root). Returns it complete.

    Only the shards that need it are decoded (see _shard_problem: missing, damaged, files changed),
    in parallel over `workers` processes; a killed build therefore keeps every shard it finished.
    Nothing is written under data_root. shard_size (images per shard file, default SHARD_SIZE)
    applies to a new cache; an existing one keeps its own. equalize: see equalize_image."""
    if size < 8 or size > MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be {'at least 8' if size < 8 else f'at most {MAX_IMAGE_SIZE}'}, got {size}")
    if square not in SQUARE_MODES:
        raise UserError(f"unknown square mode {square!r} (choose from {', '.join(SQUARE_MODES)})")
    if equalize not in EQUALIZE_MODES:
        raise UserError(f"unknown --equalize {equalize!r} (choose from {', '.join(EQUALIZE_MODES)})")
    if equalize == "clahe" and importlib.util.find_spec("cv2") is None:
        raise UserError("--equalize clahe needs OpenCV: pip install opencv-python-headless (see requirements.txt)")
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    data_root = Path(data_root)
    folder, want = cache_folder(cache_dir, name, data_root, paths, size, square, shard_size or SHARD_SIZE, equalize)
    _refuse_inside(folder, data_root)
    cache = _open_cache(folder, want)
    check = lambda k: _shard_problem(cache, k, data_root)  # noqa: E731
    claim = claim_build(folder / "build.lock", lambda: not _problems(check, cache.n_shards), f"the image cache {folder}")
    if claim is None:  # complete, or completed meanwhile by another process
        return cache
    with claim:
        todo = _problems(check, cache.n_shards)
        _report(folder, todo, cache.n_shards)
        _build_shards(cache, sorted(todo), data_root, workers, chunk, f"caching {name} at {size}px", progress, claim.touch)
    return cache


def _build_shards(cache: ImageCache, todo: list[int], data_root: Path, workers: int | None, chunk: int, desc: str,
                  progress: bool, tick: Callable[[], None]) -> None:
    """Decode the images of shards `todo` over `workers` processes and save each shard as it fills."""
    if not todo:
        return
    _remove_stale_tmp(cache.folder)
    tasks = []
    for k in todo:
        lo, hi = k * cache.shard_size, k * cache.shard_size + cache.shard_len(k)
        for s in range(lo, hi, chunk):
            tasks.append((s, [data_root / p for p in cache.paths[s:min(s + chunk, hi)]], cache.size, cache.square,
                          cache.equalize))
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


# ---------------------------------------------------------------------------------------------
# Augmented copies

def _stored_problem(cache: ImageCache, k: int) -> tuple[str | None, dict | None]:
    """('missing' | 'damaged', None), or (None, its status) when shard k's two files are there,
    readable, and hold pixels of the shard's shape (a base cache's shard or a copy's)."""
    pt = cache.shard_path(k)
    if not (pt.is_file() and pt.with_suffix(".json").is_file()):
        return "missing", None
    status = _read_status(cache, k)
    if status is None or _stored_bytes(pt) != cache.shard_len(k) * cache.size ** 2:
        return "damaged", None
    return None, status


def _copy_problem(copy: ImageCache, base: ImageCache, k: int) -> str | None:
    """Why shard k of an augmented copy must be (re)made from its base: 'missing', 'damaged', or
    'base' (the base shard it was made from has been rebuilt since: its sha1 is not the recorded one)."""
    problem, status = _stored_problem(copy, k)
    if problem:
        return problem
    made_from = (_read_status(base, k) or {}).get("sha1")
    return None if made_from and status.get("base_sha1") == made_from else "base"


def _copy_todo(copy: ImageCache, base: ImageCache) -> dict[int, str]:
    """{shard: why} of a copy against its base; every shard when their layouts differ."""
    if (copy.shard_size, len(copy), copy.size) != (base.shard_size, len(base), base.size):
        return dict.fromkeys(range(copy.n_shards), "base")
    return _problems(lambda k: _copy_problem(copy, base, k), copy.n_shards)


def derive_cache(base: ImageCache, name: str, transform: Callable, progress: bool = True) -> ImageCache:
    """Build, or finish, an augmented copy of `base`: slot i is transform(base slot i).
    `transform` maps uint8 (n, S, S) -> uint8 (n, S, S). It lives beside base as <folder>+<name>;
    a shard whose base shard was rebuilt since (a file replaced or restored) is made again."""
    import torch
    folder = base.folder.with_name(f"{base.folder.name}+{name}")
    copy = _open_cache(folder, {**base.meta, "transform": name, "base": base.folder.name})
    claim = claim_build(folder / "build.lock", lambda: not _copy_todo(copy, base), f"the {name} copies {folder}")
    if claim is None:
        return copy
    with claim:
        todo = _copy_todo(copy, base)
        _report(folder, todo, copy.n_shards)
        _remove_stale_tmp(folder)
        for k in tqdm(sorted(todo), desc=f"building {name} copies", unit="shard", disable=not progress):
            claim.touch()
            status = _read_status(base, k)
            images = transform(base.shard(k)["images"].clone()).to(torch.uint8)
            _save_shard(copy, k, images, {**status, "base_sha1": status.get("sha1")})
    return copy


def find_augmented(base: ImageCache, name: str) -> ImageCache:
    """The built augmented copy 'name' of base ('flip', 'contrast' or an exact 'contrast1.5'); a
    UserError naming the script to run when it is not built, or out of date with its base."""
    exact = base.folder.with_name(f"{base.folder.name}+{name}")
    found = [exact] if exact.is_dir() else sorted(base.folder.parent.glob(f"{base.folder.name}+{name}*"))
    if len(found) > 1:
        raise UserError(f"several '{name}' copies are built ({', '.join(f.name.split('+')[-1] for f in found)}); "
                        f"name one exactly, e.g. --augmented {found[0].name.split('+')[-1]}")
    rerun = (f"python experiments/{name.rstrip('0123456789.')}_images.py with the same --data-root, --csv, "
             f"--image-size, --square, --equalize and --cache-dir")
    copy = ImageCache(found[0]) if found else None
    todo = _copy_todo(copy, base) if copy else {0: "missing"}
    if set(todo.values()) == {"missing"}:
        raise UserError(f"augmented copy '{name}' is not built for {base.folder}; run {rerun}")
    if todo:
        raise UserError(f"augmented copy '{name}' in {copy.folder} is out of date: {len(todo)} of its {copy.n_shards} "
                        f"shards were made from base pixels rebuilt since (an image replaced, restored or repaired) "
                        f"or are damaged; rerun {rerun}")
    return copy


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
                 progress: bool = True, equalize: str = "none") -> tuple[pd.DataFrame, ImageCache]:
    """Cache the images of a table read by read_train_csv/read_test_csv; return (table with 'slot', cache).
    equalize: --equalize (none, hist, clahe), part of the cache key (see build_cache)."""
    attrs = dict(df.attrs)
    paths = list(dict.fromkeys(df["path"]))
    cache = build_cache(paths, data_root, size, cache_dir, name, square, workers, progress, equalize=equalize)
    out = attach_cache(df, cache, on_bad)
    out.attrs = {**attrs, **out.attrs}
    return out, cache


