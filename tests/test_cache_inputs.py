"""What the cache reads and how: only regular files (a FIFO, socket, device or folder named as an
image is skipped with its reason, never opened), PIL's decompression-bomb warning naming the file,
an --image-size bound checked before any work, and --equalize none|hist|clahe, applied when the
cache is built, part of its key, followed by augmented copies."""
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import cache as cache_module
import dataset
import train
from cache import build_cache, cache_folder, cached_table, find_augmented, load_image
from common import Parser, UserError, add_data_flags, check_common_flags
from experiments import flip_images
from tests.conftest import ROOT
from tests.test_cache_validity import copy_images, pixels, write_csv


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Only regular files are opened

def test_a_fifo_socket_device_or_folder_named_as_an_image_is_skipped_with_its_reason(demo_root, tmp_path,
                                                                                     monkeypatch):
    root = tmp_path / "data"
    paths = copy_images(demo_root, root, 4)
    odd = {"train/pid1/study1/view1_frontal.jpg": "a FIFO", "train/pid2/study1/view1_frontal.jpg": "a socket",
           "train/pid3/study1/view1_frontal.jpg": "a character device",
           "train/pid4/study1/view1_frontal.jpg": "a directory"}
    for rel in odd:
        (root / rel).parent.mkdir(parents=True)
    os.mkfifo(root / "train/pid1/study1/view1_frontal.jpg")  # opening it for reading would wait for a writer
    monkeypatch.chdir(root / "train/pid2/study1")  # a short relative name: a socket path is at most 107 bytes
    server = socket.socket(socket.AF_UNIX)
    server.bind("view1_frontal.jpg")
    os.symlink("/dev/null", root / "train/pid3/study1/view1_frontal.jpg")
    (root / "train/pid4/study1/view1_frontal.jpg").mkdir()
    try:
        csv = write_csv(root, [*paths, *odd])
        proc = subprocess.run([sys.executable, str(ROOT / "dataset.py"), "--data-root", str(root), "--csv", str(csv),
                               "--cache-dir", str(tmp_path / "cache"), "--image-size", "32", "--workers", "1"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    finally:
        server.close()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "(4 ok, 4 missing or unreadable)" in proc.stdout
    [line] = [ln for ln in proc.stderr.splitlines() if "missing or unreadable" in ln]
    for rel, kind in odd.items():
        assert f"{rel} (unreadable (not a regular file: {kind}))" in line
    with pytest.raises(cache_module.ImageError, match="not a regular file: a FIFO"):
        load_image(root / "train/pid1/study1/view1_frontal.jpg", 32)


def test_a_decompression_bomb_warning_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 pixels: over the limit, under twice it
    with pytest.warns(Image.DecompressionBombWarning, match=re.escape(str(path)) + ": Image size"):
        load_image(path, 32)


# ---------------------------------------------------------------------------------------------
# --image-size has an upper bound, checked before any work

def test_an_image_size_beyond_the_bound_stops_in_one_line(tmp_path, capsys):
    proc = subprocess.run([sys.executable, str(ROOT / "dataset.py"), "--image-size", "100000", "--cache-dir",
                           str(tmp_path / "cache")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith("error: --image-size must be at most 4096")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "demo_data").exists()  # nothing read or made
    assert "at most 4096" in " ".join(dataset_help().split())
    with pytest.raises(SystemExit) as e:
        flip_images.main(["--image-size", "5000", "--cache-dir", str(tmp_path / "cache")])
    assert e.value.code == 2 and "--image-size must be at most 4096" in one_error_line(capsys.readouterr().err)
    with pytest.raises(UserError, match="--image-size must be at most 4096, got 4097"):
        build_cache(["a.jpg"], tmp_path, 4097, tmp_path / "cache", "t")
    # train.py-style callers: their own lower bound, the same upper one
    p = Parser(prog="train.py")
    add_data_flags(p)
    for size, needle in ((16, "at least 32, got 16"), (5000, "at most 4096")):
        with pytest.raises(SystemExit):
            check_common_flags(p, p.parse_args(["--image-size", str(size)]), min_size=32)
        assert needle in one_error_line(capsys.readouterr().err)
    check_common_flags(p, p.parse_args(["--image-size", "4096"]), min_size=32)


def dataset_help() -> str:
    return subprocess.run([sys.executable, str(ROOT / "dataset.py"), "--help"], capture_output=True, text=True,
                          timeout=60).stdout


# ---------------------------------------------------------------------------------------------
# --equalize

def test_equalized_caches_hold_the_libraries_pixels_and_are_keyed_apart(demo_root, tmp_path):
    paths = copy_images(demo_root, tmp_path / "data", 6)
    built = {mode: build_cache(paths, tmp_path / "data", 32, tmp_path / "cache", "t", workers=1, progress=False,
                               equalize=mode) for mode in ("none", "hist", "clahe")}
    assert len({c.folder for c in built.values()}) == 3 and [c.equalize for c in built.values()] == ["none", "hist", "clahe"]
    plain = np.stack([load_image(tmp_path / "data" / p, 32) for p in paths])
    np.testing.assert_array_equal(pixels(built["none"]), plain)
    np.testing.assert_array_equal(pixels(built["hist"]), [np.asarray(ImageOps.equalize(Image.fromarray(a))) for a in plain])
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    np.testing.assert_array_equal(pixels(built["clahe"]), [clahe.apply(a) for a in plain])
    assert not np.array_equal(pixels(built["hist"]), plain) and not np.array_equal(pixels(built["clahe"]), plain)
    # 'none' keeps the key caches had before --equalize existed: existing caches are found, not rebuilt
    meta = cache_folder(tmp_path / "cache", "t", tmp_path / "data", paths, 32, "resize")[1]
    old_key = hashlib.sha1(json.dumps({k: meta[k] for k in ("version", "data_root", "size", "square", "paths")},
                                      sort_keys=True).encode()).hexdigest()[:12]
    assert built["none"].folder.name == f"t-32px-{old_key}"
    # and callers that do not pass it get 'none'
    table = dataset.read_train_csv(write_csv(tmp_path / "data", paths))
    assert cached_table(table, tmp_path / "data", 32, tmp_path / "cache", "t", workers=1, progress=False)[1].folder \
        == built["none"].folder


def test_dataset_cli_builds_an_equalized_cache_that_no_other_setting_reuses(demo_root, tmp_path, capsys):
    argv = ["--data-root", str(demo_root), "--cache-dir", str(tmp_path / "cache"), "--image-size", "32",
            "--workers", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clahe = dataset.main([*argv, "--equalize", "clahe"])
        plain = dataset.main(argv)
    assert clahe.folder != plain.folder and clahe.equalize == "clahe" and plain.equalize == "none"
    assert json.loads((clahe.folder / "meta.json").read_text())["equalize"] == "clahe"
    assert not torch.equal(clahe.get([0, 1]), plain.get([0, 1]))
    with pytest.raises(SystemExit) as e:
        dataset.parse_args([*argv, "--equalize", "gamma"])
    assert e.value.code == 2 and "argument --equalize: invalid choice: 'gamma'" in one_error_line(capsys.readouterr().err)


def test_augmented_copies_follow_the_equalization_of_their_base(demo_root, tmp_path):
    argv = ["--data-root", str(demo_root), "--cache-dir", str(tmp_path / "cache"), "--image-size", "32",
            "--workers", "1", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy = flip_images.main([*argv, "--equalize", "hist"])
        table = dataset.read_train_csv(demo_root / "student_labels" / "train2023.csv")
        _, hist = cached_table(table, demo_root, 32, tmp_path / "cache", "train2023", workers=1, progress=False,
                               equalize="hist")
        _, plain = cached_table(table, demo_root, 32, tmp_path / "cache", "train2023", workers=1, progress=False)
    assert copy.equalize == "hist" and find_augmented(hist, "flip").folder == copy.folder
    assert torch.equal(pixels_t(copy), pixels_t(hist).flip(-1))
    with pytest.raises(UserError, match=r"augmented copy 'flip' is not built .*--equalize"):
        find_augmented(plain, "flip")  # a copy of the hist cache is never used with the plain one


def pixels_t(c):
    return c.get(list(range(len(c))))


def test_equalize_is_a_flag_of_every_image_script_that_a_resume_must_keep(monkeypatch, tmp_path):
    p = Parser()
    add_data_flags(p)
    [action] = [a for a in p._actions if a.dest == "equalize"]
    assert action.on_resume == "must keep" and action.default == "none" and list(action.choices) == ["none", "hist", "clahe"]
    assert dataset.parse_args(["--cache-dir", str(tmp_path)]).equalize == "none"
    assert train.parse_args(["--pathology", "Cardiomegaly", "--equalize", "clahe"]).equalize == "clahe"
    real = cache_module.importlib.util.find_spec
    monkeypatch.setattr(cache_module.importlib.util, "find_spec", lambda name, *a: None if name == "cv2" else real(name, *a))
    with pytest.raises(UserError, match="--equalize clahe needs OpenCV: pip install opencv-python-headless"):
        build_cache(["a.jpg"], tmp_path, 32, tmp_path / "cache", "t", equalize="clahe")
