"""Sagittal series loader: sorting, middle slices, affine, metadata, errors, MONAI transforms."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai import transforms as mt
from pydicom.encaps import encapsulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle.errors import BundleInputError, MissingInputError  # noqa: E402
from bundle.io import (  # noqa: E402
    InPlaneSpacingd,
    LoadSagittalSeriesd,
    load_sagittal_series,
    middle_indices,
    pixel_to_patient,
    read_slice_headers,
)
from dicom_fixtures import AXIAL_IOP, make_image, normal_of, save, slice_pattern, write_series  # noqa: E402

OBLIQUE_IOP = (0.0, 0.98, 0.19899748742132, 0.0, 0.19899748742132, -0.98)  # sagittal tilted ~11.5 deg


def test_middle_indices():
    assert middle_indices(11, 7) == [2, 3, 4, 5, 6, 7, 8]
    assert middle_indices(12, 7) == [2, 3, 4, 5, 6, 7, 8]  # middle (12-1)//2 = 5 sits in channel 3
    assert middle_indices(1, 3) == [0, 0, 0]
    assert middle_indices(4, 7) == [0, 0, 0, 1, 2, 3, 3]
    with pytest.raises(ValueError):
        middle_indices(0, 7)


@pytest.mark.parametrize("n_slices", [4, 11, 12])
def test_spatial_sort_and_middle(tmp_path, n_slices):
    paths = write_series(tmp_path / "s", n_slices=n_slices, seed=3)
    img = load_sagittal_series(tmp_path / "s", 7)
    assert img.shape == (7, 32, 40) and img.dtype == torch.float32
    picked = middle_indices(n_slices, 7)
    # slice k holds 100 * (k + 1) + column index; instance numbers are shuffled, so this checks spatial sort
    expected = np.stack([slice_pattern(k, 32, 40) for k in picked]).astype(np.float32)
    np.testing.assert_array_equal(img.numpy(), expected)
    numbers = [h.instance_number for h in read_slice_headers(paths)]
    assert img.meta["instance_numbers"] == [numbers[k] for k in picked]
    assert img.meta["middle_instance_number"] == numbers[(n_slices - 1) // 2]
    assert img.meta["series_num_slices"] == n_slices


def test_sort_ignores_instance_number_and_file_order(tmp_path):
    paths = write_series(tmp_path / "s", n_slices=9, seed=11)
    reversed_list = load_sagittal_series(list(reversed(paths)), 3)
    by_dir = load_sagittal_series(tmp_path / "s", 3)
    np.testing.assert_array_equal(reversed_list.numpy(), by_dir.numpy())
    assert by_dir[1, 0, 0].item() == 100 * (4 + 1)
    assert reversed_list.meta["filename_or_obj"] == str(paths[-1])
    assert by_dir.meta["filename_or_obj"] == str(tmp_path / "s")


@pytest.mark.parametrize("iop", [(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), OBLIQUE_IOP])
def test_affine_convention(tmp_path, iop):
    paths = write_series(tmp_path / "s", n_slices=6, iop=iop, gap=4.5, pixel_spacing=(0.8, 0.7))
    img = load_sagittal_series(tmp_path / "s")
    affine = img.affine.numpy()
    iop = np.asarray(iop)
    n = normal_of(iop)
    np.testing.assert_allclose(affine[:3, 0], 0.8 * iop[3:], atol=1e-9)
    np.testing.assert_allclose(affine[:3, 1], 0.7 * iop[:3], atol=1e-9)
    np.testing.assert_allclose(affine[:3, 2], 4.5 * n, atol=1e-9)
    headers = read_slice_headers(paths)
    middle = headers[(6 - 1) // 2]
    np.testing.assert_allclose(affine[:3, 3], middle.position, atol=1e-6)
    # a pixel (x = col, y = row) of the middle slice: affine @ (row, col, 0) == IPP + x PS1 r + y PS0 c
    x, y = 17.25, 9.5
    np.testing.assert_allclose((affine @ [y, x, 0, 1])[:3], pixel_to_patient(middle, x, y), atol=1e-9)
    # k = +1 is the next slice along the normal
    np.testing.assert_allclose((affine @ [0, 0, 1, 1])[:3], headers[3].position, atol=1e-6)
    assert img.meta["slice_spacing"] == pytest.approx(4.5)
    np.testing.assert_allclose(img.meta["pixel_spacing"], [0.8, 0.7])
    np.testing.assert_array_equal(img.meta["spatial_shape"], [32, 40])
    np.testing.assert_allclose(img.meta["original_affine"], affine)
    assert img.meta["original_channel_dim"] == 0 and img.meta["space"] == "LPS"


def test_single_slice_spacing_falls_back_to_header(tmp_path):
    write_series(tmp_path / "s", n_slices=1)
    img = load_sagittal_series(tmp_path / "s", 7)
    assert img.meta["slice_spacing"] == pytest.approx(4.0)  # SliceThickness of the fixture
    assert torch.equal(img[0], img[6])


def test_no_patient_identity_in_meta(tmp_path):
    write_series(tmp_path / "s", n_slices=3)
    img = LoadSagittalSeriesd(keys="image")({"image": str(tmp_path / "s"), "study_id": "12", "series_id": "34"})[
        "image"
    ]
    text = repr(img.meta)
    for secret in ("Doe", "P-SECRET-1", "19700101", "Secret Hospital"):
        assert secret not in text
    assert img.meta["study_id"] == "12" and img.meta["series_id"] == "34"


def test_transform_keys(tmp_path):
    write_series(tmp_path / "s", n_slices=3)
    out = LoadSagittalSeriesd(keys=["image", "other"], num_slices=3, allow_missing_keys=True)({"image": tmp_path / "s"})
    assert out["image"].shape == (3, 32, 40) and "other" not in out and "study_id" not in out["image"].meta
    with pytest.raises(KeyError):
        LoadSagittalSeriesd(keys=["image", "other"])({"image": tmp_path / "s"})
    with pytest.raises(ValueError):
        LoadSagittalSeriesd(num_slices=0)


def test_rescale_and_monochrome1_applied(tmp_path):
    write_series(tmp_path / "s", n_slices=3, slope=2.0, intercept=5.0, photometric="MONOCHROME1")
    img = load_sagittal_series(tmp_path / "s", 1)
    np.testing.assert_allclose(img[0].numpy(), (4095.0 - slice_pattern(1, 32, 40)) * 2.0 + 5.0)


def test_only_selected_slices_are_decoded(tmp_path):
    """Slices outside the middle 3 have undecodable pixel data: loading must not touch them."""
    paths = write_series(tmp_path / "s", n_slices=9)
    for k in (0, 1, 7, 8):
        ds = pydicom.dcmread(paths[k])
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
        ds.PixelData = encapsulate([b"junk"])
        ds["PixelData"].VR = "OB"
        save(ds, paths[k])
    assert load_sagittal_series(tmp_path / "s", 3)[1, 0, 0].item() == 500
    with pytest.raises(BundleInputError, match=r"\.dcm.*transfer syntax.*JPEG-LS"):
        load_sagittal_series(tmp_path / "s", 7)


@pytest.mark.parametrize(
    "tag, number",
    [("ImagePositionPatient", "0020,0032"), ("ImageOrientationPatient", "0020,0037"), ("PixelSpacing", "0028,0030")],
)
def test_missing_geometry_tag(tmp_path, tag, number):
    paths = write_series(tmp_path / "s", n_slices=3)
    ds = pydicom.dcmread(paths[1])
    delattr(ds, tag)
    save(ds, paths[1])
    with pytest.raises(BundleInputError) as err:
        load_sagittal_series(tmp_path / "s")
    assert paths[1].name in str(err.value) and tag in str(err.value) and number in str(err.value)


def test_non_sagittal_series(tmp_path):
    write_series(tmp_path / "ax", n_slices=3, iop=AXIAL_IOP, series_uid="1.2.3.99")
    with pytest.raises(BundleInputError, match=r"1\.2\.3\.99.*not sagittal.*axial.*ImageOrientationPatient"):
        load_sagittal_series(tmp_path / "ax")


def test_mixed_shapes(tmp_path):
    write_series(tmp_path / "s", n_slices=3, series_uid="1.2.3.7", study_uid="1.2.3")
    ds = make_image(np.zeros((16, 40), np.uint16), ipp=(-30, -60, 40), series_uid="1.2.3.7", study_uid="1.2.3")
    save(ds, tmp_path / "s" / "odd.dcm")
    with pytest.raises(BundleInputError, match=r"1\.2\.3\.7.*mixes image shapes.*\(16, 40\).*\(32, 40\)"):
        load_sagittal_series(tmp_path / "s")


def test_several_series_rejected(tmp_path):
    write_series(tmp_path / "s", n_slices=2, series_uid="1.2.3.1")
    write_series(tmp_path / "s2", n_slices=2, series_uid="1.2.3.2")
    files = sorted((tmp_path / "s").glob("*.dcm")) + sorted((tmp_path / "s2").glob("*.dcm"))
    with pytest.raises(BundleInputError, match=r"2 series.*1\.2\.3\.1.*1\.2\.3\.2"):
        load_sagittal_series(files)


def test_folder_errors(tmp_path):
    with pytest.raises(BundleInputError, match="not found"):
        load_sagittal_series(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleInputError, match="no files"):
        load_sagittal_series(tmp_path / "empty")
    with pytest.raises(BundleInputError, match="empty list"):
        load_sagittal_series([])
    write_series(tmp_path / "s", n_slices=2)
    (tmp_path / "s" / "readme.dcm").write_text("not dicom")
    with pytest.raises(BundleInputError, match="readme.dcm"):
        load_sagittal_series(tmp_path / "s")


@pytest.mark.parametrize("path", ["", "   ", None])
def test_empty_path_never_reads_the_working_directory(tmp_path, monkeypatch, path):
    files = write_series(tmp_path, n_slices=3)  # a valid series in the working directory must not be picked up
    monkeypatch.chdir(tmp_path)
    assert load_sagittal_series(".", 3).shape[0] == 3
    with pytest.raises(BundleInputError, match=r"empty series path .*working directory.*image id") as info:
        LoadSagittalSeriesd(keys="image", num_slices=3)({"image": path})
    assert isinstance(info.value, MissingInputError) and info.value.status_code == 404  # HTTP answer behind a server
    with pytest.raises(BundleInputError, match="empty series path"):
        load_sagittal_series([files[0], path], 3)


def test_missing_path_key_is_named():
    with pytest.raises(KeyError, match="Key `image` of transform `LoadSagittalSeriesd` was missing"):
        LoadSagittalSeriesd(keys="image")({"study_id": "7"})
    assert LoadSagittalSeriesd(keys="image", allow_missing_keys=True)({"study_id": "7"}) == {"study_id": "7"}


def test_non_existent_path_is_named(tmp_path):
    missing = tmp_path / "studies" / "unknown.series"
    with pytest.raises(BundleInputError, match=rf"{missing}: series folder or file not found"):
        LoadSagittalSeriesd(keys="image")({"image": str(missing)})
    write_series(tmp_path / "s", n_slices=2)
    files = sorted((tmp_path / "s").glob("*.dcm")) + [tmp_path / "s" / "gone.dcm"]
    with pytest.raises(BundleInputError, match=r"gone\.dcm: series folder or file not found"):
        LoadSagittalSeriesd(keys="image")({"image": files})


# ---------------------------------------------------------------- MONAI transforms keep the geometry


def _blob_series(folder: Path, centre_rc: tuple[float, float], iop) -> None:
    """Series whose middle slice (index 2 of 5) holds a Gaussian blob at (row, col) = centre_rc."""

    def pixels(k, rows, cols):
        r, c = np.mgrid[0:rows, 0:cols]
        blob = 3000.0 * np.exp(-((r - centre_rc[0]) ** 2 + (c - centre_rc[1]) ** 2) / (2 * 2.0**2))
        return np.round(blob if k == 2 else 0.2 * blob).astype(np.uint16)

    write_series(folder, n_slices=5, rows=48, cols=56, iop=iop, pixel_spacing=(0.9, 0.75), pixel_fn=pixels)


def _centroid(channel: np.ndarray) -> np.ndarray:
    w = np.clip(channel - 0.02 * channel.max(), 0, None)
    r, c = np.mgrid[0 : channel.shape[0], 0 : channel.shape[1]]
    return np.array([(w * r).sum() / w.sum(), (w * c).sum() / w.sum()])


@pytest.mark.parametrize("iop", [(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), OBLIQUE_IOP])
@pytest.mark.parametrize("seed", [0, 1])
def test_points_in_mm_follow_pixels_through_monai_transforms(tmp_path, iop, seed):
    centre = (22.3, 27.6)
    _blob_series(tmp_path / "s", centre, iop)
    data = LoadSagittalSeriesd(keys="image")({"image": str(tmp_path / "s")})
    point_mm = (data["image"].affine.numpy() @ [centre[0], centre[1], 0.0, 1.0])[:3]
    pipeline = mt.Compose(
        [
            mt.ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
            InPlaneSpacingd("image", pixdim=(0.4375, 0.4375)),
            mt.RandFlipd("image", prob=1.0, spatial_axis=1),
            mt.RandZoomd("image", prob=1.0, min_zoom=0.8, max_zoom=1.25, keep_size=True, padding_mode="constant"),
            mt.ResizeWithPadOrCropd("image", (112, 112)),
            mt.RandSpatialCropd("image", (88, 88), random_size=False),
        ]
    )
    pipeline.set_random_state(seed)
    out = pipeline(data)["image"]
    assert out.shape == (7, 88, 88)
    assert abs(float(np.linalg.norm(out.affine.numpy()[:3, 0])) - 0.4375 / 1) < 0.4375 * 0.3  # zoomed spacing
    ijk = np.linalg.solve(out.affine.numpy(), [*point_mm, 1.0])[:3]
    assert abs(ijk[2]) < 1e-6  # still on the middle slice's plane
    np.testing.assert_allclose(ijk[:2], _centroid(out[3].numpy()), atol=0.2)


def test_in_plane_spacing_is_exact(tmp_path):
    write_series(tmp_path / "s", n_slices=3, iop=OBLIQUE_IOP, pixel_spacing=(0.8, 0.7))
    img = load_sagittal_series(tmp_path / "s")
    out = InPlaneSpacingd("image", pixdim=0.4375)({"image": img})["image"]
    a, a0 = out.affine.numpy(), img.affine.numpy()
    np.testing.assert_allclose(np.linalg.norm(a[:3, :2], axis=0), [0.4375, 0.4375], atol=1e-9)
    np.testing.assert_allclose(a[:3, 0] / 0.4375, a0[:3, 0] / 0.8, atol=1e-9)  # directions kept
    np.testing.assert_allclose(a[:3, 2], a0[:3, 2])  # slice axis untouched
    for n_in, n_out, mm in zip((32, 40), out.shape[1:], (0.8, 0.7)):  # same pixel-centre extent, MONAI's rule
        assert abs((n_out - 1) * 0.4375 - (n_in - 1) * mm) <= 0.4375 / 2 + 1e-9


def test_monai_spacingd_cannot_handle_sagittal_affine(tmp_path):
    """Why InPlaneSpacingd exists: MONAI's 2D Spacing uses the affine's world-x/y block, singular here."""
    write_series(tmp_path / "s", n_slices=3)
    img = load_sagittal_series(tmp_path / "s")
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        mt.Spacingd("image", pixdim=(0.4375, 0.4375))({"image": img})


def test_input_errors_pickle_and_render_as_http_answers():
    import pickle

    error = pickle.loads(pickle.dumps(MissingInputError("x.dcm: series folder or file not found")))
    assert type(error) is MissingInputError and str(error) == "x.dcm: series folder or file not found"
    assert (error.status_code, error.detail) == (404, str(error)) and BundleInputError("bad").status_code == 400
    assert isinstance(error, ValueError)


def test_in_plane_spacing_in_float32_matches_float64():
    """The float32 resampling (configs/inference.json) gives the float64 result's (the default's) shape and affine,
    values within 1e-4 of its range, on an oblique sagittal plane with anisotropic pixels."""
    from bundle.io.spacing import InPlaneSpacing
    from monai.data import MetaTensor

    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = [0.0, 0.05, -0.71], [0.02, 0.68, 0.05], [3.5, 0.0, 0.0]
    image = torch.from_numpy(np.random.default_rng(0).gamma(2.0, 300.0, size=(3, 47, 53)).astype(np.float32))
    image = MetaTensor(image, affine=torch.as_tensor(affine))
    fast = InPlaneSpacing((0.4375, 0.4375), dtype=torch.float32)(image)
    exact = InPlaneSpacing((0.4375, 0.4375))(image)
    assert fast.shape == exact.shape and fast.dtype == torch.float32
    assert torch.allclose(fast.affine, exact.affine)
    assert float((fast - exact).abs().max()) <= 1e-4 * float(exact.max() - exact.min())
