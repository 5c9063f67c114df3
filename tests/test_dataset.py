"""dataset.py: both CSV layouts, label policies, stray and missing rows, the patient split, the image
cache (pixels, key, finishing a build), test CSVs, the Dataset, and every bad input it must name."""
import json
import re
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dataset
import socket
from augment import flip_images
from cache import ImageCache, build_cache, cache_folder, cached_table, derive_cache, load_image
from common import UserError
from dataset import (ALL_LABELS, CHEXPERT_LABELS, PATHOLOGIES, XrayDataset, parse_ids, read_test_csv, read_train_csv,
                     split_by_patient, uncertain_targets)

CS156B_FRONT = ["Unnamed: 0.1", "Unnamed: 0", "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
STANFORD_FRONT = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]


def write_csv(path, header, rows):
    """rows: lists of cell texts, written verbatim (blank = empty cell)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(str(c) for c in r) for r in [header, *rows]) + "\n")
    return path


def cs156b_row(i, path, view="Frontal", labels=("",) * 9):
    return [i, i, path, "Female", 60, view, "AP" if view == "Frontal" else "", *labels]


# ---------------------------------------------------------------------------------------------
# CSV layouts and labels

def test_cs156b_layout(tmp_path):
    csv = write_csv(tmp_path / "train2023.csv", CS156B_FRONT + PATHOLOGIES, [
        cs156b_row(0, "train/pid50512/study1/view1_frontal.jpg", labels=["1.0", "", "-1.0", "0.0", "", "", "", "", "1"]),
        # the view comes from the Frontal/Lateral column, not the file name
        cs156b_row(1, "train/pid50512/study2/view1_frontal.jpg", view="Lateral"),
        cs156b_row(2, "train/pid7/study1/view2_lateral.jpg", view="Lateral"),
    ])
    df = read_train_csv(csv)
    assert df.attrs["labels"] == PATHOLOGIES
    assert list(df.columns) == ["path", "patient", "study", "view", *PATHOLOGIES]
    assert df["patient"].tolist() == ["pid50512", "pid50512", "pid7"]
    assert df["study"].tolist() == ["pid50512/study1", "pid50512/study2", "pid7/study1"]
    assert df["view"].tolist() == ["frontal", "lateral", "lateral"]
    assert df[PATHOLOGIES].dtypes.unique().tolist() == [np.float32]
    np.testing.assert_array_equal(df.loc[0, PATHOLOGIES].to_numpy(np.float32),
                                  [1, np.nan, -1, 0, np.nan, np.nan, np.nan, np.nan, 1])
    assert df.attrs["n_stray"] == 0


def test_stanford_chexpert_layout(tmp_path):
    labels = ["1.0", "", "0.0", "-1.0", "", "1.0", "", "", "", "", "-1.0", "", "", "1.0"]
    csv = write_csv(tmp_path / "train.csv", STANFORD_FRONT + CHEXPERT_LABELS, [
        ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP", *labels],
        ["CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg", "Male", 87, "Lateral", "", *[""] * 14],
    ])
    df = read_train_csv(csv)
    assert df.attrs["labels"] == CHEXPERT_LABELS and set(CHEXPERT_LABELS) == set(ALL_LABELS)
    assert df["patient"].tolist() == ["patient00001", "patient00002"]
    assert df["study"].tolist() == ["patient00001/study1", "patient00002/study2"]
    assert df["view"].tolist() == ["frontal", "lateral"]
    # Stanford writes 1 positive, 0 negative, -1 uncertain: read onto the project's scale
    assert df.attrs["label_convention"] == "chexpert"
    assert df.loc[0, "Cardiomegaly"] == -1 and df.loc[0, "Edema"] == 1 and df.loc[0, "Pleural Effusion"] == 0
    assert df.loc[0, "Lung Opacity"] == 0
    assert df.loc[1, CHEXPERT_LABELS].isna().all()
    assert df.attrs["n_stray"] == 0


def test_full_size_chexpert_paths_are_not_stray(tmp_path):
    """Stanford's full-size set has every path under CheXpert-v1.0/: those rows are the data."""
    csv = write_csv(tmp_path / "train.csv", STANFORD_FRONT + CHEXPERT_LABELS, [
        ["CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP", *[""] * 14],
    ])
    df = read_train_csv(csv)
    assert len(df) == 1 and df.attrs["n_stray"] == 0


