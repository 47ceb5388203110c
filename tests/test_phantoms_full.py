"""Tests of the full RSNA phantom layout: series plan and quirks, lateral conditions, labels and their readers."""

from __future__ import annotations

import csv
import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from bundle.errors import BundleInputError
from bundle.io import build_rsna_datalist, read_rsna_condition_labels
from bundle.phantoms import generate_phantoms, phantom_study
from bundle.phantoms.render import render_series
from bundle.rsna_labels import CONDITION_NAMES, CONDITIONS, LEVELS, SEVERITIES

TINY = dict(min_size=64, max_size=96)
# sagittal T2 digests (pixels, geometry, ids, instance numbers, spine and spinal labels) of commit 30c9903
PINNED = {
    (0, 0): "de20d0994f31e173",
    (0, 3): "109fc86554f06c41",
    (0, 7): "54aa2c7f32551c57",
    (3, 1): "2978bb65c448b5a7",
    (3, 5): "f4d349056939734a",
    (3, 8): "249ca661b4fafe8c",
}
PINNED_TIANCHI = "9e3cc67db46d5dc2"  # every series of Tianchi study (seed 4, index 1), same commit


def _sag_t2_digest(st) -> str:
    ser = st.sagittal_t2
    g = ser.geometry
    h = hashlib.sha256()
    h.update(st.pixels(ser).tobytes())
    h.update(np.ascontiguousarray(g.positions).tobytes())
    parts = [
        g.rows,
        g.cols,
        g.pixel_spacing,
        g.orientation,
        g.slice_thickness,
        g.slice_spacing,
        ser.description,
        ser.series_id,
        ser.series_uid,
        ser.series_number,
        ser.instance_numbers,
        ser.sop_uids,
        ser.photometric,
        ser.slope,
        ser.intercept,
        ser.gain,
        st.study_id,
        st.study_uid,
        st.frame_uid,
        st.birth_date,
        st.study_date,
        st.study_time,
        st.spine.stenosis,
        st.labels(),
        [(p["level"], p["instance_number"], p["x"], p["y"], p["class"]) for p in st.rsna_points()],
    ]
    h.update(repr(parts).encode())
    return h.hexdigest()[:16]


def test_sagittal_t2_and_tianchi_unchanged_by_the_full_layout():
    for (seed, index), digest in PINNED.items():
        assert _sag_t2_digest(phantom_study(seed, index, "rsna", **TINY)) == digest, (seed, index)
    st = phantom_study(4, 1, "tianchi", **TINY)
    h = hashlib.sha256()
    for ser in st.series:
        h.update(st.pixels(ser).tobytes())
        h.update(repr((ser.series_id, ser.instance_numbers, ser.description)).encode())
    assert h.hexdigest()[:16] == PINNED_TIANCHI and st.lateral is None


@pytest.fixture(scope="module")
def planned():
    return [phantom_study(5, i, "rsna", **TINY) for i in range(200)]


def test_series_plan_and_quirk_rates(planned):
    """200 planned studies: every series type, its rates, instance orders, sizes, tilted blocks."""
    no_t2 = no_t1 = two_t1 = ascending = reversed_sag = tilted = mixed_sizes = 0
    axial_counts, modes = [0, 0, 0, 0], set()
    ids = []
    for st in planned:
        kinds = [ser.kind for ser in st.series]
        assert kinds == sorted(kinds, key=["sag_t2", "sag_t1", "ax_t2"].index)  # sagittal T2 first where present
        assert kinds.count("sag_t2") <= 1 and 0 <= kinds.count("sag_t1") <= 2 and kinds.count("ax_t2") <= 3
        no_t2 += not st.has_sagittal_t2
        no_t1 += "sag_t1" not in kinds
        assert st.has_sagittal_t2 or "sag_t1" in kinds  # someone carries the spinal points
        two_t1 += kinds.count("sag_t1") == 2
        axials = st.series_of("ax_t2")
        axial_counts[len(axials)] += 1
        if axials:  # the axial series cover each level exactly once
            assert sorted(lv for ser in axials for lv in ser.levels) == sorted(LEVELS)
        for ser in axials:
            inst = np.array(ser.instance_numbers)
            ascending += bool(np.all(np.diff(inst) == 1))
            assert np.all(np.abs(np.diff(inst)) == 1)
            g = ser.geometry
            modes.add("blocks" if g.orientations is not None else "stack")
            if g.orientations is not None:
                tilted += len({tuple(o) for o in g.orientations}) == len(ser.levels) > 1
        for ser in st.series_of("sag_t1") + st.series_of("sag_t2"):
            reversed_sag += bool(np.all(np.diff(ser.instance_numbers) == -1))
        mixed_sizes += len({(ser.geometry.rows, ser.geometry.cols) for ser in st.series}) > 1
        ids += [ser.series_id for ser in st.series]
    assert 2 <= no_t2 <= 14 and 1 <= no_t1 <= 14 and 3 <= two_t1 <= 20
    assert axial_counts[0] >= 1 and axial_counts[2] >= 10 and axial_counts[3] >= 1 and axial_counts[1] >= 140
    assert modes == {"stack", "blocks"} and tilted >= 20 and ascending >= 20 and reversed_sag >= 20
    assert mixed_sizes >= 150 and len(set(ids)) == len(ids)


