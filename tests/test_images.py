"""Image formats beyond 8-bit JPEG/PNG: DICOM and 16-bit PNG/TIFF, brought to uint8 by one rule.

The rule (cache.to_uint8): a range [lo, hi] maps linearly onto 0..255 (lo -> 0, hi -> 255, rounded
to nearest), values outside it clip; [lo, hi] is a DICOM's window (center -+ width/2, in modality
units) or VOI LUT range when it has one, else the image's own min..max. MONOCHROME1 is 255 - that.
Each test writes its own small files with pydicom / PIL, at the cache size (16 x 16), so the resize
is the identity and the expected pixels are computed here by hand from the rule."""
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import (DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEGLosslessSV1, generate_uid)

import dataset
import train
from cache import build_cache, cache_folder, cached_table, load_image, to_uint8
from common import UserError
from conftest import TINY
from dataset import PATHOLOGIES

S = 16  # image and cache size: PIL's resize to the same size is the identity


def write_dicom(path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2", bits_stored: int = 16,
                window: tuple[float, float] | None = None, rescale: tuple[float, float] | None = None,
                voi_lut: tuple[list[int], list[int]] | None = None, syntax=ExplicitVRLittleEndian) -> Path:
    """A Digital X-Ray DICOM file of `pixels` (uint16 or int16 (H, W)); pixels None: no PixelData.
    window = (WindowCenter, WindowWidth); rescale = (RescaleSlope, RescaleIntercept);
    voi_lut = (LUTDescriptor [entries, first mapped value, bits], LUTData)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "test"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits_stored, generate_instance_uid=False)
    else:
        ds.PhotometricInterpretation, ds.Rows, ds.Columns, ds.SamplesPerPixel = photometric, S, S, 1
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if voi_lut is not None:
        item = Dataset()
        item.add_new("LUTDescriptor", "US", voi_lut[0])  # both may be US or SS/OW: say which
        item.add_new("LUTData", "US", voi_lut[1])
        ds.VOILUTSequence = [item]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def cached(tmp_path: Path, *files: Path, size: int = S, square: str = "resize") -> np.ndarray:
    """The cache's pixels of `files` (under tmp_path), uint8 (n, size, size); every one must decode."""
    paths = [str(f.relative_to(tmp_path)) for f in files]
    cache = build_cache(paths, tmp_path, size, tmp_path.parent / f"{tmp_path.name}-cache", "t", square,
                        workers=1, progress=False)
    ok, errors = cache.status()
    assert ok.all(), errors
    return cache.get(np.arange(len(paths)))[:, 0].numpy()


def ramp(n: int = S * S, step: int = 1, offset: int = 0, dtype=np.uint16) -> np.ndarray:
    """offset, offset + step, ... row by row: an (S, S) gradient."""
    return (offset + step * np.arange(n, dtype=np.int64)).reshape(S, S).astype(dtype)


# ---------------------------------------------------------------------------------------------
# the rule itself

def test_to_uint8_maps_min_max_or_window_onto_0_255():
    a = np.array([[0, 16, 32], [4064, 4080, 2040]], dtype=np.uint16)  # min 0, max 4080 = 16 * 255
    np.testing.assert_array_equal(to_uint8(a), [[0, 1, 2], [254, 255, 128]])  # 2040 / 16 = 127.5 rounds up
    np.testing.assert_array_equal(to_uint8(np.array([7, 9, 23, 25]), (0, 4080)), [0, 1, 1, 2])  # 7/16, 9/16, ...
    # a window clips: below lo -> 0, above hi -> 255
    np.testing.assert_array_equal(to_uint8(np.array([-5.0, 10, 20, 30, 99]), (10, 30)), [0, 0, 128, 255, 255])
    assert not to_uint8(np.full((3, 3), 7, np.uint16)).any()  # constant: all 0
    with pytest.raises(ValueError, match="non-finite"):
        to_uint8(np.array([0.0, np.nan]))


# ---------------------------------------------------------------------------------------------
# DICOM