@pytest.mark.parametrize("policy, uncertain_to", [("keep", 0.0), ("ignore", np.nan), ("ones", 1.0), ("zeros", -1.0)])
def test_uncertain_policies_make_training_targets_from_source_labels(tmp_path, policy, uncertain_to):
    csv = write_csv(tmp_path / "train2023.csv", CS156B_FRONT + PATHOLOGIES, [
        cs156b_row(0, "train/pid1/study1/view1_frontal.jpg", labels=["1", "0", "-1", "", "0.0", "1.0", "-1.0", "", "0"]),
    ])
    source = read_train_csv(csv).loc[[0, 0], PATHOLOGIES].to_numpy(np.float32)  # (2, 9): the shape is kept
    # the reader applies no policy: uncertain stays 0, as the leaderboard scores it
    np.testing.assert_array_equal(source[0], np.array([1, 0, -1, np.nan, 0, 1, -1, np.nan, 0], np.float32))
    targets = uncertain_targets(source, policy)
    u = np.float32(uncertain_to)
    # positives and negatives never change, blanks stay NaN (never filled), only 0 follows the policy
    assert targets.shape == source.shape and targets.dtype == np.float32
    np.testing.assert_array_equal(targets, np.array([[1, u, -1, np.nan, u, 1, -1, np.nan, u]] * 2, np.float32))
    assert targets is not source and np.isnan(source[0, 3]) and source[0, 1] == 0  # a new array
    assert uncertain_targets([0, 1, np.nan], policy).dtype == np.float64


def test_unknown_uncertain_policy():
    with pytest.raises(UserError, match="unknown uncertain policy 'maybe'.*keep, ignore, ones, zeros"):
        uncertain_targets(np.zeros(3), "maybe")


def test_stray_and_missing_rows_are_counted(demo_root, tmp_path):
    """The demo carries 4 stray rows, 3 rows whose file is missing and 1 unreadable file."""
    with pytest.warns(UserWarning, match=r"dropped 4 stray rows whose path starts 'CheXpert-v1.0/'"):
        df = read_train_csv(demo_root / "student_labels" / "train2023.csv")
    assert df.attrs["n_stray"] == 4 and not df["path"].str.startswith("CheXpert-v1.0/").any()
    with pytest.warns(UserWarning) as caught:
        table, cache = cached_table(df, demo_root, 32, tmp_path / "cache", "train2023", workers=1, progress=False)
    messages = [str(w.message) for w in caught if "missing or unreadable" in str(w.message)]
    assert len(messages) == 1, "one warning for all of them"
    msg = messages[0]
    assert msg.startswith("dropped 4 rows whose image is missing or unreadable")
    for k in range(3):
        assert f"train/pid{80000 + k}/study1/view1_frontal.jpg (missing)" in msg
    assert "train/pid85000/study1/view1_frontal.jpg (unreadable" in msg
    assert len(table) == len(df) - 4 and table.attrs["n_bad_images"] == 4 and table.attrs["n_stray"] == 4
    assert table.attrs["labels"] == PATHOLOGIES


# ---------------------------------------------------------------------------------------------
# The patient split

def test_split_is_disjoint_by_patient_and_deterministic(demo_root):
    with pytest.warns(UserWarning):
        df = read_train_csv(demo_root / "student_labels" / "train2023.csv")
    is_val = split_by_patient(df["patient"], 0.25, seed=3)
    val_p, train_p = set(df["patient"][is_val]), set(df["patient"][~is_val])
    assert val_p and train_p and not val_p & train_p
    n_patients = df["patient"].nunique()
    assert len(val_p) == round(0.25 * n_patients)
    np.testing.assert_array_equal(is_val, split_by_patient(df["patient"], 0.25, seed=3))
    assert not np.array_equal(is_val, split_by_patient(df["patient"], 0.25, seed=4))
    # the same patients whatever the row order
    shuffled = df["patient"].sample(frac=1.0, random_state=1)
    assert set(shuffled[split_by_patient(shuffled, 0.25, seed=3)]) == val_p
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match="--val-frac must be between 0 and 1"):
            split_by_patient(df["patient"], bad, seed=3)


# ---------------------------------------------------------------------------------------------
# The image cache