def test_grade_frequencies_and_empty_cells(planned):
    counts = {"foraminal": np.zeros(3), "subarticular": np.zeros(3)}
    empty = cells = 0
    for st in planned:
        grades = st.grades()
        assert list(grades) == list(CONDITIONS) and all(list(g) == list(LEVELS) for g in grades.values())
        assert grades[CONDITIONS[0]] == st.labels()["stenosis"]  # spinal cells as before, never empty
        for cond in CONDITIONS[1:]:
            for value in grades[cond].values():
                cells += 1
                empty += value == ""
                if value:
                    counts["foraminal" if "foraminal" in cond else "subarticular"][SEVERITIES.index(value)] += 1
    assert 0.004 <= empty / (cells * 25 / 20) <= 0.02  # about 1% of all 25 cells
    for name, expected in (("foraminal", (0.780, 0.181, 0.040)), ("subarticular", (0.714, 0.190, 0.096))):
        assert np.allclose(counts[name] / counts[name].sum(), expected, atol=0.035), name
    # sides and levels drawn independently: left and right grades differ in many studies
    differ = sum(st.lateral.foraminal[0] != st.lateral.foraminal[1] for st in planned)
    assert differ >= 100


def _slice_centre_x(g, k) -> float:
    return float(g.to_mm(0.5 * (g.cols - 1), 0.5 * (g.rows - 1), k)[0])


def test_label_points_on_their_series_side_and_slice(planned):
    checked = {"foraminal": 0, "subarticular": 0, "spinal_on_t1": 0}
    for st in planned[:60]:
        truth = st.condition_points_mm()
        for cond in CONDITIONS[1:]:
            for p in st.condition_points(cond):
                ser = next(s for s in st.series if s.series_id == p["series_id"])
                g, k = ser.geometry, p["k"]
                assert 0 <= p["x"] < g.cols and 0 <= p["y"] < g.rows and ser.instance_numbers[k] == p["instance_number"]
                target = truth[cond][p["level"]]
                if "foraminal" in cond:
                    assert ser is st.series_of("sag_t1")[0] and k == g.nearest_slice(target)
                    side_x = _slice_centre_x(g, k) - st.spine.x_mid
                    assert side_x > 5 if cond.startswith("left") else side_x < -5  # LPS: +x is patient left
                    checked["foraminal"] += 1
                else:
                    assert ser.kind == "ax_t2" and p["level"] in ser.levels
                    assert k == g.nearest_slice(target)  # the recess point lies on the disc's centre plane
                    dist = [abs(g.to_pixel(st.spine.disc_centre(p["level"].replace("/", "-")), j)[2]) for j in (k,)]
                    assert dist[0] <= 12.0  # the slice crosses the disc (within its tilt)
                    x_mm = float(g.to_mm(p["x"], p["y"], k)[0]) - st.spine.x_mid
                    assert x_mm > 3 if cond.startswith("left") else x_mm < -3
                    checked["subarticular"] += 1
                assert np.linalg.norm(p["mm"] - target) < 0.5 * max(g.slice_thickness, 6.5) + 0.1
        if not st.has_sagittal_t2:
            assert {p["series_id"] for p in st.rsna_points()} == {st.series_of("sag_t1")[0].series_id}
            checked["spinal_on_t1"] += 1
    assert checked["foraminal"] >= 500 and checked["subarticular"] >= 500 and checked["spinal_on_t1"] >= 1


