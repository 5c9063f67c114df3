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
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEGLosslessSV1, generate_uid)

import dataset
import train
from cache import build_cache, load_image, to_uint8
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