def full_decode(path, size, square="resize"):
    """The reference: a full-resolution decode (no draft) then the same resize."""
    with Image.open(path) as im:
        im = im.convert("L")
        w, h = im.size
        box = None
        if square == "crop":
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=box), dtype=np.int16)


@pytest.mark.parametrize("square", ["resize", "crop"])
def test_cached_pixels_equal_a_direct_decode(demo_root, tmp_path, square):
    """The cache holds exactly what load_image gives (bit for bit); that in turn equals a full
    (non-draft) decode at the same size within rounding of the two resampling filters.

    Tolerance, and why: draft mode lets libjpeg do the first 2x/4x/8x of the shrinking inside the
    IDCT (an average over each DCT block) and PIL's antialiased bilinear resize the rest, where the
    reference lets the resize do it all. The two low-pass filters differ, so single pixels on sharp
    edges of these noisy synthetic images differ by up to ~20 levels, but not on average. Measured
    on demo images at 64 px (drafted at 1/4): mean |diff| 0.85-1.12 gray levels, mean signed diff
    (brightness bias) within +-0.03, PSNR 43-45 dB. The smallest real fault, a one-pixel shift,
    gives mean |diff| 7-10 and PSNR 23-24 dB; a flip, the wrong image or the wrong scale more. So
    the bounds are mean |diff| <= 1.5, |bias| <= 0.25, PSNR >= 38 dB: headroom for other libjpeg
    builds, and still 5x below the smallest fault."""
    paths = sorted(str(p.relative_to(demo_root)) for p in (demo_root / "train").glob("pid1*/study1/view1_frontal.jpg"))[:6]
    size = 64
    cache = build_cache(paths, demo_root, size, tmp_path / "cache", "px", square=square, workers=1, progress=False)
    got = cache.get(np.arange(len(paths)))
    assert got.shape == (len(paths), 1, size, size) and got.dtype == torch.uint8
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(got[i, 0].numpy(), load_image(demo_root / p, size, square))
        diff = got[i, 0].numpy().astype(np.int16) - full_decode(demo_root / p, size, square)
        psnr = 10 * np.log10(255 ** 2 / np.mean(diff.astype(np.float64) ** 2))
        assert np.abs(diff).mean() <= 1.5 and abs(diff.mean()) <= 0.25 and psnr >= 38, (p, np.abs(diff).mean(), psnr)
        shifted = np.roll(got[i, 0].numpy().astype(np.int16), 1, axis=1) - full_decode(demo_root / p, size, square)
        assert np.abs(shifted).mean() > 3 * 1.5, "the bound would not catch a one-pixel shift"


def test_non_square_images_are_made_square(tmp_path):
    """resize squashes the whole picture; crop keeps the central square. A wide image whose left
    third is black and the rest white shows the difference."""
    img = np.full((300, 900), 255, np.uint8)
    img[:, :300] = 0
    Image.fromarray(img).save(tmp_path / "wide.jpg", quality=95)
    squashed = load_image(tmp_path / "wide.jpg", 30, "resize")
    cropped = load_image(tmp_path / "wide.jpg", 30, "crop")
    assert squashed.shape == cropped.shape == (30, 30)
    assert squashed[:, :8].mean() < 20 and squashed[:, 12:].mean() > 235  # black third still there
    assert cropped[:, 2:].mean() > 235  # central square [300, 600) is white


def test_cache_key_changes_with_everything_that_changes_pixels(tmp_path):
    paths = ["train/pid1/study1/view1_frontal.jpg", "train/pid2/study1/view1_frontal.jpg"]
    base = cache_folder(tmp_path, "train2023", tmp_path / "data", paths, 64, "resize")[0]
    assert base == cache_folder(tmp_path, "train2023", tmp_path / "data", list(paths), 64, "resize")[0]
    others = [
        cache_folder(tmp_path, "train2023", tmp_path / "data", paths, 96, "resize")[0],          # size
        cache_folder(tmp_path, "train2023", tmp_path / "data", paths, 64, "crop")[0],            # square mode
        cache_folder(tmp_path, "train2023", tmp_path / "data", paths[::-1], 64, "resize")[0],    # row order
        cache_folder(tmp_path, "train2023", tmp_path / "data", paths[:1], 64, "resize")[0],      # CSV paths
        cache_folder(tmp_path, "train2023", tmp_path / "other", paths, 64, "resize")[0],         # data root
    ]
    assert len({base, *others}) == 6
    # the shard size is only the layout: a cache built with any shard size is found by every script
    assert base == cache_folder(tmp_path, "train2023", tmp_path / "data", paths, 64, "resize", shard_size=7)[0]


