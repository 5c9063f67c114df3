"""Decoding: every image file becomes uint8 (S, S) grayscale, S = --image-size (load_image).

    JPEG, 8-bit PNG      as PIL decodes them, converted to 'L'; JPEG in draft mode (fast)
    16-bit PNG/TIFF      PIL modes I;16 / I / F, brought to uint8 by to_uint8 (below)
    DICOM (.dcm, .dicom, or any file with the 'DICM' prefix)   decode_dicom: pydicom's modality
                         LUT (RescaleSlope/Intercept), then to_uint8 over the VOI LUT's or the
                         window's range when the file has one; MONOCHROME1 inverted
    then the square mode ('resize' squashes, 'crop' takes the central square), a bilinear resize,
    and --equalize (none, hist, clahe: equalize_image) on the S x S result.
One rule for more than 8 bits (to_uint8): a range [lo, hi] maps linearly onto 0..255, clipped
outside; [lo, hi] is the file's display range (DICOM window or VOI LUT) when it declares one, else
the image's own min..max. Only regular files are opened (open_regular): a FIFO, socket or device
is refused with its kind, never read. A file that cannot be read raises FileNotFoundError,
ImageError (a short reason) or PIL's own error; cache.py records which, per image.
"""
from __future__ import annotations

import os
import stat
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common import EQUALIZE_MODES

# --equalize clahe: OpenCV's CLAHE with the clip limit most chest X-ray entries use (its own default, 40,
# hardly limits) over 8 x 8 tiles. cache.py keys each setting with these: changing them makes a new cache.
CLAHE_CLIP, CLAHE_TILES = 2.0, 8
_WARNINGS = threading.Lock()  # catch_warnings swaps process-wide state: one thread at a time (cache.py checks in threads)


class ImageError(ValueError):
    """A file that is there but holds no image this project can read; the message says why, briefly
    (it goes into the cache's status and the warning that names the image)."""


DICOM_SUFFIXES = (".dcm", ".dicom")
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL modes of 16-bit PNG/TIFF, 32-bit TIFF


def load_image(path: Path, size: int, square: str = "resize", equalize: str = "none") -> np.ndarray:
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
    Then `equalize` (equalize_image). Only a regular file is opened (open_regular).
    Raises FileNotFoundError, ImageError (not a regular file, DICOM without pixel data, missing
    codec, ...) or PIL's own errors for a file that is not an image."""
    with open_regular(path) as f:
        return equalize_image(_square(_decode(f, Path(path), size), size, square), equalize)


def open_regular(path: Path) -> BinaryIO:
    """path opened for binary reading when it is a regular file (or a link to one); otherwise
    ImageError naming what it is: a FIFO would block the reader forever, a device never ends.
    FileNotFoundError when nothing is there."""
    kind = _kind(os.stat(path).st_mode)
    if not kind:  # O_NONBLOCK: a FIFO swapped in since the stat opens at once, and is refused below
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        kind = _kind(os.fstat(fd).st_mode)
        if not kind:
            return os.fdopen(fd, "rb")
        os.close(fd)
    raise ImageError(f"not a regular file: {kind}")


def _kind(mode: int) -> str:
    """'' for a regular file, else what it is ('a FIFO', 'a socket', ...)."""
    if stat.S_ISREG(mode):
        return ""
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _decode(f: BinaryIO, path: Path, size: int) -> Image.Image:
    """The open file f (named path) as a mode 'L' image: full size, or draft-reduced for a JPEG."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return Image.fromarray(decode_dicom(f))
    try:
        im = _open_pil(f, path)
    except UnidentifiedImageError:
        f.seek(0)
        if f.read(132)[128:] != b"DICM":  # DICOM Part 10: 128 bytes of preamble, then 'DICM'
            raise
        f.seek(0)
        return Image.fromarray(decode_dicom(f))
    with im:
        im.draft("L", (size, size))
        return Image.fromarray(to_uint8(np.asarray(im))) if im.mode in WIDE_MODES else im.convert("L")


def _open_pil(f: BinaryIO, path: Path) -> Image.Image:
    """Image.open(f), with PIL's DecompressionBombWarning (more pixels than Image.MAX_IMAGE_PIXELS)
    naming the file, which PIL's own message does not; other warnings pass through unchanged."""
    with _WARNINGS, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = Image.open(f)
    for w in caught:
        bomb = issubclass(w.category, Image.DecompressionBombWarning)
        warnings.warn_explicit(f"{path}: {w.message}" if bomb else w.message, w.category, w.filename, w.lineno)
    return im


def _square(im: Image.Image, size: int, square: str) -> np.ndarray:
    """A mode 'L' image -> uint8 (size, size), by `square` ('resize' or 'crop'; see load_image)."""
    w, h = im.size
    box = None
    if square == "crop":
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    im = im.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(im, dtype=np.uint8)


def equalize_image(image: np.ndarray, mode: str) -> np.ndarray:
    """--equalize on one uint8 (S, S) image -> uint8 (S, S). 'none': unchanged. 'hist': PIL's
    ImageOps.equalize (global histogram equalisation). 'clahe': OpenCV's contrast-limited adaptive
    equalisation (cv2.createCLAHE, CLAHE_CLIP, CLAHE_TILES x CLAHE_TILES tiles), the preprocessing of
    many CheXpert entries. Applied to the S x S image the cache stores, so its cost does not grow
    with the source's resolution. Well-kept libraries' implementations, not hand-written ones."""
    if mode == "none":
        return image
    if mode == "hist":
        return np.asarray(ImageOps.equalize(Image.fromarray(image)), dtype=np.uint8)
    if mode == "clahe":
        import cv2  # opencv-python-headless (requirements.txt); build_cache checks it is installed first
        cv2.setNumThreads(1)  # one small image per call, in parallel processes: its own threads would only contend
        return cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(CLAHE_TILES, CLAHE_TILES)).apply(image)
    raise ValueError(f"unknown equalization {mode!r} (choose from {', '.join(EQUALIZE_MODES)})")


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


def decode_dicom(source: Path | BinaryIO) -> np.ndarray:
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

    `source` is a path or a file open for binary reading. A file that is not DICOM, has no pixel
    data, is compressed with a codec no installed pydicom plugin decodes, or holds several frames or
    colour, raises ImageError saying which."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
    except ImportError as e:
        raise ImageError("DICOM needs pydicom: pip install pydicom") from e
    try:
        ds = pydicom.dcmread(source)
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
