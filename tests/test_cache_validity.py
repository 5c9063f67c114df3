"""The image cache holds the pixels of the files as they are now, whatever happened to its folder:
an image replaced in place, removed or restored; augmented copies of a base that moved; two jobs
creating one cache with different shard sizes; build locks of owners that cannot be checked; a
cache folder copied over another, a meta.json of {}, a truncated status, a shard of another size."""
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import buildlock
import cache as cache_module
import dataset
import train
from cache import ImageCache, build_cache, cached_table, derive_cache, find_augmented, load_image
from common import UserError, run_cli
from experiments import flip_images
from tests.conftest import TINY


def copy_images(demo_root: Path, root: Path, n: int) -> list[str]:
    """The first n demo training JPEGs copied under root; their paths relative to it."""
    paths = sorted(str(p.relative_to(demo_root)) for p in (demo_root / "train").glob("*/*/*.jpg"))[:n]
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_root / p, root / p)
    return paths


def reference(root: Path, paths: list[str], size: int = 32) -> np.ndarray:
    """uint8 (n, size, size): each file decoded as it is now (zeros where it cannot be)."""
    out = np.zeros((len(paths), size, size), np.uint8)
    for i, p in enumerate(paths):
        if (root / p).is_file():
            out[i] = load_image(root / p, size)
    return out


def build(root, paths, cache_dir, size=32, **kw):
    return build_cache(paths, root, size, cache_dir, "t", workers=1, progress=False, shard_size=4, **kw)


def pixels(cache: ImageCache) -> np.ndarray:
    return cache.get(list(range(len(cache))))[:, 0].numpy()


def mtimes(cache: ImageCache) -> list[int]:
    return [cache.shard_path(k).stat().st_mtime_ns for k in range(cache.n_shards)]


# ---------------------------------------------------------------------------------------------
# 1. validity by content: each image's size and mtime are recorded with its shard