def test_dicom_16_bit_without_window_uses_its_min_max(tmp_path):
    """Values k * 257 (k = 0..255, so min 0, max 65535) come back as k exactly."""
    k = ramp(dtype=np.uint8).astype(np.uint16)
    f = write_dicom(tmp_path / "a.dcm", k * 257)
    np.testing.assert_array_equal(cached(tmp_path, f)[0], k)


def test_dicom_monochrome1_is_inverted(tmp_path):
    k = ramp(dtype=np.uint8).astype(np.uint16)
    m2 = write_dicom(tmp_path / "m2.dcm", k * 257, "MONOCHROME2")
    m1 = write_dicom(tmp_path / "m1.dcm", k * 257, "MONOCHROME1")
    got = cached(tmp_path, m2, m1)
    np.testing.assert_array_equal(got[0], k)
    np.testing.assert_array_equal(got[1], 255 - k)  # low values bright
    # with a window, [16384, 49152]: inverted after the window, so what it clips to 0 becomes 255
    w = write_dicom(tmp_path / "w1.dcm", k * 257, "MONOCHROME1", window=(32768, 32768))
    v = k.astype(int) * 257
    got = cached(tmp_path, w)[0]
    np.testing.assert_array_equal(got, 255 - np.floor((np.clip(v, 16384, 49152) - 16384) * 255 / 32768 + 0.5))
    assert (got[v < 16384] == 255).all()


def test_dicom_12_bit_in_16_stretches_its_own_range(tmp_path):
    """12 bits stored in 16, values 16 k + 7 (-> k + 0.44, rounds to k) and 16 k + 9 (-> k + 0.56,
    rounds to k + 1) for k < 255, plus 0 and 4080 = 16 * 255, the min and max. Implicit VR, as
    older modalities write."""
    k = np.arange(S * S) % 255
    values = 16 * k + np.where(np.arange(S * S) % 2, 9, 7)
    values[0], values[-1] = 0, 4080
    f = write_dicom(tmp_path / "a.dcm", values.reshape(S, S).astype(np.uint16), bits_stored=12,
                    syntax=ImplicitVRLittleEndian)
    expected = k + (np.arange(S * S) % 2)
    expected[0], expected[-1] = 0, 255
    np.testing.assert_array_equal(cached(tmp_path, f)[0], expected.reshape(S, S))