def _study(grade: int):
    f = [0.0, 0.0, 0.0]
    f[grade] = 1.0
    freqs = {"foraminal": f, "subarticular": f, "stenosis": [1, 0, 0]}
    return phantom_study(2, 1, "rsna", min_size=128, max_size=128, class_frequencies=freqs)


def _bright_area(img: np.ndarray, g, k: int, point: np.ndarray, radius_mm: float, threshold: float) -> int:
    x, y, _ = g.to_pixel(point, k)
    rr, cc = np.mgrid[: g.rows, : g.cols]
    disk = np.hypot((cc - x) * g.pixel_spacing[1], (rr - y) * g.pixel_spacing[0]) <= radius_mm
    return int(np.count_nonzero(img[disk] > threshold))


def test_severity_shrinks_foraminal_fat_and_recess_csf():
    """Same spine, series and noise; only the grades differ: the measured areas fall with the grade."""
    studies = [_study(c) for c in range(3)]
    fat = {side: [] for side in ("left", "right")}
    csf = {side: [] for side in ("left", "right")}
    for st in studies:
        t1, ax = st.series_of("sag_t1")[0], next(s for s in st.series_of("ax_t2") if "L4/L5" in s.levels)
        for side in fat:
            p = st.condition_points_mm()[f"{side}_neural_foraminal_narrowing"]["L4/L5"]
            k = t1.geometry.nearest_slice(p)
            img = render_series(st.spine, t1.geometry, "T1", np.random.default_rng(0), st.lateral)[k]
            fat[side].append(_bright_area(img, t1.geometry, k, p, 10.0, 0.75))
            q = st.condition_points_mm()[f"{side}_subarticular_stenosis"]["L4/L5"]
            k = ax.geometry.nearest_slice(st.spine.disc_centre("L4-L5"))
            img = render_series(st.spine, ax.geometry, "T2", np.random.default_rng(0), st.lateral)[k]
            csf[side].append(_bright_area(img, ax.geometry, k, q, 6.0, 0.7))
    for side in fat:
        assert fat[side][0] > fat[side][1] > fat[side][2] and fat[side][2] < 0.4 * fat[side][0], (side, fat)
        assert csf[side][0] > csf[side][1] > csf[side][2] and csf[side][2] < 0.4 * csf[side][0], (side, csf)
        assert fat[side][0] >= 20 and csf[side][0] >= 10  # visible at these sizes


def test_the_sagittal_t1_foramen_parameters_change_the_t1_series_only():
    """The outlined foramina's narrowing and front share are drawn on the sagittal T1 alone: other values leave
    the sagittal T2 and axial T2 pixels as they were, and change the sagittal T1's."""
    st = phantom_study(2, 1, "rsna", min_size=64, max_size=64)
    lat = st.lateral
    other = replace(
        st, lateral=replace(lat, foramen_narrowing=0.9 - lat.foramen_narrowing, foramen_front=1 - lat.foramen_front)
    )
    kinds = {ser.kind for ser in st.series}
    assert kinds == {"sag_t2", "sag_t1", "ax_t2"}, kinds
    for ser in st.series:
        same = np.array_equal(st.pixels(ser), other.pixels(ser))
        assert same == (ser.kind != "sag_t1"), (ser.kind, ser.series_id)