def test_an_image_replaced_in_place_gets_new_pixels(demo_root, tmp_path, capfd):
    root = tmp_path / "data"
    paths = copy_images(demo_root, root, 8)
    cache = build(root, paths, tmp_path / "cache")
    before, old = mtimes(cache), pixels(cache)
    shutil.copy(root / paths[7], root / paths[1])  # overwritten in place: same path, another picture
    again = build(root, paths, tmp_path / "cache")
    assert again.folder == cache.folder
    np.testing.assert_array_equal(pixels(again), reference(root, paths))
    assert not np.array_equal(pixels(again)[1], old[1])
    assert mtimes(again)[1] == before[1], "the shard whose files did not change is kept"
    err = capfd.readouterr().err
    assert f"rebuilding 1 of 2 shards of {cache.folder}: 1 whose files changed since (e.g. {paths[1]})" in err
    # a file of the same size with other pixels (an uncompressed BMP), its mtime moved: noticed too
    bmp = [f"train/pid1/study1/view{i}_frontal.bmp" for i in range(3)]
    for i, p in enumerate(bmp):
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 48), 50 * i, np.uint8)).save(root / p)
    first = build(root, bmp, tmp_path / "cache").get([0])[0, 0].numpy()
    size = (root / bmp[0]).stat().st_size
    Image.fromarray(np.full((40, 48), 200, np.uint8)).save(root / bmp[0])
    assert (root / bmp[0]).stat().st_size == size
    os.utime(root / bmp[0], ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    np.testing.assert_array_equal(build(root, bmp, tmp_path / "cache").get([0])[0, 0].numpy(), np.full((32, 32), 200))
    assert first.max() == 0  # what the first build held


def test_a_removed_image_is_dropped_and_a_restored_one_read(demo_root, tmp_path):
    root = tmp_path / "data"
    paths = copy_images(demo_root, root, 6)
    table = dataset.read_train_csv(demo_root / "student_labels" / "train2023.csv")
    table = table[table["path"].isin(paths)].reset_index(drop=True)
    cached_table(table, root, 32, tmp_path / "cache", "t", workers=1, progress=False)
    gone = paths[2]
    saved = (root / gone).read_bytes()
    (root / gone).unlink()
    with pytest.warns(UserWarning, match=f"dropped 1 rows whose image is missing or unreadable: {gone} \\(missing\\)"):
        kept, c = cached_table(table, root, 32, tmp_path / "cache", "t", workers=1, progress=False)
    assert gone not in set(kept["path"]) and c.status()[1][c.paths.index(gone)] == "missing"
    (root / gone).write_bytes(saved)
    kept, c = cached_table(table, root, 32, tmp_path / "cache", "t", workers=1, progress=False)
    assert len(kept) == len(table)
    np.testing.assert_array_equal(pixels(c), reference(root, c.paths))


def test_shards_from_before_file_stats_are_rebuilt_once(demo_root, tmp_path, capfd):
    paths = copy_images(demo_root, tmp_path / "data", 6)
    cache = build(tmp_path / "data", paths, tmp_path / "cache")
    status = cache.shard_path(0).with_suffix(".json")
    status.write_text(json.dumps({k: v for k, v in json.loads(status.read_text()).items() if k in ("ok", "errors")}))
    again = build(tmp_path / "data", paths, tmp_path / "cache")
    assert "1 built before file stats were recorded" in capfd.readouterr().err
    assert len(json.loads(status.read_text())["stat"]) == 4
    stamp = mtimes(again)
    assert mtimes(build(tmp_path / "data", paths, tmp_path / "cache")) == stamp  # once, not at every run


# ---------------------------------------------------------------------------------------------
# 2. augmented copies carry their base shard's status

def test_a_copy_made_before_an_image_was_restored_is_refused_then_remade(demo_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    csv = dataset.read_train_csv(root / "student_labels" / "train2023.csv")
    gone = next(p for p in csv["path"] if (root / p).is_file())
    saved = (root / gone).read_bytes()
    (root / gone).unlink()
    argv = ["--data-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--image-size", "32", "--workers", "1",
            "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flip_images.main(argv)
        (root / gone).write_bytes(saved)  # the missing image is restored: its base shard is rebuilt
        table, base = cached_table(csv, root, 32, tmp_path / "cache", "train2023", workers=1, progress=False)
        with pytest.raises(UserError, match=r"augmented copy 'flip' in .* is out of date: 1 of its 1 shards .*"
                                            r"rerun python experiments/flip_images\.py with the same"):
            find_augmented(base, "flip")
        # train.py (which calls find_augmented) stops in one line before training
        code = run_cli(train.main, ["--pathology", "Cardiomegaly", "--out-dir", str(tmp_path / "ckpt"), *TINY,
                                    "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
                                    "--augmented", "flip"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: augmented copy 'flip' in") and "experiments/flip_images.py" in err[-1]
    assert not list((tmp_path / "ckpt").rglob("*.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy = flip_images.main(argv)  # rerun as told: the copy of the rebuilt shard is remade
    found = find_augmented(base, "flip")
    assert found.folder == copy.folder
    slot = table.set_index("path")["slot"][gone]
    assert found.get([slot]).any() and torch.equal(found.get([slot]), base.get([slot]).flip(-1))


# ---------------------------------------------------------------------------------------------
# 3. meta.json created exclusively and read back; build locks know their owner

def _build_in_child(queue, root, paths, cache_dir, shard_size, delay):
    """One job: build the cache with its shard size, its meta.json written `delay` s after it found
    none; reports the shard size it used (its pixels are read by the parent: torch ops in a child
    forked from a process that ran OpenMP can hang), or its traceback."""
    try:
        def slow_dumps(obj, *a, **k):  # a meta.json's text is made `delay` s late
            if isinstance(obj, dict) and "paths" in obj and "shard_size" in obj:
                time.sleep(delay)
            return json.dumps(obj, *a, **k)
        cache_module.json = SimpleNamespace(loads=json.loads, dumps=slow_dumps)  # in this child process only
        cache = build_cache(paths, root, 32, cache_dir, "t", workers=1, progress=False, shard_size=shard_size)
        queue.put((cache.shard_size, cache.folder))
    except BaseException:
        queue.put(traceback.format_exc())


def test_two_jobs_with_different_shard_sizes_agree_on_one_meta(demo_root, tmp_path):
    root = tmp_path / "data"
    paths = copy_images(demo_root, root, 24)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    # both jobs find no meta.json at once; job 1 writes its own 0.3 s later, job 2 a second later
    procs = [ctx.Process(target=_build_in_child, args=(queue, root, paths, tmp_path / "cache", size, delay))
             for size, delay in ((4, 0.3), (8, 1.0))]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(isinstance(r, tuple) for r in results), results
    [folder] = (tmp_path / "cache").iterdir()
    on_disk = json.loads((folder / "meta.json").read_text())["shard_size"]
    assert results == [(on_disk, folder)] * 2, results  # both jobs used the winner's meta
    np.testing.assert_array_equal(pixels(ImageCache(folder)), reference(root, paths))  # every slot its own image
    shards = sorted(folder.glob("shard_*.pt"))
    assert len(shards) == -(-len(paths) // on_disk)
    assert all(torch.load(s, weights_only=True)["images"].shape[0] == on_disk for s in shards)
    assert not list(folder.glob(".*tmp*"))


def test_meta_json_is_made_where_hard_links_are_not_supported(demo_root, tmp_path, monkeypatch):
    def no_links(src, dst, *a, **k):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(cache_module.os, "link", no_links)
    paths = copy_images(demo_root, tmp_path / "data", 5)
    cache = build(tmp_path / "data", paths, tmp_path / "cache")
    assert cache.shard_size == 4 and json.loads((cache.folder / "meta.json").read_text())["paths"] == paths
    assert sorted(p.name for p in cache.folder.iterdir()) == ["meta.json", "shard_00000.json", "shard_00000.pt",
                                                              "shard_00001.json", "shard_00001.pt"]


def _lock(folder: Path, **owner) -> Path:
    me = buildlock.identity()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "build.lock").write_text(json.dumps({**me, "pid": int(dead.stdout), "token": "abc", **owner}) + "\n")
    return folder / "build.lock"


def test_a_lock_whose_owner_is_provably_gone_is_taken_over_at_once(demo_root, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(buildlock, "LOCK_STALE_S", 60)
    monkeypatch.setattr(buildlock, "LOCK_POLL_S", 0.05)
    paths = copy_images(demo_root, tmp_path / "data", 5)
    folder, _ = cache_module.cache_folder(tmp_path / "cache", "t", tmp_path / "data", paths, 32, "resize")
    folder.mkdir(parents=True)
    _lock(folder)  # this host, this boot, this PID namespace, a pid that has ended
    t0 = time.monotonic()
    cache = build(tmp_path / "data", paths, tmp_path / "cache")
    assert time.monotonic() - t0 < 20 and not cache.missing_shards()
    assert "which is gone" in capfd.readouterr().err and not (folder / "build.lock").exists()


def test_a_lock_from_another_pid_namespace_waits_for_a_stale_heartbeat(demo_root, tmp_path, monkeypatch, capfd):
    """Containers sharing a hostname (and a kernel: one boot id) but not a PID namespace: the owner's
    pid means nothing here, so the lock is taken over only once it has not been touched for LOCK_STALE_S."""
    monkeypatch.setattr(buildlock, "LOCK_STALE_S", 2)
    monkeypatch.setattr(buildlock, "LOCK_POLL_S", 0.05)
    paths = copy_images(demo_root, tmp_path / "data", 5)
    folder, _ = cache_module.cache_folder(tmp_path / "cache", "t", tmp_path / "data", paths, 32, "resize")
    folder.mkdir(parents=True)
    lock = _lock(folder, pidns="pid:[1]")
    assert not buildlock.owner_gone(buildlock.lock_owner(lock))
    assert buildlock.owner_gone(buildlock.lock_owner(_lock(folder)))
    lock = _lock(folder, pidns="pid:[1]")
    t0 = time.monotonic()
    cache = build(tmp_path / "data", paths, tmp_path / "cache")
    assert time.monotonic() - t0 >= 2 and not cache.missing_shards()
    err = capfd.readouterr().err
    assert "waiting for the image cache" in err and "silent for over 2 s" in err


def _hold(lock: Path, ready) -> None:
    claim = buildlock.claim_build(lock, lambda: False, "a test's work")
    ready.set()
    while True:
        claim.touch()
        time.sleep(0.1)


def test_a_live_builder_keeps_its_lock_and_a_released_lock_is_its_own(tmp_path):
    lock = tmp_path / "build.lock"
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(lock, ready))
    holder.start()
    try:
        assert ready.wait(30)
        owner = buildlock.lock_owner(lock)
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname() and len(owner["token"]) == 16
        assert not buildlock.lock_stale(lock)
    finally:
        holder.kill()
        holder.join()
    assert buildlock.lock_stale(lock)  # killed: its pid is gone on this host, boot and namespace
    claim = buildlock.claim_build(lock, lambda: False, "a test's work")
    other = buildlock.BuildLock(lock, "another process's token")
    other.release()  # a builder whose lock was taken over does not remove the new owner's
    assert lock.exists()
    claim.release()
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------
# 4. a cache folder is verified against the key it claims

def test_a_64px_cache_copied_into_the_32px_folder_is_rebuilt_at_32px(demo_root, tmp_path, capfd):
    root = tmp_path / "data"
    paths = copy_images(demo_root, root, 6)
    small, big = build(root, paths, tmp_path / "cache"), build(root, paths, tmp_path / "cache", size=64)
    shutil.rmtree(small.folder)
    shutil.copytree(big.folder, small.folder)
    with pytest.raises(UserError, match="meta.json: holds a cache of other inputs than its folder's name says"):
        ImageCache(small.folder)  # never read as the 32 px cache it is named
    again = build(root, paths, tmp_path / "cache")
    assert again.size == 32 and again.folder == small.folder
    np.testing.assert_array_equal(pixels(again), reference(root, paths))
    err = capfd.readouterr().err
    assert "holds a cache of other inputs: size 64, not 32; rewritten" in err
    assert "rebuilding 2 of 2 shards" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["meta {}", "meta cut short", "status cut short", "status of another shard",
                                    "shard of another size", "shard cut short"])
def test_a_damaged_cache_folder_is_repaired_without_a_traceback(demo_root, tmp_path, capsys, damage):
    root = tmp_path / "data"
    paths = copy_images(demo_root, root, 6)
    cache = build(root, paths, tmp_path / "cache")
    meta, status, shard = cache.folder / "meta.json", cache.shard_path(0).with_suffix(".json"), cache.shard_path(0)
    if damage == "meta {}":
        meta.write_text("{}")
    elif damage == "meta cut short":
        meta.write_text(meta.read_text()[:40])
    elif damage == "status cut short":
        status.write_text(status.read_text()[:30])
    elif damage == "status of another shard":
        shutil.copy(cache.shard_path(1).with_suffix(".json"), status)  # 2 images' status for a shard of 4
    elif damage == "shard of another size":
        torch.save({"images": torch.zeros((4, 64, 64), dtype=torch.uint8)}, shard)
    else:
        shard.write_bytes(shard.read_bytes()[:500])
    argv = ["--data-root", str(root), "--csv", str(write_csv(root, paths)), "--cache-dir", str(tmp_path / "cache"),
            "--image-size", "32", "--workers", "1", "--shard-size", "4"]
    assert run_cli(dataset.main, argv) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" not in err
    again = ImageCache(cache.folder)
    assert again.shard_size == 4 and not again.missing_shards()
    np.testing.assert_array_equal(pixels(again), reference(root, paths))
    assert again.status()[0].all() and len(again.status()[0]) == len(paths)


def write_csv(root: Path, paths: list[str]) -> Path:
    """A CS 156b-layout CSV of these paths (labels all 1)."""
    header = "Unnamed: 0.1,Unnamed: 0,Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(dataset.PATHOLOGIES)
    rows = [f"{i},{i},{p},Female,50,Frontal,AP," + ",".join(["1.0"] * len(dataset.PATHOLOGIES))
            for i, p in enumerate(paths)]
    csv = root.parent / "t.csv"  # the stem names the cache: the same folder as build()'s
    csv.write_text("\n".join([header, *rows]) + "\n")
    return csv


def test_reading_a_damaged_cache_stops_in_one_line(demo_root, tmp_path):
    paths = copy_images(demo_root, tmp_path / "data", 6)
    cache = build(tmp_path / "data", paths, tmp_path / "cache")
    torch.save({"images": torch.zeros((4, 64, 64), dtype=torch.uint8)}, cache.shard_path(0))
    with pytest.raises(UserError, match=r"shard_00000\.pt: cache shard holds torch\.uint8 \(4, 64, 64\), "
                                        r"not uint8 \(4, 32, 32\)"):
        ImageCache(cache.folder).get([0])
    cache.shard_path(1).with_suffix(".json").write_text('{"ok": [true')
    with pytest.raises(UserError, match=r"shard_00001\.json: unreadable cache status"):
        ImageCache(cache.folder).status()
    (cache.folder / "meta.json").write_text("{}")
    with pytest.raises(UserError, match=r"meta\.json: cache index without a valid version, data_root, size"):
        ImageCache(cache.folder)


def test_a_damaged_copy_is_remade(demo_root, tmp_path):
    paths = copy_images(demo_root, tmp_path / "data", 6)
    base = build(tmp_path / "data", paths, tmp_path / "cache")
    flip = derive_cache(base, "flip", lambda x: x.flip(-1), progress=False)
    flip.shard_path(1).write_bytes(b"cut")
    (flip.folder / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="meta.json: cache index without a valid"):
        find_augmented(base, "flip")
    again = derive_cache(base, "flip", lambda x: x.flip(-1), progress=False)
    assert find_augmented(base, "flip").folder == again.folder
    np.testing.assert_array_equal(pixels(again), pixels(base)[:, :, ::-1])