def test_cache_is_found_whatever_its_shard_size(demo_root, tmp_path):
    paths = sorted(str(p.relative_to(demo_root)) for p in (demo_root / "train").glob("*/*/*.jpg"))[:10]
    a = build_cache(paths, demo_root, 32, tmp_path / "cache", "k", workers=1, progress=False, shard_size=4)
    assert a.n_shards == 3
    b = build_cache(paths, demo_root, 32, tmp_path / "cache", "k", workers=1, progress=False)
    assert b.folder == a.folder and b.shard_size == 4
    c = build_cache(paths, demo_root, 48, tmp_path / "cache", "k", workers=1, progress=False)
    assert c.folder != a.folder and c.size == 48
    with pytest.raises(UserError, match="--shard-size must be at least 1"):
        build_cache(paths, demo_root, 32, tmp_path / "cache2", "k", workers=1, progress=False, shard_size=0)


def snapshot(cache: ImageCache) -> dict:
    """Every file of a cache folder: shard tensors as arrays, JSON as objects."""
    out = {}
    for f in sorted(cache.folder.iterdir()):
        if f.suffix == ".pt":
            out[f.name] = torch.load(f, weights_only=True)["images"].numpy().copy()
        else:
            out[f.name] = json.loads(f.read_text())
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


def test_finishing_an_interrupted_build_gives_identical_contents(demo_root, tmp_path):
    paths = sorted(str(p.relative_to(demo_root)) for p in (demo_root / "train").glob("*/*/*.jpg"))
    paths += ["train/pid99999/study1/view1_frontal.jpg"]  # a missing file: its status survives too
    build = lambda d, workers: build_cache(paths, demo_root, 32, d, "t", workers=workers, progress=False,
                                           shard_size=16)
    reference = snapshot(build(tmp_path / "ref", 1))
    assert sum(k.endswith(".pt") for k in reference) == -(-len(paths) // 16) >= 4

    cache = build(tmp_path / "c", 2)
    assert_same(snapshot(cache), reference)
    # what a killed build leaves: a shard never written, a shard whose status was written but not its
    # pixels (killed between the two renames), and a half-written temporary file of a dead process
    cache.shard_path(1).unlink()
    cache.shard_path(3).unlink()
    cache.shard_path(2).with_suffix(".json").unlink()
    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no such process
    stale = cache.folder / f".shard_00001.pt.tmp-{socket.gethostname()}-{dead}"
    stale.write_bytes(b"half a shard")
    other_host = cache.folder / f".shard_00001.pt.tmp-some-other-node-{dead}"
    other_host.write_bytes(b"another node may still be writing this")
    assert ImageCache(cache.folder).missing_shards() == [1, 2, 3]

    again = build(tmp_path / "c", 1)
    assert again.folder == cache.folder and not again.missing_shards()
    assert not stale.exists(), "the dead writer's temporary file is cleaned up"
    other_host.unlink()  # only this host's dead writers are cleaned; another node's file is left alone
    assert_same(snapshot(again), reference)


def test_images_fixed_after_a_build_are_picked_up(demo_root, tmp_path):
    """A missing file copied in (or a broken one replaced) is decoded by the next build, and an
    augmented copy follows: no need to delete the cache by hand."""
    root = tmp_path / "data"
    good = sorted((demo_root / "train").glob("*/*/*.jpg"))[:6]
    for f in good:
        (root / f.relative_to(demo_root)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, root / f.relative_to(demo_root))
    paths = [str(f.relative_to(demo_root)) for f in good] + ["train/pid77777/study1/view1_frontal.jpg"]
    (root / paths[2]).write_bytes(b"")  # broken for now
    build = lambda: build_cache(paths, root, 32, tmp_path / "cache", "t", workers=1, progress=False, shard_size=4)
    cache = build()
    flip = derive_cache(cache, "flip", flip_images, progress=False)
    ok, errors = cache.status()
    assert ok.tolist() == [True, True, False, True, True, True, False]
    assert errors[2].startswith("unreadable") and errors[6] == "missing"
    before = [cache.shard_path(k).stat().st_mtime_ns for k in range(2)]
    assert build().status()[0].tolist() == ok.tolist()  # nothing fixed yet: nothing redone
    assert [cache.shard_path(k).stat().st_mtime_ns for k in range(2)] == before
    shutil.copy(good[2], root / paths[2])
    (root / paths[6]).parent.mkdir(parents=True)
    shutil.copy(good[0], root / paths[6])
    again = build()
    assert again.status()[0].all()
    np.testing.assert_array_equal(again.get([2, 6])[:, 0].numpy(),
                                  np.stack([load_image(good[2], 32), load_image(good[0], 32)]))
    flip = derive_cache(again, "flip", flip_images, progress=False)
    assert torch.equal(ImageCache(flip.folder).get([2, 6]), again.get([2, 6]).flip(-1))


def test_corrupt_cache_files_are_named(demo_root, tmp_path):
    paths = sorted(str(p.relative_to(demo_root)) for p in (demo_root / "train").glob("*/*/*.jpg"))[:4]
    cache = build_cache(paths, demo_root, 32, tmp_path / "cache", "t", workers=1, progress=False)
    cache.shard_path(0).write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=re.escape(str(cache.shard_path(0))) + ".*corrupt cache shard"):
        ImageCache(cache.folder).get([0])
    (cache.folder / "meta.json").write_text("{truncated")
    with pytest.raises(UserError, match="meta.json: unreadable cache index"):
        ImageCache(cache.folder)


