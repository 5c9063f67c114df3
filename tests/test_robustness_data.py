"""Issue 7, the data side: bad images, labels, columns, names and paths end in one clear line (or one
warning when the run can go on), a cache build killed at any moment is finished by the next run with
identical contents, and nothing is ever written under the data root."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import cache as cache_module
import dataset
import train
from common import run_cli
from dataset import ALL_LABELS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image-size", "32", "--epochs", "1", "--batch-size", "16", "--weights", "none", "--workers", "1",
        "--no-progress"]
BROKEN = {  # the three ways a training image can be unreadable
    "truncated": "train/pid10000/study1/view1_frontal.jpg",
    "random": "train/pid10007/study1/view1_frontal.jpg",
    "empty": "train/pid10014/study1/view1_frontal.jpg",
}


def cli(*args, cwd=None, env=None):
    """Run `python dataset.py ARGS`; returns the CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(ROOT / "dataset.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=120)


def assert_one_error_line(stderr: str, *needles: str) -> str:
    """The CLI contract: one 'error:' line naming the fault, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def listing(root: Path) -> dict:
    """Every path under root with its size and mtime (ns), directories included."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))} | {".": (-1, root.stat().st_mtime_ns)}


def copy_demo(demo_root: Path, dest: Path) -> Path:
    shutil.copytree(demo_root, dest)
    return dest


def write_labels(root: Path, edit) -> Path:
    """Rewrite root's train2023.csv through edit(list of lines) -> list of lines."""
    csv = root / "student_labels" / "train2023.csv"
    csv.write_text("\n".join(edit(csv.read_text().splitlines())) + "\n")
    return csv


# ---------------------------------------------------------------------------------------------
# Unreadable images: skipped, counted, named in one warning; training goes on; nothing written under
# the data root. One dataset.py run and one training run serve every assertion.

@pytest.fixture(scope="module")
def broken_run(demo_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("broken")
    root = copy_demo(demo_root, work / "data")
    p = root / BROKEN["truncated"]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    (root / BROKEN["random"]).write_bytes(np.random.default_rng(0).bytes(5000))
    (root / BROKEN["empty"]).write_bytes(b"")
    threads = torch.get_num_threads()
    os.chmod(root, 0o555)  # as on the cluster: the data root is read-only (root ignores this; the listing does not)
    before = listing(root)
    try:
        proc = cli("--data-root", root, "--cache-dir", work / "cache", "--image-size", 32, "--workers", 1, cwd=work)
        argv = ["--pathology", "Cardiomegaly", "--data-root", str(root), "--cache-dir", str(work / "cache"),
                "--out-dir", str(work / "ckpt"), *TINY]
        # one intra-op thread: on a CPU shared with other jobs, two OpenMP threads that wait for each
        # other make a ResNet-50 step 10x slower, not faster
        torch.set_num_threads(1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summaries = train.main(argv)
        after = listing(root)
    finally:
        torch.set_num_threads(threads)
        os.chmod(root, 0o755)
    return {"root": root, "work": work, "proc": proc, "warnings": [str(w.message) for w in caught],
            "summaries": summaries, "before": before, "after": after}


def test_dataset_cli_names_unreadable_images_in_one_warning(broken_run):
    proc = broken_run["proc"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "missing or unreadable" in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("warning: 7 images missing or unreadable")  # 3 broken + the demo's 3 missing, 1 bad
    for path in BROKEN.values():
        assert f"{path} (unreadable" in lines[0]
    assert "(74 ok, 7 missing or unreadable)" in proc.stdout


def test_training_skips_unreadable_images_and_goes_on(broken_run):
    msgs = [m for m in broken_run["warnings"] if "missing or unreadable" in m]
    assert len(msgs) == 1, broken_run["warnings"]
    assert msgs[0].startswith("dropped 7 rows whose image is missing or unreadable")
    for path in BROKEN.values():
        assert path in msgs[0]
    (summary,) = broken_run["summaries"]
    on_disk = json.loads((broken_run["work"] / "ckpt" / "cardiomegaly" / "summary.json").read_text())
    assert on_disk["n_bad_images"] == summary["n_bad_images"] == 7
    assert on_disk["n_stray_rows"] == 4
    assert on_disk["n_train"] > 0 and on_disk["n_val"] > 0 and on_disk["epochs_run"] == 1
    # the counts agree with the CSV: every labelled row that is neither stray nor bad is used once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = dataset.read_train_csv(broken_run["root"] / "student_labels" / "train2023.csv")
    bad = {*BROKEN.values(), "train/pid85000/study1/view1_frontal.jpg", *(f"train/pid{80000 + k}/study1/view1_frontal.jpg"
                                                                         for k in range(3))}
    usable = df[~df["path"].isin(bad) & df["Cardiomegaly"].notna()]
    assert on_disk["n_train"] + on_disk["n_val"] == len(usable)


def test_nothing_is_written_under_the_data_root(broken_run):
    assert broken_run["proc"].returncode == 0
    assert broken_run["after"] == broken_run["before"]


# ---------------------------------------------------------------------------------------------
# Labels and columns

def test_bad_label_value_names_row_column_and_value(demo_root, tmp_path):
    root = copy_demo(demo_root, tmp_path / "data")

    def edit(lines):  # line 6 of the file: the 5th data row; its Fracture cell becomes 'maybe'
        cells = lines[5].split(",")
        cells[lines[0].split(",").index("Fracture")] = "maybe"
        lines[5] = ",".join(cells)
        return lines
    write_labels(root, edit)
    proc = cli("--data-root", root, "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "line 6", "column 'Fracture'", "invalid label 'maybe'")
    assert not (tmp_path / "cache").exists(), "rejected before any work"


def test_missing_column_is_named(demo_root, tmp_path, capsys):
    root = copy_demo(demo_root, tmp_path / "data")
    write_labels(root, lambda lines: [ln.replace("Path", "Filename", 1) if i == 0 else ln for i, ln in enumerate(lines)])
    proc = cli("--data-root", root, "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "train2023.csv", "missing required column 'Path'")
    # and the same from train.py
    code = run_cli(train.main, ["--pathology", "Cardiomegaly", "--data-root", str(root), "--cache-dir",
                                str(tmp_path / "cache"), "--out-dir", str(tmp_path / "ckpt"), *TINY])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, "missing required column 'Path'")


# ---------------------------------------------------------------------------------------------
# Names and paths

def test_unknown_pathology_lists_valid_names(demo_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--pathology", "Cardiomegally", "--data-root", str(demo_root), "--cache-dir",
                    str(tmp_path / "cache"), "--out-dir", str(tmp_path / "ckpt"), *TINY])
    assert e.value.code == 2
    line = assert_one_error_line(capsys.readouterr().err, "unknown pathology 'Cardiomegally'")
    assert all(name in line for name in ALL_LABELS)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ckpt").exists(), "rejected before any work"


def test_nonexistent_data_root_and_csv_are_named(tmp_path, demo_root, capsys):
    proc = cli("--data-root", tmp_path / "no_such_root", "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, f"--data-root {tmp_path / 'no_such_root'}: no such directory")
    proc = cli("--data-root", demo_root, "--csv", tmp_path / "nope.csv", "--cache-dir", tmp_path / "cache")
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, f"{tmp_path / 'nope.csv'}: no such CSV file")
    # train.py: the same two, in-process
    base = ["--pathology", "Cardiomegaly", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "ckpt"), *TINY]
    assert run_cli(train.main, ["--data-root", str(tmp_path / "no_such_root"), *base]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{tmp_path / 'no_such_root'}: no such directory")
    assert run_cli(train.main, ["--data-root", str(demo_root), "--train-csv", str(tmp_path / "nope.csv"), *base]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{tmp_path / 'nope.csv'}: no such CSV file")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("args, needle", [
    (["--image-size", "0"], "--image-size must be at least 8, got 0"),
    (["--workers", "0"], "--workers must be at least 1, got 0"),
    (["--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    (["--square", "pad"], "argument --square: invalid choice: 'pad'"),
])
def test_bad_cli_arguments_rejected_before_work(args, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dataset.parse_args(["--cache-dir", str(tmp_path / "cache"), *args])
    assert e.value.code == 2
    assert_one_error_line(capsys.readouterr().err, needle)


def test_cache_dir_that_cannot_be_written_is_named(demo_root, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file, not a folder")
    proc = cli("--data-root", demo_root, "--cache-dir", blocker, "--image-size", 32, "--workers", 1)
    assert proc.returncode == 2  # found before the CSV is read (issue 28), no longer at the first write
    assert_one_error_line(proc.stderr, f"--cache-dir {blocker}: is a file, not a folder")


# ---------------------------------------------------------------------------------------------
# A cache build killed with SIGKILL is finished by the next run, with identical contents

def shard_files(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.iterdir()):
        out[f.name] = (torch.load(f, weights_only=True)["images"].numpy().copy() if f.suffix == ".pt"
                       else json.loads(f.read_text()))
    return out


def test_cache_build_killed_with_sigkill_is_finished_identically(demo_root, tmp_path):
    args = ["--data-root", str(demo_root), "--image-size", "32", "--workers", "1", "--shard-size", "4"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = dataset.main([*args, "--cache-dir", str(tmp_path / "ref")])  # uninterrupted, in-process
    assert reference.n_shards >= 10
    expected = shard_files(reference.folder)

    cache_dir = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "dataset.py"), *args, "--cache-dir", str(cache_dir)]
    rng = random.Random(int(time.time()))
    seed_note = []
    # kill 1: the moment the first shard lands (certainly mid-build); kill 2: at a random moment
    for when in ("first shard", rng.uniform(0.2, 3.0)):
        seed_note.append(when)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.monotonic()
        while proc.poll() is None:
            done = list(cache_dir.glob("*/shard_*.pt"))
            if (when == "first shard" and done) or (when != "first shard" and time.monotonic() - t0 >= when):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
        if when == "first shard":
            folder = next(cache_dir.iterdir())
            finished = cache_module.ImageCache(folder).missing_shards()
            assert finished, "the kill landed after the build finished: nothing was tested"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    folder = next(cache_dir.iterdir())
    assert folder.name == reference.folder.name
    got = shard_files(folder)
    assert got.keys() == expected.keys(), (seed_note, sorted(set(got) ^ set(expected)))  # no temporary files left
    for k in expected:
        if isinstance(expected[k], np.ndarray):
            np.testing.assert_array_equal(got[k], expected[k], err_msg=f"{k} {seed_note}")
        else:
            assert got[k] == expected[k], (k, seed_note)
    # and a rerun (in-process: no start-up to pay) finds it complete, changing nothing
    mtimes = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dataset.main([*args, "--cache-dir", str(cache_dir)]).folder == folder
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == mtimes
