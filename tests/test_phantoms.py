"""Tests of the embedded phantom data set (bundle.phantoms): DICOM content, layouts, labels vs pixels."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from bundle.errors import BundleInputError
from bundle.phantoms import PHI_MARKER, RSNA_CONDITIONS, check_class_frequencies, generate_phantoms, phantom_study
from bundle.phantoms.anatomy import DISC_NAMES
from bundle.phantoms.render import render_series
from bundle.streams import RSNA_LEVELS, TIANCHI_DISC_LEVELS, TIANCHI_VERTEBRA_LEVELS

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(min_size=128, max_size=160)
RICH = {"stenosis": (0.4, 0.2, 0.4), "disc": (0.5, 0.5), "vertebra": (0.5, 0.5)}


def _decode(ds) -> np.ndarray:
    """Rescaled pixel values, MONOCHROME1 inverted so that bright = high signal."""
    a = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return -a if ds.PhotometricInterpretation == "MONOCHROME1" else a


def _geometry(ds):
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    ps = np.array([float(v) for v in ds.PixelSpacing])
    return ipp, iop[:3], iop[3:], np.cross(iop[:3], iop[3:]), ps


def _pixel_mm(ds) -> np.ndarray:
    """Patient mm of every pixel centre, (rows, cols, 3)."""
    ipp, c, r, _, ps = _geometry(ds)
    j = np.arange(ds.Columns)[None, :, None]
    i = np.arange(ds.Rows)[:, None, None]
    return ipp + j * ps[1] * c + i * ps[0] * r


def _project(point, ds) -> tuple[np.ndarray, float]:
    """Projection of a patient-mm point on the slice plane of ``ds`` and its distance to the plane."""
    ipp, _, _, n, _ = _geometry(ds)
    d = float((point - ipp) @ n)
    return point - d * n, d


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def rsna_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("rsna") / "set"
    generate_phantoms(out, "rsna", studies=6, seed=3, class_frequencies=RICH, **SMALL)
    return out


@pytest.fixture(scope="module")
def tianchi_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("tianchi") / "set"
    generate_phantoms(out, "tianchi", studies=5, seed=4, class_frequencies=RICH, **SMALL)
    return out


def _tianchi_studies() -> list:
    return [phantom_study(4, i, "tianchi", class_frequencies=RICH, **SMALL) for i in range(5)]


def _studies_by_id(seed: int, n: int, layout: str = "rsna") -> dict[str, object]:
    studies = (phantom_study(seed, i, layout, class_frequencies=RICH, **SMALL) for i in range(n))
    return {str(s.study_id): s for s in studies}


# ---------------------------------------------------------------- DICOM content
def test_dicom_files_are_mr_storage_with_geometry_and_phi(rsna_set, tianchi_set):
    files = sorted(rsna_set.rglob("*.dcm")) + sorted(tianchi_set.rglob("*.dcm"))
    assert len(files) > 100
    photometric, slopes, intercepts = set(), set(), set()
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert (ds.BitsAllocated, ds.PixelRepresentation, ds.SamplesPerPixel) == (16, 0, 1)
        assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.shape == (ds.Rows, ds.Columns)
        for key in ("PatientName", "PatientID", "InstitutionName"):
            assert PHI_MARKER in str(ds.data_element(key).value)
        assert ds.PatientBirthDate and ds.StudyDate and ds.SeriesDescription and ds.SeriesNumber
        _, c, r, n, ps = _geometry(ds)
        assert abs(c @ r) < 1e-5 and abs(np.linalg.norm(c) - 1) < 1e-5 and abs(np.linalg.norm(r) - 1) < 1e-5
        if abs(n[0]) > 0.75:  # sagittal: columns ~ posterior (+y), rows ~ feet (-z), oblique < 8.5 degrees
            assert c[1] > np.cos(np.deg2rad(8.5)) and -r[2] > np.cos(np.deg2rad(8.5))
            assert 3.5 <= float(ds.SpacingBetweenSlices) <= 5.0 and 3.5 <= float(ds.SliceThickness) <= 5.0
        else:  # axial: columns towards patient left, rows posterior, tilted along the disc (RSNA) or not
            assert list(c) == [1, 0, 0] and r[0] == 0 and r[1] > np.cos(np.deg2rad(40))
            if ds.SeriesDescription == "T2_TRA":
                assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        photometric.add(ds.PhotometricInterpretation)
        slopes.add(float(ds.RescaleSlope))
        intercepts.add(float(ds.RescaleIntercept))
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert slopes == {1.0, 2.0} and intercepts == {0.0, -1024.0}


def test_default_geometry_ranges_ids_and_class_coverage():
    """40 default studies (no rendering): spacing, sizes, slices, ids, extra series and every class present."""
    studies = [phantom_study(11, i, "rsna") for i in range(40)]
    seen = {"stenosis": set(), "disc": set(), "vertebra": set()}
    shuffled = extra = nonsquare = 0
    for st in studies:
        extra += len(st.series) > 1
        if not st.has_sagittal_t2:  # a few percent in the full RSNA layout (tests/test_phantoms_full.py)
            continue
        g = st.sagittal_t2.geometry
        assert 0.4 <= g.pixel_spacing[0] <= 0.9 and g.pixel_spacing[0] == g.pixel_spacing[1]
        assert 11 <= g.num_slices <= 17 and 256 <= g.rows <= 512 and 256 <= g.cols <= 512
        assert 3.5 <= g.slice_thickness <= g.slice_spacing <= 5.0
        nonsquare += g.rows != g.cols
        inst = np.array(st.sagittal_t2.instance_numbers)
        assert sorted(inst) == list(range(1, g.num_slices + 1))
        shuffled += not (np.all(np.diff(inst) == 1) or np.all(np.diff(inst) == -1))
        for key, values in st.labels().items():
            seen[key] |= set(values.values())
        # the middle slice is (within one slice) the closest to the mid-sagittal plane at L3-L4
        mid = st.sagittal_t2.middle
        assert abs(g.nearest_slice(st.keypoints_mm()["disc"]["L3-L4"]) - mid) <= 1
    assert seen["stenosis"] == {"Normal/Mild", "Moderate", "Severe"}
    assert seen["disc"] == seen["vertebra"] == {"Normal", "Degenerative"}
    assert shuffled >= 5 and nonsquare >= 5 and extra >= 36
    ids = [st.study_id for st in studies]
    assert len(set(ids)) == 40 and any(i > 2**31 for i in ids) and any(i < 2**31 for i in ids)
    series_ids = [s.series_id for st in studies for s in st.series]
    assert len(set(series_ids)) == len(series_ids)


def test_class_frequencies_validation_and_effect():
    assert check_class_frequencies({"disc": [1, 3]})["disc"] == (0.25, 0.75)
    with pytest.raises(ValueError, match="unknown key"):
        check_class_frequencies({"foo": [1, 0]})
    with pytest.raises(ValueError, match="needs 3 values"):
        check_class_frequencies({"stenosis": [1, 0]})
    with pytest.raises(ValueError, match="non-negative"):
        check_class_frequencies({"vertebra": [-1, 2]})
    st = phantom_study(0, 1, class_frequencies={"stenosis": [0, 0, 1], "disc": [1, 0]})
    assert set(st.labels()["stenosis"].values()) == {"Severe"}
    assert set(st.labels()["disc"].values()) == {"Normal"} and set(st.spine.disc_tags) == {"v1"}
    with pytest.raises(ValueError, match="layout"):
        phantom_study(0, 0, "kaggle")
    with pytest.raises(ValueError, match="min_size"):
        phantom_study(0, 0, min_size=300, max_size=200)


# ---------------------------------------------------------------- layouts
def test_rsna_layout_tables(rsna_set):
    train = _read_csv(rsna_set / "train.csv")
    with open(rsna_set / "train.csv") as f:
        header = f.readline().strip().split(",")
    levels = [lv.lower().replace("/", "_") for lv in RSNA_LEVELS]
    assert header == ["study_id"] + [f"{c}_{lv}" for c in RSNA_CONDITIONS for lv in levels]
    coords = _read_csv(rsna_set / "train_label_coordinates.csv")
    series = _read_csv(rsna_set / "train_series_descriptions.csv")
    spinal = [row for row in coords if row["condition"] == "Spinal Canal Stenosis"]
    assert len(train) == 6 and len(spinal) == 30 and len(coords) > 100
    studies = _studies_by_id(3, 6)
    for row in train:
        st = studies[row["study_id"]]
        assert [row[f"spinal_canal_stenosis_{lv}"] for lv in levels] == list(st.labels()["stenosis"].values())
        assert all(
            row[f"{c}_{lv}"] == st.grades()[c][lv2] for c in RSNA_CONDITIONS for lv, lv2 in zip(levels, RSNA_LEVELS)
        )
    for row in spinal:
        assert row["level"] in RSNA_LEVELS
        assert len(row["x"].split(".")[1]) == 2 and len(row["y"].split(".")[1]) == 2
        desc = {(s["study_id"], s["series_id"]): s["series_description"] for s in series}
        carrier = "Sagittal T2/STIR" if studies[row["study_id"]].has_sagittal_t2 else "Sagittal T1"
        assert desc[(row["study_id"], row["series_id"])] == carrier
        folder = rsna_set / "train_images" / row["study_id"] / row["series_id"]
        assert (folder / f"{row['instance_number']}.dcm").is_file()
    for s in series:
        folder = rsna_set / "train_images" / s["study_id"] / s["series_id"]
        files = sorted(folder.glob("*.dcm"))
        assert files and s["series_description"] in ("Sagittal T2/STIR", "Sagittal T1", "Axial T2")
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            assert f.name == f"{ds.InstanceNumber}.dcm" and ds.SeriesDescription == s["series_description"]


def test_tianchi_layout_annotation(tianchi_set):
    ann = json.loads((tianchi_set / "lumbar_train_annotation.json").read_text())
    assert len(ann) == 5
    studies = {s.study_uid: s for s in _tianchi_studies()}
    for item in ann:
        st = studies[item["studyUid"]]
        folder = tianchi_set / "lumbar_train" / f"study{st.index}"
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("image*.dcm"))]
        descs = {h.SeriesDescription for h in headers}
        assert len(descs) == 3 and len(descs & {"T1_SAG", "SAG T1 FSE"}) == 1 and "T2_TRA" in descs
        d = item["data"][0]
        sag = sorted(
            (h for h in headers if h.SeriesInstanceUID == d["seriesUid"]),
            key=lambda h: np.array([float(v) for v in h.ImagePositionPatient]) @ _geometry(h)[3],
        )
        middle = sag[(len(sag) - 1) // 2]
        assert d["instanceUid"] == middle.SOPInstanceUID and "T2" in middle.SeriesDescription.upper()
        points = d["annotation"][0]["data"]["point"]
        assert d["annotation"][0]["annotator"] == 0 and len(points) == 11
        names = sorted(p["tag"]["identification"] for p in points)
        assert names == sorted(TIANCHI_DISC_LEVELS + TIANCHI_VERTEBRA_LEVELS)
        for p in points:
            assert p["zIndex"] == middle.InstanceNumber and all(isinstance(v, int) for v in p["coord"])
            tag = p["tag"]
            if tag["identification"] in TIANCHI_VERTEBRA_LEVELS:
                assert tag["vertebra"] in ("v1", "v2")
            else:
                assert set(tag["disc"].split(",")) <= {"v1", "v2", "v3", "v4", "v5"}
        # file names are not in series or spatial order
        series_of = [h.SeriesInstanceUID for h in headers]
        assert series_of != sorted(series_of, key=series_of.index)


# ---------------------------------------------------------------- labels vs pixels
def test_rsna_points_map_to_ground_truth(rsna_set):
    studies = _studies_by_id(3, 6)
    for row in _read_csv(rsna_set / "train_label_coordinates.csv"):
        folder = rsna_set / "train_images" / row["study_id"] / row["series_id"]
        ds = pydicom.dcmread(folder / f"{row['instance_number']}.dcm", stop_before_pixels=True)
        ipp, c, r, n, ps = _geometry(ds)
        mm = ipp + float(row["x"]) * ps[1] * c + float(row["y"]) * ps[0] * r
        st = studies[row["study_id"]]
        if row["condition"] == "Spinal Canal Stenosis":
            truth = st.keypoints_mm()["canal"][row["level"]]
        else:
            truth = st.condition_points_mm()[row["condition"].lower().replace(" ", "_")][row["level"]]
        proj, dist = _project(truth, ds)
        assert np.linalg.norm(mm - proj) <= 0.5 * ps[0]
        # the labelled instance is the slice closest to the 3D point (axial blocks: gap = thickness)
        others = [abs(_project(truth, pydicom.dcmread(f, stop_before_pixels=True))[1]) for f in folder.glob("*.dcm")]
        gap = float(ds.get("SpacingBetweenSlices", ds.SliceThickness))
        assert abs(dist) == pytest.approx(min(others)) and abs(dist) <= 0.5 * gap + 1e-6


def test_tianchi_points_map_to_ground_truth_and_disc_intensity(tianchi_set):
    ann = json.loads((tianchi_set / "lumbar_train_annotation.json").read_text())
    studies = {s.study_uid: s for s in _tianchi_studies()}
    n_normal = n_degenerate = 0
    for item in ann:
        st = studies[item["studyUid"]]
        uid = item["data"][0]["instanceUid"]
        files = (tianchi_set / "lumbar_train" / f"study{st.index}").glob("*.dcm")
        ds = next(d for d in map(pydicom.dcmread, files) if d.SOPInstanceUID == uid)
        img = _decode(ds)
        ipp, c, r, _, ps = _geometry(ds)
        truth = st.keypoints_mm()
        value = {}
        for p in item["data"][0]["annotation"][0]["data"]["point"]:
            lv, (x, y) = p["tag"]["identification"], p["coord"]
            kind = "vertebra" if "vertebra" in p["tag"] else "disc"
            proj, _ = _project(truth[kind][lv], ds)
            exact = np.array([(proj - ipp) @ c / ps[1], (proj - ipp) @ r / ps[0]])
            assert np.all(np.abs(exact - [x, y]) <= 0.5 + 1e-6)
            value[lv] = img[y, x - 1 : x + 2].mean()  # 1 x 3 pixels across the disc / body centre
        for i, lv in enumerate(TIANCHI_DISC_LEVELS[1:], start=1):  # discs with a labelled body above and below
            above = value[TIANCHI_VERTEBRA_LEVELS[i - 1]]
            below = value[TIANCHI_VERTEBRA_LEVELS[i]] if i < 5 else above
            bodies = 0.5 * (above + below)
            if st.spine.disc_labels[i]:
                n_degenerate += 1
                assert value[lv] < 0.75 * bodies, (st.index, lv)
            else:
                n_normal += 1
                assert value[lv] > 1.3 * bodies, (st.index, lv)
    assert n_normal > 0 and n_degenerate > 0


def test_severe_stenosis_has_little_csf(rsna_set):
    """Mean CSF signal in the normal canal region at a Severe level is far below that of a Normal level."""
    studies = _studies_by_id(3, 6)
    pairs = 0
    for sid, st in studies.items():
        sag = st.sagittal_t2
        classes = st.spine.stenosis
        if 2 not in classes or 0 not in classes:
            continue
        m = sag.middle
        ds = pydicom.dcmread(rsna_set / "train_images" / sid / str(sag.series_id) / f"{sag.instance_numbers[m]}.dcm")
        img = _decode(ds)
        xyz = _pixel_mm(ds)
        s, u, dx = st.spine.coords(xyz[..., 0], xyz[..., 1], xyz[..., 2])
        means = {}
        for level, cls in zip(RSNA_LEVELS, classes):
            sc = st.spine.disc_s[DISC_NAMES.index(level.replace("/", "-"))]
            ant, post, _, _ = st.spine.canal_range(sc)
            region = (np.abs(s - sc) < 2.0) & (u > ant + 1.0) & (u < post - 1.0) & (np.abs(dx) < 6.0)
            assert region.sum() >= 3, (sid, level)
            means.setdefault(cls, []).append(img[region].mean())
        background = np.percentile(img, 1)  # air
        normal, severe = min(means[0]) - background, max(means[2]) - background
        assert normal > 2.0 * severe, (sid, means)
        pairs += 1
    assert pairs >= 1


def test_t1_and_t2_contrast():
    """CSF is brighter than marrow on T2 and darker on T1 (rendered signal at the canal point)."""
    st = phantom_study(5, 0, "tianchi", **SMALL)
    kp = st.keypoints_mm()
    for ser in st.series[:2]:
        g = ser.geometry
        img = render_series(st.spine, g, ser.contrast, np.random.default_rng(0))
        ratios = []
        for lv in ("L2/L3", "L3/L4"):
            k = g.nearest_slice(kp["canal"][lv])
            x, y, _ = g.to_pixel(kp["canal"][lv], k)
            bx, by, _ = g.to_pixel(kp["vertebra"]["L3"], k)
            ratios.append(img[k, round(y), round(x)] / img[k, round(by), round(bx)])
        if st.spine.stenosis[1] == 0 and st.spine.stenosis[2] == 0:
            assert (min(ratios) > 1.5) if ser.contrast == "T2" else (max(ratios) < 0.6)


# ---------------------------------------------------------------- determinism and folder safety
def test_deterministic_bytes_and_parallel_workers(tmp_path):
    a = generate_phantoms(tmp_path / "a", "tianchi", studies=2, seed=9, min_size=64, max_size=96)
    b = generate_phantoms(tmp_path / "b", "tianchi", studies=2, seed=9, min_size=64, max_size=96, workers=2)
    c = generate_phantoms(tmp_path / "c", "tianchi", studies=2, seed=10, min_size=64, max_size=96)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "lumbar_train_annotation.json").read_bytes() != (c / "lumbar_train_annotation.json").read_bytes()
    # rewriting the same set in place is allowed and gives the same bytes
    before = {rel: (a / rel).read_bytes() for rel in files_a}
    generate_phantoms(a, "tianchi", studies=2, seed=9, min_size=64, max_size=96)
    assert all((a / rel).read_bytes() == data for rel, data in before.items())


def test_refuses_foreign_or_stale_folders(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(BundleInputError, match="does not look like"):
        generate_phantoms(user, "rsna", studies=1, min_size=64, max_size=64)
    assert (user / "notes.txt").read_text() == "mine" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleInputError, match="not a folder"):
        generate_phantoms(tmp_path / "file", "rsna", studies=1)
    prev = generate_phantoms(tmp_path / "prev", "rsna", studies=2, seed=1, min_size=64, max_size=64)
    with pytest.raises(BundleInputError, match="does not look like"):
        generate_phantoms(prev, "tianchi", studies=1, min_size=64, max_size=64)
    n_files = len(list(prev.rglob("*")))
    with pytest.raises(BundleInputError, match="would not overwrite"):
        generate_phantoms(prev, "rsna", studies=2, seed=2, min_size=64, max_size=64)
    assert len(list(prev.rglob("*"))) == n_files
    generate_phantoms(prev, "rsna", studies=3, seed=1, min_size=64, max_size=64)  # a superset is fine
    assert len(_read_csv(prev / "train.csv")) == 3


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    script = ROOT / "scripts" / "make_phantoms.py"
    args = [
        "--layout",
        "rsna",
        "--out",
        str(out),
        "--studies",
        "1",
        "--seed",
        "0",
        "--size-range",
        "64",
        "80",
        "--normal-fraction",
        "0.5",
    ]
    res = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr  # runs from any working directory
    assert (out / "train.csv").is_file() and list(out.rglob("*.dcm"))
    # error path in-process (a second interpreter start would only cost time)
    spec = importlib.util.spec_from_file_location("make_phantoms", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli._frequencies(0.5)["stenosis"] == pytest.approx([0.5, 0.5 * 0.13 / 0.2, 0.5 * 0.07 / 0.2])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("keep")
    assert cli.main(args[:3] + [str(tmp_path / "other")] + args[4:]) == 2
    assert "does not look like" in capsys.readouterr().err
    assert (tmp_path / "other" / "x.txt").read_text() == "keep"