def test_cache_is_never_written_under_the_data_root(demo_root):
    with pytest.raises(UserError, match="is inside the data root"):
        build_cache(["train/x.jpg"], demo_root, 32, demo_root / "cache", "t", workers=1, progress=False)
    assert not (demo_root / "cache").exists()


def test_cache_is_about_n_s_s_bytes(demo_root, tmp_path):
    paths = sorted(str(p.relative_to(demo_root)) for p in (demo_root / "train").glob("*/*/*.jpg"))[:40]
    cache = build_cache(paths, demo_root, 64, tmp_path / "cache", "t", workers=1, progress=False)
    nbytes = sum(cache.shard_path(k).stat().st_size for k in range(cache.n_shards))
    assert len(paths) * 64 * 64 <= nbytes <= 1.05 * len(paths) * 64 * 64 + 4096  # uint8, plus a small header


# ---------------------------------------------------------------------------------------------
# Test CSVs

def test_read_test_csv(tmp_path):
    csv = write_csv(tmp_path / "test_ids.csv", ["Id", "Path"], [
        [1001, "test/pid90000/study1/view1_frontal.jpg"],
        [1007, "test/pid90000/study1/view2_lateral.jpg"],
        [20000, "test/pid90001/study3/view1_Frontal.jpg"],
    ])
    df = read_test_csv(csv)
    assert df["Id"].tolist() == [1001, 1007, 20000] and df["Id"].dtype == np.int64
    assert df["view"].tolist() == ["frontal", "lateral", "frontal"]
    assert df["patient"].tolist() == ["pid90000", "pid90000", "pid90001"]
    assert df["study"].tolist() == ["pid90000/study1", "pid90000/study1", "pid90001/study3"]


def test_read_test_csv_rejects_bad_ids(tmp_path):
    dup = write_csv(tmp_path / "dup.csv", ["Id", "Path"], [[5, "test/pid1/study1/view1_frontal.jpg"],
                                                           [5, "test/pid2/study1/view1_frontal.jpg"]])
    with pytest.raises(UserError, match=r"dup.csv: line 3: Id 5 appears more than once"):
        read_test_csv(dup)
    text = write_csv(tmp_path / "text.csv", ["Id", "Path"], [["x1", "test/pid1/study1/view1_frontal.jpg"]])
    with pytest.raises(UserError, match=r"text.csv: line 2, column 'Id': 'x1' is not an integer"):
        read_test_csv(text)
    no_path = write_csv(tmp_path / "nopath.csv", ["Id", "File"], [[1, "a.jpg"]])
    with pytest.raises(UserError, match=r"nopath.csv: missing required column 'Path'"):
        read_test_csv(no_path)


