"""Axial T2 subarticular model: nearest-slice choice, loader, datalist and a tiny training run."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle.codec import pixels_to_mm_np
from bundle.errors import BundleInputError
from bundle.io.axial import (
    LoadAxialSlicesd,
    build_rsna_axial_datalist,
    load_axial_slices,
    nearest_axial_slices,
    read_axial_stacks,
)
from bundle.io.dicom_series import patient_to_pixel, pixel_to_patient, slice_header
from bundle.io.pixels import read_header
from bundle.phantoms import generate_phantoms
from bundle.rsna_labels import LEVELS
from bundle.skipping import SKIPPED_KEY
from bundle.streams import RSNA_AXIAL_STREAMS
from bundle.workflow import default_streams, load_datalist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return generate_phantoms(
        tmp_path_factory.mktemp("ax") / "rsna", "rsna", studies=4, seed=3, min_size=64, max_size=96
    )


def _subarticular_rows(root: Path) -> list[dict]:
    with open(root / "train_label_coordinates.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if "Subarticular" in r["condition"]]


def test_nearest_slice_is_the_labelled_instance(phantoms):
    items = build_rsna_axial_datalist(phantoms)
    rows = _subarticular_rows(phantoms)
    assert rows and items
    checked = 0
    for it in items:
        choice = nearest_axial_slices(read_axial_stacks(it["image"]), it["disc_mm"], 3)
        for r in rows:
            if r["study_id"] == it["study_id"] and r["level"] == it["level"]:
                assert r["series_id"] == it["series_id"] == choice.centre.path.parent.name
                assert int(r["instance_number"]) == choice.centre.instance_number
                checked += 1
        assert choice.centre in choice.slices and choice.slices[1] is choice.centre
    assert checked >= len(items)


def test_blocks_stacks_and_reversed_instances_are_sorted_by_position(phantoms):
    seen_blocks = False
    for it in build_rsna_axial_datalist(phantoms):
        stacks = read_axial_stacks(it["image"])
        choice = nearest_axial_slices(stacks, it["disc_mm"], 3)
        normal = choice.centre.normal
        offsets = [float(h.position @ normal) for h in choice.slices]
        assert offsets == sorted(offsets)  # by position, whatever the InstanceNumber order
        assert all(abs(float(h.normal @ normal)) > 0.9999 for h in choice.slices)
        normals = {tuple(np.round(h.normal, 3)) for h in stacks[choice.stack]}
        seen_blocks |= len(normals) > 1  # a series of tilted per-level blocks
        assert abs(choice.distance_mm) < 4.0
    assert seen_blocks


def test_point_outside_every_stack_gives_none(phantoms):
    it = build_rsna_axial_datalist(phantoms)[0]
    far = np.asarray(it["disc_mm"]) + np.array([0.0, 0.0, 500.0])
    assert nearest_axial_slices(read_axial_stacks(it["image"]), far, 3) is None
    aside = np.asarray(it["disc_mm"]) + np.array([500.0, 0.0, 0.0])  # on the plane, outside the image
    assert nearest_axial_slices(read_axial_stacks(it["image"]), aside, 3) is None
    with pytest.raises(BundleInputError, match="covers the point"):
        load_axial_slices(it["image"][0], far, 3)  # one folder as a plain path


def test_datalist_points_round_trip_to_labelled_pixels(phantoms):
    items = build_rsna_axial_datalist(phantoms)
    by_key = {(it["study_id"], it["level"]): it for it in items}
    for r in _subarticular_rows(phantoms):
        it = by_key.get((r["study_id"], r["level"]))
        if it is None:
            continue
        side = "left" if r["condition"].startswith("Left") else "right"
        mm = it["keypoints"][f"{side}_subarticular"]["mm"][0]
        path = phantoms / "train_images" / r["study_id"] / r["series_id"] / f"{r['instance_number']}.dcm"
        h = slice_header(read_header(path), path)
        rel = np.asarray(mm) - h.position
        x = rel @ h.orientation[:3] / h.pixel_spacing[1]
        y = rel @ h.orientation[3:] / h.pixel_spacing[0]
        assert x == pytest.approx(float(r["x"]), abs=1e-4) and y == pytest.approx(float(r["y"]), abs=1e-4)
        assert abs(rel @ h.normal) < 1e-4
    assert {s.name for s in RSNA_AXIAL_STREAMS} == set(items[0]["keypoints"])
    assert all(len(k["mm"]) == 1 == len(k["label"]) for it in items for k in it["keypoints"].values())


def test_loader_affine_projects_recess_points_onto_the_image(phantoms):
    it = build_rsna_axial_datalist(phantoms)[0]
    out = LoadAxialSlicesd(keys="image", num_slices=3)(it)["image"]
    assert out.shape[0] == 3 and out.meta["level"] == it["level"] and out.meta["study_id"] == it["study_id"]
    assert out.meta["series_id"] == it["series_id"]
    c = out.meta["middle_filename"]
    h = slice_header(read_header(c), c)
    mm = pixels_to_mm_np([[5.0, 7.0]], out.affine.numpy())[0]
    assert np.allclose(mm, pixel_to_patient(h, 5.0, 7.0))


def test_study_without_axial_is_skipped_and_bad_row_is_an_error(phantoms, tmp_path, caplog):
    root = tmp_path / "copy"
    shutil.copytree(phantoms, root)
    series_csv, coords = root / "train_series_descriptions.csv", root / "train_label_coordinates.csv"
    lines = series_csv.read_text().splitlines()
    study, axial = next(ln.split(",")[:2] for ln in lines if "Axial T2" in ln)
    series_csv.write_text("\n".join(ln for ln in lines if not ln.startswith(f"{study},{axial},")) + "\n")
    points = coords.read_text().splitlines()  # the study's axial points go with its series
    coords.write_text("\n".join(ln for ln in points if not ln.startswith(f"{study},{axial},")) + "\n")
    with caplog.at_level("WARNING"):
        items = build_rsna_axial_datalist(root)
    assert study not in {it["study_id"] for it in items} and "no Axial T2 series" in caplog.text
    kept = build_rsna_axial_datalist(root, keep_unusable=True)
    skipped = [it for it in kept if it["study_id"] == study]
    assert [it["level"] for it in skipped] == list(LEVELS) and all("Axial T2" in it[SKIPPED_KEY] for it in skipped)
    from bundle.transforms import KeypointsToArraysd  # evaluation reads a skipped item's labels as missed points

    arrays = KeypointsToArraysd(keys="keypoints", streams=default_streams("rsna", "axial_t2"))(skipped[0])
    assert all(torch.isnan(torch.as_tensor(arrays[f"{side}_subarticular_points"])).all() for side in ("left", "right"))

    rows = coords.read_text().splitlines()
    rows[2] = ",".join(rows[2].split(",")[:-1] + ["abc"])
    coords.write_text("\n".join(rows) + "\n")
    with pytest.raises(BundleInputError, match=r"train_label_coordinates.csv, row 3"):
        build_rsna_axial_datalist(root)


def test_workflow_series_switch():
    assert set(default_streams("rsna", "axial_t2")) == {"left_subarticular", "right_subarticular"}
    assert default_streams("rsna") == default_streams("rsna", "sagittal_t2")
    with pytest.raises(ValueError, match="series"):
        default_streams("tianchi", "axial_t2")


def test_tiny_axial_training_writes_a_checkpoint(phantoms, tmp_path):
    items = load_datalist(phantoms, "rsna", "training", series="axial_t2")
    assert items and all("disc_mm" in it for it in items)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--config_file", "['configs/train.json','configs/axial_t2.json']", "--bundle_root", str(tmp_path)]
    args += ["--dataset_dir", str(phantoms), "--backbone_depth", "18", "--pixdim", "2.0", "--input_size", "64"]
    args += ["--batch_size", "2", "--num_workers", "0", "--max_epochs", "1", "--codec#radius", "2.0"]
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "models" / "axial_t2" / "checkpoint.pt").is_file()
    saved = torch.load(tmp_path / "models" / "axial_t2" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler"} <= set(saved)
    assert not (tmp_path / "models" / "checkpoint.pt").exists()  # the sagittal model's folder is untouched


def test_single_level_assignment_keeps_the_best_candidate():
    from bundle.levels import assign_levels

    out = assign_levels(np.array([[0.0, 0.0], [0.0, 10.0], [0.0, 50.0]]), np.array([0.5, 2.0, 0.3]), 1, 35.0)
    assert out.level.tolist() == [-1, 0, -1]  # one level per axial item: the strongest candidate takes it


def test_patient_to_pixel_inverts_pixel_to_patient(phantoms):
    """A pixel moved 2.5 mm off its axial plane comes back as that pixel, 2.5 mm along the normal."""
    path = next(
        p
        for p in sorted((phantoms / "train_images").rglob("*.dcm"))
        if "Axial" in str(read_header(p).get("SeriesDescription", ""))
    )
    header = slice_header(read_header(path), path)
    point = pixel_to_patient(header, 17.25, 40.5) + 2.5 * header.normal
    x, y, d = patient_to_pixel(header, point)
    assert (x, y, d) == pytest.approx((17.25, 40.5, 2.5), abs=1e-9)


def test_writer_merges_the_per_level_items_of_a_study_into_25_rows():
    """The axial model's items are one per (study, level): the submission keeps 25 rows per study, each level's
    subarticular rows from its own item, the rest the prior (evaluate.json with axial_t2.json)."""
    from bundle.outputs import RSNA_PRIOR, KeypointsWriter

    writer = KeypointsWriter("unused", default_streams("rsna", "axial_t2"))
    probs = {"Normal/Mild": 0.1, "Moderate": 0.2, "Severe": 0.7}
    for level in ("L1/L2", "L4/L5"):
        points = [{"stream": s.name, "level": "disc", "probabilities": probs} for s in RSNA_AXIAL_STREAMS]
        writer._add_submission_rows("7", points, level)
    rows = dict(writer.rows)
    assert len(writer.rows) == len(rows) == 25
    assert rows["7_left_subarticular_stenosis_l4_l5"] == rows["7_right_subarticular_stenosis_l1_l2"] == (0.1, 0.2, 0.7)
    assert rows["7_left_subarticular_stenosis_l2_l3"] == RSNA_PRIOR["left_subarticular_stenosis"]
    assert rows["7_spinal_canal_stenosis_l4_l5"] == RSNA_PRIOR["spinal_canal_stenosis"]
