"""Pixel decoding on pydicom's own test files (offline, pydicom-data) and on hand-made encodings."""

from __future__ import annotations

import inspect
import io
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle.errors import BundleInputError  # noqa: E402
from bundle.io import read_dicom_pixels, read_header  # noqa: E402
from dicom_fixtures import make_image, save  # noqa: E402


def _testfile(name: str) -> str:
    """Path of a pydicom test file, never downloading (pydicom-data ships the external ones)."""
    from pydicom.data import get_testdata_file

    kwargs = {"download": False} if "download" in inspect.signature(get_testdata_file).parameters else {}
    path = get_testdata_file(name, **kwargs)
    assert path is not None, f"{name} is not available offline"
    return str(path)


def plugin_decode(name: str) -> np.ndarray | None:
    """pydicom's own decode, or None when the installed plugins cannot decode the file."""
    try:
        return pydicom.dcmread(_testfile(name)).pixel_array
    except Exception:
        return None


@pytest.mark.parametrize(
    "variant, reference",
    [
        ("MR_small_bigendian.dcm", "MR_small.dcm"),  # explicit VR big endian
        ("MR_small_expb.dcm", "MR_small.dcm"),
        ("MR_small_implicit.dcm", "MR_small.dcm"),
        ("MR_small_padded.dcm", "MR_small.dcm"),
        ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE lossless (pylibjpeg-rle or numpy)
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 lossless (pylibjpeg-openjpeg)
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # JPEG 2000 reversible, 16-bit MR
        ("emri_small_RLE.dcm", "emri_small.dcm"),  # multi-frame RLE
        ("emri_small_big_endian.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ],
)
def test_encodings_equal_uncompressed_reference(variant, reference):
    got = read_dicom_pixels(_testfile(variant))
    ref_ds = pydicom.dcmread(_testfile(reference))
    expected = ref_ds.pixel_array.astype(np.float64) * float(getattr(ref_ds, "RescaleSlope", 1) or 1) + float(
        getattr(ref_ds, "RescaleIntercept", 0) or 0
    )
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected.astype(np.float32))


def test_mr_small_values_and_shape():
    ds = pydicom.dcmread(_testfile("MR_small.dcm"))
    got = read_dicom_pixels(_testfile("MR_small.dcm"))
    assert got.shape == (64, 64)
    np.testing.assert_array_equal(got, ds.pixel_array.astype(np.float32))


def test_deflate_pydicom_file_matches_plain_decode():
    got = read_dicom_pixels(_testfile("image_dfl.dcm"))
    assert got.shape == (512, 512)
    np.testing.assert_array_equal(got, pydicom.dcmread(_testfile("image_dfl.dcm")).pixel_array.astype(np.float32))


def test_deflate_round_trip(tmp_path):
    pixels = (np.arange(32 * 40).reshape(32, 40) * 3 % 4000).astype(np.uint16)
    ds = make_image(pixels, ipp=(0, 0, 0), series_uid="1.2.3", study_uid="1.2.4")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
    path = save(ds, tmp_path / "deflated.dcm")
    assert pixels.tobytes() not in path.read_bytes()  # the data set really is deflated
    np.testing.assert_array_equal(read_dicom_pixels(path), pixels.astype(np.float32))


def test_jpeg_baseline_greyscale(tmp_path):
    """8-bit greyscale JPEG baseline (Pillow decodes it): equals the JPEG stream's own decode."""
    pixels = ((np.arange(32)[:, None] * 5 + np.arange(40)[None, :] * 3) % 250).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    ds = make_image(pixels.astype(np.uint16), ipp=(0, 0, 0), series_uid="1.2.3", study_uid="1.2.4")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG Baseline (Process 1)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path / "jpeg_baseline.dcm")
    got = read_dicom_pixels(path)
    np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(buf.getvalue()))).astype(np.float32))
    assert np.abs(got - pixels).max() <= 8  # lossy, but close to the source


@pytest.mark.parametrize(
    "name, reference",
    [
        ("JPEG-LL.dcm", None),  # JPEG lossless process 14: needs pylibjpeg-libjpeg or gdcm
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", None),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS: needs pylibjpeg-libjpeg / pyjpegls / gdcm
        ("JPEG-lossy.dcm", None),  # 12-bit JPEG extended: Pillow cannot, libjpeg could
    ],
)
def test_jpeg_family_decodes_or_fails_clearly(name, reference):
    """With the installed plugins these decode exactly like pydicom, or fail with a clear error."""
    expected = plugin_decode(name)
    if expected is None:
        with pytest.raises(BundleInputError) as err:
            read_dicom_pixels(_testfile(name))
        message = str(err.value)
        assert name in message and "transfer syntax" in message
        assert "JPEG" in message and "1.2.840.10008.1.2.4." in message  # name and UID of the syntax
    else:
        np.testing.assert_array_equal(read_dicom_pixels(_testfile(name)), expected.astype(np.float32))
        if reference is not None:
            np.testing.assert_array_equal(expected, pydicom.dcmread(_testfile(reference)).pixel_array)


def test_undecodable_syntax_is_clear_error(tmp_path):
    """A stream no plugin can read (JPEG-LS UID, junk bytes) gives BundleInputError, not a pydicom traceback."""
    ds = make_image(np.zeros((8, 8), np.uint16), ipp=(0, 0, 0), series_uid="1.2.3", study_uid="1.2.4")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    ds.PixelData = encapsulate([b"\xff\xd8 not a codestream \xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = save(ds, tmp_path / "junk_jls.dcm")
    with pytest.raises(BundleInputError, match=r"junk_jls\.dcm.*JPEG-LS.*1\.2\.840\.10008\.1\.2\.4\.80"):
        read_dicom_pixels(path)


def test_truncated_pixel_data_is_clear_error():
    with pytest.raises(BundleInputError, match="MR_truncated.dcm"):
        read_dicom_pixels(_testfile("MR_truncated.dcm"))


def test_colour_image_rejected():
    with pytest.raises(BundleInputError, match="colour image.*RGB"):
        read_dicom_pixels(_testfile("SC_rgb.dcm"))


def test_non_dicom_and_missing_files(tmp_path):
    junk = tmp_path / "notes.dcm"
    junk.write_text("this is not a DICOM file at all")
    with pytest.raises(BundleInputError, match="notes.dcm"):
        read_dicom_pixels(junk)
    with pytest.raises(BundleInputError, match="notes.dcm"):
        read_header(junk)
    with pytest.raises(BundleInputError, match="missing.dcm.*not found"):
        read_dicom_pixels(tmp_path / "missing.dcm")


def test_rescale_and_monochrome1(tmp_path):
    pixels = np.array([[0, 1, 100], [4095, 7, 8]], dtype=np.uint16)
    common = dict(ipp=(0, 0, 0), series_uid="1.2.3", study_uid="1.2.4")
    plain = save(make_image(pixels, slope=2.0, intercept=-10.0, **common), tmp_path / "m2.dcm")
    np.testing.assert_array_equal(read_dicom_pixels(plain), pixels * 2.0 - 10.0)
    inverted = save(make_image(pixels, photometric="MONOCHROME1", **common), tmp_path / "m1.dcm")
    # 12 bits stored: v -> 4095 - v, so the brightest displayed pixel has the highest value
    np.testing.assert_array_equal(read_dicom_pixels(inverted), 4095.0 - pixels)