def test_dicom_window_maps_its_range_and_clips(tmp_path):
    """12-bit ramp 0, 16, ..., 4080; window center 2048, width 1020: [1538, 2558] -> 0..255, so
    values below 1538 are 0, above 2558 are 255, and 1538 + 4 j is j in between."""
    values = ramp(step=16)
    f = write_dicom(tmp_path / "a.dcm", values, bits_stored=12, window=(2048, 1020))
    got = cached(tmp_path, f)[0].astype(int)
    v = values.astype(int)
    assert (got[v < 1538] == 0).all() and (got[v > 2558] == 255).all()
    assert (v < 1538).sum() > 50 and (v > 2558).sum() > 50  # the window does clip this image
    inside = (v >= 1538) & (v <= 2558)
    np.testing.assert_array_equal(got[inside], np.floor((v[inside] - 1538) / 4 + 0.5))
    # the same pixels without a window: the image's min..max, no clipping
    plain = cached(tmp_path, write_dicom(tmp_path / "b.dcm", values, bits_stored=12))[0]
    np.testing.assert_array_equal(plain, values // 16)
    # a window of width 0 is no window
    zero = cached(tmp_path, write_dicom(tmp_path / "c.dcm", values, bits_stored=12, window=(2048, 0)))[0]
    np.testing.assert_array_equal(zero, plain)


def test_dicom_rescale_comes_before_the_window(tmp_path):
    """Stored s = 0..255, RescaleSlope 4, RescaleIntercept -1024: modality values 4 s - 1024, i.e.
    -1024..-4. The window (center -512, width 512) is in those units: [-768, -256] -> 0..255. Were
    the window applied to the stored values instead, every pixel would be 255."""
    s = ramp()
    f = write_dicom(tmp_path / "a.dcm", s, window=(-512, 512), rescale=(4, -1024))
    hu = 4 * s.astype(int) - 1024
    expected = np.floor((np.clip(hu, -768, -256) + 768) * 255 / 512 + 0.5)
    got = cached(tmp_path, f)[0]
    np.testing.assert_array_equal(got, expected)
    assert got.min() == 0 and got.max() == 255 and 0 < (got == 255).mean() < 0.5
    # a negative slope turns the image over (modality values decrease with stored ones)
    g = cached(tmp_path, write_dicom(tmp_path / "b.dcm", s * 257, rescale=(-1, 0)))[0]
    np.testing.assert_array_equal(g, 255 - s)


def test_dicom_voi_lut_wins_over_the_window(tmp_path):
    """A VOI LUT Sequence of 200 12-bit entries from stored value 30: value v shows lut[v - 30]
    (below 30 the first entry, past the table the last); the LUT's output range 0..4095 maps onto
    0..255. The window the file also has is not used (the LUT is the more specific of the two)."""
    s = ramp(dtype=np.uint8).astype(np.uint16)
    lut = [(i * i) // 10 for i in range(200)]  # a gamma-like curve, 0..3920
    f = write_dicom(tmp_path / "a.dcm", s, bits_stored=8, window=(100, 50), voi_lut=([200, 30, 12], lut))
    shown = np.array(lut)[np.clip(s.astype(int) - 30, 0, 199)]
    np.testing.assert_array_equal(cached(tmp_path, f)[0], np.floor(shown * 255 / 4095 + 0.5))


def test_dicom_signed_pixels(tmp_path):
    """int16 (PixelRepresentation 1), -32768..32767 in steps of 257: min..max -> 0..255."""
    values = (ramp(dtype=np.int64) * 257 - 32768).astype(np.int16)
    np.testing.assert_array_equal(cached(tmp_path, write_dicom(tmp_path / "a.dcm", values))[0], ramp(dtype=np.uint8))


def test_dicom_is_resized_like_any_image(tmp_path):
    """A non-square DICOM goes through the same square + bilinear resize as an 8-bit PNG of its
    uint8 pixels, in both square modes; an extensionless DICOM is recognised by its 'DICM' prefix."""
    rng = np.random.default_rng(0)
    values = rng.integers(0, 4096, (40, 60)).astype(np.uint16)
    f = write_dicom(tmp_path / "wide.dcm", values, bits_stored=12)
    bare = write_dicom(tmp_path / "wide_no_suffix", values, bits_stored=12)
    Image.fromarray(to_uint8(values)).save(tmp_path / "wide.png")
    for square in ("resize", "crop"):
        ref = load_image(tmp_path / "wide.png", 24, square)
        np.testing.assert_array_equal(load_image(f, 24, square), ref)
        np.testing.assert_array_equal(load_image(bare, 24, square), ref)


# ---------------------------------------------------------------------------------------------
# 16-bit PNG and TIFF, and 8-bit unchanged

@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_png_and_tiff_follow_the_rule(tmp_path, suffix):
    """PIL opens these as mode I;16: 8-bit values stored as k * 257 come back as k; a 12-bit image
    (0..4080 in steps of 16) fills 0..255 instead of being clipped at 255."""
    k = ramp(dtype=np.uint8).astype(np.uint16)
    a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    Image.fromarray(k * 257).save(a)
    Image.fromarray(k * 16).save(b)
    assert Image.open(a).mode == "I;16"
    got = cached(tmp_path, a, b)
    np.testing.assert_array_equal(got[0], k)
    np.testing.assert_array_equal(got[1], k)


def test_8_bit_png_is_not_stretched(tmp_path):
    """8-bit files decode as they are: a PNG of values 100..131 keeps them (no min..max rule)."""
    img = (100 + np.arange(S * S) % 32).reshape(S, S).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    np.testing.assert_array_equal(cached(tmp_path, tmp_path / "a.png")[0], img)


def test_cache_key_is_new_for_formats_whose_pixels_changed(tmp_path):
    """A cache of JPEGs keeps the key it had before DICOM and 16-bit files were read (its pixels
    are the same); one with any other format gets a new key, so a 16-bit PNG cached clipped at 255
    by the old decoder is never reused."""
    jpeg = ["train/pid1/study1/view1_frontal.jpg", "train/pid2/study1/view1_frontal.JPEG"]
    assert cache_folder(tmp_path, "t", tmp_path, jpeg, 32, "resize")[1]["version"] == 1
    for other in ("a.png", "a.tif", "a.dcm"):
        assert cache_folder(tmp_path, "t", tmp_path, [*jpeg, other], 32, "resize")[1]["version"] == 2


# ---------------------------------------------------------------------------------------------
# files that cannot be read: counted and named, with a short reason

HEADER = ["Unnamed: 0.1", "Unnamed: 0", "Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *PATHOLOGIES]


def write_cs156b_csv(path: Path, rels: list[str], seed: int = 0) -> Path:
    """A CS 156b-layout training CSV of these paths, with random labels (1, 0, -1 or blank)."""
    rng = np.random.default_rng(seed)
    rows = [[i, i, rel, "Female", 60, "Lateral" if "lateral" in rel else "Frontal", "AP",
             *rng.choice(["1.0", "0.0", "-1.0", ""], len(PATHOLOGIES))] for i, rel in enumerate(rels)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=HEADER).to_csv(path, index=False)
    return path


def write_unreadable(root: Path) -> dict[str, str]:
    """Broken DICOMs under root: {relative path: the reason expected in the warning}."""
    k = ramp(dtype=np.uint8).astype(np.uint16)
    write_dicom(root / "train/pid1/study1/view1_frontal.dcm", None)
    (root / "train/pid2/study1").mkdir(parents=True)
    (root / "train/pid2/study1/view1_frontal.dcm").write_bytes(np.random.default_rng(0).bytes(300))
    write_dicom(root / "train/pid3/study1/view1_frontal.dcm", np.stack([k, k]))  # two frames
    rgb = write_dicom(root / "train/pid4/study1/view1_frontal.dcm", np.stack([k.astype(np.uint8)] * 3, -1), "RGB", 8)
    cut = write_dicom(root / "train/pid5/study1/view1_frontal.dcm", k)
    cut.write_bytes(cut.read_bytes()[:-100])  # pixel data cut short
    return {"train/pid0/study1/view1_frontal.dcm": "missing",
            "train/pid1/study1/view1_frontal.dcm": "unreadable (DICOM without pixel data)",
            "train/pid2/study1/view1_frontal.dcm": "unreadable (not a DICOM file)",
            "train/pid3/study1/view1_frontal.dcm": "unreadable (DICOM with 2 frames: one is expected)",
            str(rgb.relative_to(root)): "unreadable (DICOM RGB: only MONOCHROME1/2 are read)",
            str(cut.relative_to(root)): "unreadable (DICOM pixel data unreadable ("}


def test_unreadable_dicoms_are_counted_and_named(tmp_path):
    root = tmp_path / "data"
    expected = write_unreadable(root)
    good = write_dicom(root / "train/pid6/study1/view1_frontal.dcm", ramp())
    csv = write_cs156b_csv(root / "student_labels/train2023.csv", [*expected, str(good.relative_to(root))])
    with pytest.warns(UserWarning) as caught:
        cache = dataset.main(["--data-root", str(root), "--image-size", str(S), "--cache-dir", str(tmp_path / "cache"),
                              "--workers", "1"])
    msg = " ".join(str(w.message) for w in caught)
    assert f"{len(expected)} images missing or unreadable" in msg
    for rel, reason in expected.items():
        assert f"{rel} ({reason}" in msg, (rel, msg)
    ok, errors = cache.status()
    assert ok.tolist() == [False] * len(expected) + [True] and all(len(e) <= 200 for e in errors)
    # training drops the same rows with one warning that names them
    dropped = r"dropped 6 rows .*pid1/study1/view1_frontal.dcm \(unreadable \(DICOM without pixel data\)\)"
    with pytest.warns(UserWarning, match=dropped):
        table, _ = cached_table(dataset.read_train_csv(csv), root, S, tmp_path / "cache", "train2023", workers=1,
                                progress=False)
    assert table["path"].tolist() == [str(good.relative_to(root))] and table.attrs["n_bad_images"] == 6


def test_dicom_with_a_codec_not_installed_is_named(tmp_path):
    """JPEG Lossless (Process 14, SV1), common for CR/DX, needs a plugin pydicom lacks by default."""
    if get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    f = tmp_path / "data" / "a.dcm"
    write_dicom(f, ramp())
    ds = dcmread(f)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    ds.save_as(f, enforce_file_format=True)
    cache = build_cache(["a.dcm"], tmp_path / "data", S, tmp_path / "cache", "t", workers=1, progress=False)
    ok, errors = cache.status()
    assert not ok[0] and errors[0].startswith("unreadable (DICOM compressed as JPEG Lossless") \
        and "no decoder installed" in errors[0]


# ---------------------------------------------------------------------------------------------
# end to end: a CS 156b-layout dataset of DICOMs through every script

def test_dicom_dataset_end_to_end(tmp_path):
    """dataset.py builds the cache of a CSV of 12-bit DICOMs (MONOCHROME1 and 2, some windowed,
    one without pixel data); train.py trains on it; make_submission.py predicts a test CSV of
    DICOMs; experiments/saliency.py draws a heatmap of one."""
    import make_submission
    from experiments import saliency
    root, rng = tmp_path / "data", np.random.default_rng(0)
    rels = []
    for p in range(24):
        for view in ("frontal", "lateral")[:1 + p % 3 // 2]:
            rel = f"{'test' if p >= 20 else 'train'}/pid{100 + p}/study1/view1_{view}.dcm"
            write_dicom(root / rel, rng.integers(0, 4096, (48, 40)).astype(np.uint16),
                        "MONOCHROME1" if p % 2 else "MONOCHROME2", bits_stored=12,
                        window=(2048, 3000) if p % 4 == 1 else None)
            rels.append(rel)
    write_dicom(root / "train/pid99/study1/view1_frontal.dcm", None)
    train_rels = [r for r in rels if r.startswith("train")] + ["train/pid99/study1/view1_frontal.dcm"]
    write_cs156b_csv(root / "student_labels/train2023.csv", train_rels)
    test_rels = [r for r in rels if r.startswith("test")]
    pd.DataFrame({"Id": range(7, 7 + len(test_rels)), "Path": test_rels}).to_csv(root / "student_labels/test_ids.csv",
                                                                                  index=False)
    common = ["--data-root", str(root), "--cache-dir", str(tmp_path / "cache")]

    with pytest.warns(UserWarning, match=r"1 images missing or unreadable.*pid99/study1/view1_frontal.dcm "
                                         r"\(unreadable \(DICOM without pixel data\)\)"):
        cache = dataset.main([*common, "--image-size", "32", "--workers", "1"])
    ok, _ = cache.status()
    assert len(cache) == len(train_rels) and ok.sum() == len(train_rels) - 1
    np.testing.assert_array_equal(cache.get([0])[0, 0].numpy(), load_image(root / train_rels[0], 32))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dropped row's warning, checked above
        train.main([*common, "--out-dir", str(tmp_path / "ckpt"), *TINY, "--pathology", "Cardiomegaly"])
    summary = pd.read_json(tmp_path / "ckpt/cardiomegaly/summary.json", typ="series")
    assert summary["n_bad_images"] == 1

    make_submission.main([*common, "--checkpoints", str(tmp_path / "ckpt"), "--out", str(tmp_path / "sub.csv"),
                          "--fill-missing", "0", "--workers", "1", "--no-progress"])
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert sorted(sub["Id"]) == list(range(7, 7 + len(test_rels))) and sub["Cardiomegaly"].between(-1, 1).all()

    results = saliency.main(["--checkpoint", str(tmp_path / "ckpt/cardiomegaly/best.pt"), "--images",
                             str(root / test_rels[0]), "--out", str(tmp_path / "sal"), "--no-progress"])
    assert len(results) == 1 and results[0]["png"].is_file()
    no_pixels = root / "train/pid99/study1/view1_frontal.dcm"
    with pytest.raises(UserError, match=r"view1_frontal.dcm: not a readable image \(DICOM without pixel data\)"):
        saliency.main(["--checkpoint", str(tmp_path / "ckpt/cardiomegaly/best.pt"), "--images", str(no_pixels),
                       "--out", str(tmp_path / "sal2"), "--no-progress"])