@pytest.fixture(scope="module")
def full_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "set"
    generate_phantoms(out, "rsna", studies=4, seed=0, **TINY)
    return out


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_tables_in_the_real_layout(full_set):
    studies = [phantom_study(0, i, "rsna", **TINY) for i in range(4)]
    train = _rows(full_set / "train.csv")
    assert len(train[0]) == 26 and all(len(r) == 26 for r in train)
    assert all(cell in SEVERITIES or cell == "" for r in train[1:] for cell in r[1:])
    coords = _rows(full_set / "train_label_coordinates.csv")
    listed = {(r[0], r[1]): r[2] for r in _rows(full_set / "train_series_descriptions.csv")[1:]}
    where = {"Spinal": "Sagittal T2/STIR", "Left Neural": "Sagittal T1", "Right Neural": "Sagittal T1"}
    for r in coords[1:]:
        assert r[3] in CONDITION_NAMES and r[4] in LEVELS and (r[0], r[1]) in listed
        expected = next((d for key, d in where.items() if r[3].startswith(key)), "Axial T2")
        assert listed[(r[0], r[1])] == expected or (
            r[3] == CONDITION_NAMES[0] and listed[(r[0], r[1])] == "Sagittal T1"
        )
        assert (full_set / "train_images" / r[0] / r[1] / f"{r[2]}.dcm").is_file()
    assert len(coords) - 1 == sum(len(st.label_rows()) for st in studies) > 4 * 20


def test_readers_round_trip_and_spinal_items_unchanged(full_set):
    studies = {str(st.study_id): st for st in (phantom_study(0, i, "rsna", **TINY) for i in range(4))}
    labels = read_rsna_condition_labels(full_set)
    assert list(labels) == list(studies)
    for sid, st in studies.items():
        grades = st.grades()
        for cond in CONDITIONS:
            for level, cell in labels[sid][cond].items():
                value = grades[cond][level]
                assert cell["severity"] == (SEVERITIES.index(value) if value else -1)
            points = st.rsna_points() if cond == CONDITIONS[0] else st.condition_points(cond)
            got = {lv: c for lv, c in labels[sid][cond].items() if c["series_id"] is not None}
            assert set(got) == {p["level"] for p in points}
            for p in points:
                c = got[p["level"]]
                assert (c["series_id"], c["instance_number"]) == (str(p["series_id"]), p["instance_number"])
                assert (c["x"], c["y"]) == (p["x"], p["y"])
    items = build_rsna_datalist(full_set)  # the spinal stream reads only the spinal rows, as before
    assert [it["study_id"] for it in items] == [sid for sid, st in studies.items() if st.has_sagittal_t2]
    for it in items:
        st = studies[it["study_id"]]
        assert it["series_id"] == str(st.sagittal_t2.series_id)
        mm = np.array(it["keypoints"]["disc"]["mm"])
        assert np.allclose(mm, [p["mm"] for p in st.rsna_points()], atol=1e-3)


def _edit(root: Path, name: str, line: int, old: str, new: str) -> None:
    path = root / name
    lines = path.read_text().splitlines(keepends=True)
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    path.write_text("".join(lines))


def test_bad_rows_give_clear_errors(full_set, tmp_path):
    cases = [
        ("train_label_coordinates.csv", 12, "Neural Foraminal", "Neural Foramen", r"row 12: unknown condition"),
        ("train.csv", 3, ",Moderate,", ",Moderat,", r"train\.csv, row 3: unknown severity 'Moderat' in column"),
        (
            "train.csv",
            1,
            "stenosis_l5_s1\n",
            "stenosis_l5\n",
            r"missing column\(s\) \['right_subarticular_stenosis_l5_s1'\]",
        ),
    ]
    for i, (name, line, old, new, message) in enumerate(cases):
        root = tmp_path / str(i)
        shutil.copytree(full_set, root, ignore=shutil.ignore_patterns("train_images"))
        _edit(root, name, line, old, new)
        with pytest.raises(BundleInputError, match=message):
            read_rsna_condition_labels(root)
    root = tmp_path / "series"
    shutil.copytree(full_set, root, ignore=shutil.ignore_patterns("train_images"))
    coords = _rows(root / "train_label_coordinates.csv")
    series_id = coords[20][1]
    first = next(i for i, r in enumerate(coords) if r[1] == series_id) + 1  # file line of its first row
    text = (root / "train_series_descriptions.csv").read_text()
    (root / "train_series_descriptions.csv").write_text(text.replace(f",{series_id},", ",1,"))
    with pytest.raises(BundleInputError, match=rf"row {first}: series {series_id} is not listed for study"):
        read_rsna_condition_labels(root)