def test_parse_ids_takes_integers_once_and_names_the_line():
    ids = parse_ids(pd.Series(["1001", " 7 ", "20000.0"]), "f.csv")
    assert ids.dtype == np.int64 and ids.tolist() == [1001, 7, 20000]
    for cells, message in [(["1", "1.5"], "f.csv: line 3, column 'Id': '1.5' is not an integer"),
                           (["1", ""], "f.csv: line 3, column 'Id': '' is not an integer"),
                           (["inf"], "f.csv: line 2, column 'Id': 'inf' is not an integer"),
                           (["3", "4", "3.0"], "f.csv: line 4: Id 3 appears more than once (first on line 2)")]:
        with pytest.raises(UserError, match=re.escape(message)):
            parse_ids(pd.Series(cells), "f.csv")


def no_view_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "name no view" in str(w.message)]


def test_test_images_that_name_no_view_are_counted_in_one_warning(tmp_path):
    csv = write_csv(tmp_path / "test_ids.csv", ["Id", "Path"], [
        [1, "test/pid1/study1/view1_frontal.jpg"], [2, "test/pid1/study1/image2.jpg"],
        [3, "test/pid2/study1/scan.png"], [4, "test/pid2/study1/view2_lateral.jpg"], [5, "test/pid3/study1/x.jpg"],
    ])
    with pytest.warns(UserWarning) as caught:
        df = read_test_csv(csv)
    assert no_view_warnings(caught) == [
        f"{csv}: 3 test images name no view (no _frontal/_lateral in the file name): treated as frontal, "
        f"e.g. test/pid1/study1/image2.jpg, test/pid2/study1/scan.png, test/pid3/study1/x.jpg"]
    assert df["view"].tolist() == ["frontal", "frontal", "frontal", "lateral", "frontal"]


