"""Acquisition artefacts of the realistic phantom profile, a missing or duplicated sagittal slice, and the readers
on such series: a duplicate is kept once (the lowest InstanceNumber), a gap keeps the slices on the grid of their
positions, both logged naming the series; labels on a dropped duplicate still resolve, labels on a missing
instance are reported naming the row and the file."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
from bundle.errors import BundleInputError
from bundle.io.axial import nearest_axial_slices, parallel_blocks
from bundle.io.dicom_series import list_dicom_files, pixel_to_patient, read_slice_headers, sort_series
from bundle.io.loader import load_sagittal_series
from bundle.io.rsna import build_rsna_datalist
from bundle.io.sagittal_t1 import DEFAULT_FORAMEN_OFFSET_MM, load_foramen_slabs
from bundle.phantoms import generate_phantoms, phantom_study
from bundle.phantoms.profiles import REALISTIC
from bundle.skipping import SKIPPED_KEY

_SIZE = dict(min_size=48, max_size=64)


def _first_set(kind: str, series: str, where=lambda st, ser: True) -> tuple[int, object, object]:
    """Seed of the first one-study realistic RSNA set whose first ``series`` ("sag_t2"|"sag_t1") has a ``kind``
    ("missing"|"duplicate") slice (and satisfies ``where(study, series)``), its phantom study and that series."""
    for seed in range(400):
        st = phantom_study(seed, 0, "rsna", profile="realistic", **_SIZE)
        found = st.series_of(series)
        if found and getattr(found[0], kind) >= 0 and where(st, found[0]):
            return seed, st, found[0]
    raise AssertionError(f"no {kind} slice in 400 sets")


def _write(tmp_path, kind: str, series: str = "sag_t2", where=lambda st, ser: True):
    """A written one-study set with that artefact: (set folder, phantom study, the series' folder)."""
    seed, st, ser = _first_set(kind, series, where)
    out = generate_phantoms(tmp_path / f"{kind}_{series}", "rsna", 1, seed, profile="realistic", **_SIZE)
    return out, st, out / "train_images" / str(st.study_id) / str(ser.series_id)


def test_slice_artefact_rates_over_200_studies_avoid_labelled_middle_and_edge_slices():
    counts, total, axial = {"missing": 0, "duplicate": 0}, 0, 0
    for i in range(200):
        st = phantom_study(1, i, "rsna", profile="realistic", **_SIZE)
        labelled = {(s, inst) for s, inst, *_ in st.label_rows()}
        for ser in st.series:
            n = ser.geometry.num_slices
            total += 1
            axial += ser.kind == "ax_t2" and (ser.missing >= 0 or ser.duplicate >= 0)
            assert ser.missing < 0 or ser.duplicate < 0  # at most one artefact per series
            for kind in counts:
                k = getattr(ser, kind)
                if k >= 0:
                    counts[kind] += 1
                    assert (
                        0 < k < n - 1 and k != ser.middle and (ser.series_id, ser.instance_numbers[k]) not in labelled
                    )
            files = ser.files
            assert len(files) == n - (ser.missing >= 0) + (ser.duplicate >= 0)
            assert [k for k, _ in files] == sorted(k for k, _ in files)
    for kind, rate in (("missing", REALISTIC.missing_slice_rate), ("duplicate", REALISTIC.duplicate_slice_rate)):
        assert 0.25 * rate * total <= counts[kind] <= 2.0 * rate * total, (kind, counts, total)
    assert axial > 0  # axial series carry them too
    easy = phantom_study(1, 0, "rsna", **_SIZE)
    assert all(ser.missing == ser.duplicate == -1 for ser in easy.series)


def test_duplicated_slice_is_read_once_keeping_the_lowest_instance(tmp_path, caplog):
    out, st, folder = _write(tmp_path, "duplicate")
    ser = st.sagittal_t2
    k = ser.duplicate
    files = list_dicom_files(folder)
    assert len(files) == ser.geometry.num_slices + 1
    with caplog.at_level(logging.WARNING):
        series = sort_series(read_slice_headers(files))
    assert [h.instance_number for h in series.duplicates] == [ser.duplicate_instance]
    assert [h.instance_number for h in series.slices] == list(ser.instance_numbers)  # the original kept
    assert list(series.grid) == list(range(ser.geometry.num_slices))
    assert ser.series_uid in caplog.text and "1 position(s) hold several instances" in caplog.text
    assert (
        f"kept instance {ser.instance_numbers[k]} " in caplog.text
        and f"dropped {ser.duplicate_instance} (" in caplog.text
    )
    # the same choice whatever the file order
    again = sort_series(read_slice_headers(files[::-1]))
    assert [h.path for h in again.slices] == [h.path for h in series.slices]
    # the loaded slab is that of the series without the second file
    img = load_sagittal_series(folder, num_slices=ser.geometry.num_slices)
    (folder / f"{ser.duplicate_instance}.dcm").unlink()
    ref = load_sagittal_series(folder, num_slices=ser.geometry.num_slices)
    assert np.array_equal(img.numpy(), ref.numpy()) and np.allclose(img.affine, ref.affine)


def test_missing_slice_is_a_gap_and_the_geometry_follows_the_positions(tmp_path, caplog):
    out, st, folder = _write(tmp_path, "missing")
    ser = st.sagittal_t2
    g, gone, n = ser.geometry, ser.missing, ser.geometry.num_slices
    with caplog.at_level(logging.WARNING):
        series = sort_series(read_slice_headers(list_dicom_files(folder)))
    assert len(series.slices) == n - 1 and ser.series_uid in caplog.text and "gap" in caplog.text
    assert list(series.grid) == [k for k in range(n) if k != gone]
    assert series.slice_spacing == pytest.approx(float(np.linalg.norm(g.positions[1] - g.positions[0])), abs=1e-3)
    # the middle slice is the phantom's middle (not the (S - 1) // 2-th file); the slab skips nothing in space
    assert np.allclose(series.slices[series.middle].position, g.positions[ser.middle], atol=1e-3)
    img = load_sagittal_series(folder, num_slices=n)
    meta_instances = list(img.meta["instance_numbers"])
    expected = [ser.instance_numbers[k if k != gone else gone - 1] for k in range(n)]  # lower neighbour on ties
    assert meta_instances == expected
    assert np.allclose(img.affine[:3, 3].numpy(), g.positions[ser.middle], atol=1e-3)
    # every label keeps its instance: the datalist places the points where the phantom put them
    item = build_rsna_datalist(out)[0]
    truth = st.keypoints_mm()["canal"]
    for level, mm in zip(truth, item["keypoints"]["disc"]["mm"]):
        normal = np.asarray(g.dirs(ser.middle)[2])
        in_plane = np.asarray(mm) - truth[level] - ((np.asarray(mm) - truth[level]) @ normal) * normal
        assert np.linalg.norm(in_plane) < g.pixel_spacing[0], level


def _relabel(out, instance: int) -> None:
    """Point the first row of train_label_coordinates.csv at ``instance`` of its series."""
    path = out / "train_label_coordinates.csv"
    rows = list(csv.reader(path.open()))
    rows[1][2] = str(instance)
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def test_labels_on_a_dropped_duplicate_resolve_and_on_a_missing_instance_are_reported(tmp_path):
    out, st, _ = _write(tmp_path, "duplicate")
    ser = st.sagittal_t2
    _relabel(out, ser.duplicate_instance)  # the first row (L1/L2) now names the instance the reader drops
    after = build_rsna_datalist(out)[0]["keypoints"]["disc"]["mm"][0]
    # it resolves through the dropped file's own header: that pixel on the duplicated slice's plane
    label = next(p for p in st.rsna_points() if p["level"] == "L1/L2")
    assert np.allclose(after, ser.geometry.to_mm(label["x"], label["y"], ser.duplicate), atol=1e-3)

    out, st, folder = _write(tmp_path, "missing")
    ser = st.sagittal_t2
    _relabel(out, ser.instance_numbers[ser.missing])
    pattern = r"train_label_coordinates.csv, row 2: referenced instance file .*not found .*a missing slice"
    with pytest.raises(BundleInputError, match=pattern):
        build_rsna_datalist(out)
    skipped = build_rsna_datalist(out, keep_unusable=True)[0]
    assert skipped["image"] == [] and "a missing slice" in skipped[SKIPPED_KEY]


def test_foramen_slabs_of_a_sagittal_t1_with_a_duplicate_read_each_position_once(tmp_path):
    def near_a_foramen(st, ser) -> bool:  # the duplicated slice is one of a foramen slab's nearest slices
        g, k = ser.geometry, ser.duplicate
        canal = np.mean(list(st.keypoints_mm()["canal"].values()), axis=0)
        distance = abs(float((g.positions[k] - canal) @ g.dirs(k)[2]))
        return abs(distance - DEFAULT_FORAMEN_OFFSET_MM) < float(np.linalg.norm(g.positions[1] - g.positions[0]))

    _, st, folder = _write(tmp_path, "duplicate", "sag_t1", near_a_foramen)
    ser = st.series_of("sag_t1")[0]
    canal = [list(p) for p in st.keypoints_mm()["canal"].values()]
    img = load_foramen_slabs(folder, 3, canal_mm=canal)
    instances = list(img.meta["instance_numbers"])
    assert ser.instance_numbers[ser.duplicate] in instances and ser.duplicate_instance not in instances
    assert len(set(instances)) == len(instances)  # each slab: three distinct positions
    (folder / f"{ser.duplicate_instance}.dcm").unlink()
    ref = load_foramen_slabs(folder, 3, canal_mm=canal)
    assert img.meta["instance_numbers"] == ref.meta["instance_numbers"] and np.array_equal(img.numpy(), ref.numpy())


def _axial_headers(tmp_path, kind: str, where=lambda st, ser: True):
    out, st, folder = _write(tmp_path, kind, "ax_t2", where)
    ser = st.series_of("ax_t2")[0]
    return st, ser, folder, read_slice_headers(list_dicom_files(folder))


def _centre_mm(header) -> np.ndarray:
    return pixel_to_patient(header, 0.5 * (header.cols - 1), 0.5 * (header.rows - 1))


def test_duplicated_axial_slice_is_read_once_by_the_block_split_and_the_slice_choice(tmp_path):
    st, ser, folder, headers = _axial_headers(tmp_path, "duplicate")
    copy = next(h for h in headers if h.instance_number == ser.duplicate_instance)
    without = [h for h in headers if h is not copy]
    blocks = parallel_blocks(headers)
    assert [[h.path for h in b] for b in blocks] == [[h.path for h in b] for b in parallel_blocks(without)]
    assert copy.path not in {h.path for b in blocks for h in b}
    point = _centre_mm(copy)
    with_copy, reference = nearest_axial_slices([headers], point, 3), nearest_axial_slices([without], point, 3)
    assert [h.path for h in with_copy.slices] == [h.path for h in reference.slices]
    assert copy.path not in {h.path for h in with_copy.slices}  # never the slice and its copy side by side


def _inside_one_block(st, ser) -> bool:
    """The missing slice's neighbours lie two spacings apart on one plane direction (not at a block's edge)."""
    k, g = ser.missing, ser.geometry
    step = np.linalg.norm(g.positions[k] - g.positions[k - 1])
    return bool(abs(np.linalg.norm(g.positions[k + 1] - g.positions[k - 1]) - 2 * step) < 1e-3)


def test_missing_axial_slice_keeps_its_block_and_the_slices_one_gap_apart(tmp_path):
    st, ser, folder, headers = _axial_headers(tmp_path, "missing", _inside_one_block)
    k = ser.missing
    before, after = ser.instance_numbers[k - 1], ser.instance_numbers[k + 1]
    blocks = parallel_blocks(headers)
    block = next(b for b in blocks if before in {h.instance_number for h in b})
    assert after in {h.instance_number for h in block}  # one gap of two spacings does not split the block
    lower = next(h for h in headers if h.instance_number == before)
    upper = next(h for h in headers if h.instance_number == after)
    spacing = float(abs((upper.position - lower.position) @ lower.normal)) / 2
    choice = nearest_axial_slices([headers], _centre_mm(lower), 3)
    offsets = sorted(float(h.position @ lower.normal) for h in choice.slices)
    assert choice.slice_spacing == pytest.approx(spacing, abs=1e-3)
    assert offsets[-1] - offsets[0] <= 2 * spacing + 1e-3  # by position: not three slices across the gap