def test_train_rows_warn_only_where_the_file_name_fallback_is_used(tmp_path):
    """The Frontal/Lateral column decides; a blank or odd one falls back to the file name, and only
    where that names no view either is the row counted."""
    csv = write_csv(tmp_path / "train2023.csv", CS156B_FRONT + PATHOLOGIES, [
        cs156b_row(0, "train/pid1/study1/image1.jpg", view="Lateral"),       # the column decides: no warning
        cs156b_row(1, "train/pid1/study1/view2_lateral.jpg", view=""),      # the name tells
        cs156b_row(2, "train/pid2/study1/image1.jpg", view="?"),            # neither tells
    ])
    with pytest.warns(UserWarning) as caught:
        df = read_train_csv(csv)
    assert no_view_warnings(caught) == [
        f"{csv}: 1 train images name no view (no 'Frontal/Lateral' value and no _frontal/_lateral in the file "
        f"name): treated as frontal, e.g. train/pid2/study1/image1.jpg"]
    assert df["view"].tolist() == ["lateral", "lateral", "frontal"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_train_csv(write_csv(tmp_path / "ok.csv", CS156B_FRONT + PATHOLOGIES,
                                 [cs156b_row(0, "train/pid1/study1/image1.jpg", view="Frontal")]))
    assert no_view_warnings(caught) == []


# ---------------------------------------------------------------------------------------------
# The Dataset

def test_xray_dataset_batches(demo_root, tmp_path):
    with pytest.warns(UserWarning):
        df = read_train_csv(demo_root / "student_labels" / "train2023.csv")
        table, cache = cached_table(df, demo_root, 32, tmp_path / "cache", "train2023", workers=1, progress=False)
    names = ["Cardiomegaly", "Pleural Effusion"]
    targets = table[names].to_numpy(np.float32)
    ds = XrayDataset([cache], table["slot"].to_numpy(), targets)
    assert len(ds) == len(table)
    image, target, mask = ds[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8
    assert target.shape == (2,) and target.dtype == torch.float32
    assert mask.shape == (2,) and mask.dtype == torch.bool
    idx = list(range(min(20, len(ds))))
    images, t, m = ds[idx]
    assert images.shape == (len(idx), 1, 32, 32) and images.dtype == torch.uint8
    assert t.shape == m.shape == (len(idx), 2)
    blank = np.isnan(targets[idx])
    assert blank.any() and (~blank).any()
    np.testing.assert_array_equal(m.numpy(), ~blank)                  # mask False exactly at the blanks
    assert (t[~m] == 0).all() and torch.isfinite(t).all()             # no NaN reaches the loss
    np.testing.assert_array_equal(t[m].numpy(), targets[idx][~blank])
    assert set(np.unique(t.numpy())) <= {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal(images[3, 0].numpy(), load_image(demo_root / table["path"][3], 32))
    # a DataLoader batches single items the same way
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch[0].shape == (8, 1, 32, 32) and batch[1].shape == batch[2].shape == (8, 2)
    # an augmented copy doubles the samples; copy row r is row r with the copy's pixels and labels
    flipped = derive_cache(cache, "flip", flip_images, progress=False)
    ds2 = XrayDataset([cache, flipped], table["slot"].to_numpy(), targets)
    assert len(ds2) == 2 * len(table)
    img2, t2, m2 = ds2[len(table) + 3]
    assert torch.equal(img2, ds[3][0].flip(-1)) and torch.equal(t2, ds[3][1]) and torch.equal(m2, ds[3][2])


# ---------------------------------------------------------------------------------------------
# Bad input: each is a UserError that names what is wrong and where

@pytest.mark.parametrize("value", ["2", "0.5", "yes", "nan", "-2.0"])
def test_bad_label_names_row_column_and_value(tmp_path, value):
    labels = [""] * 9
    labels[PATHOLOGIES.index("Pleural Effusion")] = value
    csv = write_csv(tmp_path / "train2023.csv", CS156B_FRONT + PATHOLOGIES, [
        cs156b_row(0, "train/pid1/study1/view1_frontal.jpg"),
        cs156b_row(1, "train/pid2/study1/view1_frontal.jpg", labels=labels),
    ])
    with pytest.raises(UserError, match=re.escape(f"train2023.csv: line 3, column 'Pleural Effusion': "
                                                  f"invalid label '{value}' (expected 1, 0, -1 or blank)")):
        read_train_csv(csv)


def test_bad_label_line_counts_stray_rows(tmp_path):
    """The line number is the CSV's own, even after stray rows are dropped."""
    labels = ["3"] + [""] * 8
    csv = write_csv(tmp_path / "train2023.csv", CS156B_FRONT + PATHOLOGIES, [
        cs156b_row(0, "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"),
        cs156b_row(1, "train/pid2/study1/view1_frontal.jpg"),
        cs156b_row(2, "train/pid3/study1/view1_frontal.jpg", labels=labels),
    ])
    with pytest.warns(UserWarning, match="dropped 1 stray rows"), \
            pytest.raises(UserError, match=r"line 4, column 'No Finding': invalid label '3'"):
        read_train_csv(csv)


@pytest.mark.parametrize("missing", ["Path", "AP/PA"])
def test_missing_required_column_is_named(tmp_path, missing):
    header = [c for c in CS156B_FRONT if c != missing] + PATHOLOGIES
    row = [c for c, h in zip(cs156b_row(0, "train/pid1/study1/view1_frontal.jpg"), CS156B_FRONT + PATHOLOGIES)
           if h != missing]
    csv = write_csv(tmp_path / "train2023.csv", header, [row])
    with pytest.raises(UserError, match=re.escape(f"missing required column '{missing}'")):
        read_train_csv(csv)


def test_other_bad_csvs_are_named(tmp_path):
    with pytest.raises(UserError, match=r"nope.csv: no such CSV file"):
        read_train_csv(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match=r"empty.csv: not a readable CSV"):
        read_train_csv(empty)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=r"binary.csv: (not a readable CSV|missing required column)"):
        read_train_csv(binary)
    no_labels = write_csv(tmp_path / "nolabels.csv", CS156B_FRONT, [cs156b_row(0, "train/pid1/study1/view1_frontal.jpg")[:7]])
    with pytest.raises(UserError, match=r"nolabels.csv: no label columns after 'AP/PA'"):
        read_train_csv(no_labels)


def test_unknown_pathology_lists_valid_names():
    with pytest.raises(UserError) as e:
        dataset.check_pathologies(["Cardiomegally"])
    assert "unknown pathology 'Cardiomegally'" in str(e.value)
    assert all(n in str(e.value) for n in PATHOLOGIES)
    assert dataset.check_pathologies(["pleural_effusion", "Cardiomegaly"]) == ["Pleural Effusion", "Cardiomegaly"]
    assert dataset.check_pathologies(["all"]) == PATHOLOGIES
    with pytest.raises(UserError, match="'Edema' is not a label column of this CSV"):
        dataset.check_pathologies(["Edema"], PATHOLOGIES)
