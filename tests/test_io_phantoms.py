"""End-to-end readers on the embedded phantom data set (RSNA and Tianchi layouts)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from bundle.io import (
    build_rsna_datalist,
    build_tianchi_datalist,
    load_sagittal_series,
    read_datalist,
    select_sagittal_t2,
)
from bundle.phantoms import PHI_MARKER, generate_phantoms

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    rsna = generate_phantoms(root / "rsna", "rsna", studies=3, seed=0, min_size=256, max_size=256)
    tianchi = generate_phantoms(root / "tianchi", "tianchi", studies=3, seed=0, min_size=256, max_size=256)
    return {"rsna": Path(rsna), "tianchi": Path(tianchi)}


def prepare(*args: str) -> int:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import prepare_datalist
    finally:
        sys.path.pop(0)
    return prepare_datalist.main(list(args))


def test_prepare_datalist_both_layouts(phantoms, tmp_path):
    out = tmp_path / "rsna.json"
    assert prepare("--format", "rsna", "--root", str(phantoms["rsna"]), "--out", str(out), "--folds", "3") == 0
    content = read_datalist(out)
    items = content["training"] + content["validation"]
    assert len(items) == 3 and len(content["validation"]) == 1 and content["format"] == "rsna"
    for item in items:
        assert Path(item["image"]).is_dir()
        disc = item["keypoints"]["disc"]
        assert len(disc["mm"]) == 5 and len(disc["label"]) == 5

    out = tmp_path / "tianchi.json"
    root = phantoms["tianchi"]
    code = prepare(
        "--format",
        "tianchi",
        "--root",
        str(root / "lumbar_train"),
        "--annotation",
        str(root / "lumbar_train_annotation.json"),
        "--out",
        str(out),
        "--folds",
        "3",
    )
    assert code == 0
    content = read_datalist(out)
    items = content["training"] + content["validation"]
    assert len(items) == 3 and set(content["streams"]) == {"disc", "vertebra"}
    for item in items:
        assert all(Path(p).is_file() for p in item["image"])
        assert len(item["keypoints"]["disc"]["mm"]) == 6 and len(item["keypoints"]["vertebra"]["mm"]) == 5


def test_rsna_points_land_on_their_instances(phantoms):
    root = phantoms["rsna"]
    with (root / "train_label_coordinates.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["condition"] == "Spinal Canal Stenosis"]
    for item in build_rsna_datalist(root):
        img = load_sagittal_series(item["image"])
        assert PHI_MARKER not in repr(img.meta)
        inv = np.linalg.inv(img.affine.numpy())
        study_rows = {r["level"]: r for r in rows if r["study_id"] == item["study_id"]}
        levels = ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]
        for level, mm in zip(levels, item["keypoints"]["disc"]["mm"]):
            if mm is None:
                assert level not in study_rows
                continue
            row, col, k = (inv @ [*mm, 1.0])[:3]
            r = study_rows[level]
            np.testing.assert_allclose([col, row], [float(r["x"]), float(r["y"])], atol=1e-3)
            assert abs(k - round(k)) < 1e-3 and abs(round(k)) <= 3
            # the labelled instance sits in channel 3 + k of the 7 loaded slices
            assert img.meta["instance_numbers"][3 + round(k)] == int(r["instance_number"])


def test_tianchi_middle_slice_is_annotated_instance(phantoms):
    root = phantoms["tianchi"]
    annotation = json.loads((root / "lumbar_train_annotation.json").read_text())
    sop_of = {a["studyUid"]: a["data"][0]["instanceUid"] for a in annotation}
    for item in build_tianchi_datalist(root / "lumbar_train", root / "lumbar_train_annotation.json"):
        img = load_sagittal_series(item["image"])
        by_sop = {}
        for path in item["image"]:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            by_sop[ds.SOPInstanceUID] = int(ds.InstanceNumber)
        assert img.meta["middle_instance_number"] == by_sop[sop_of[item["study_id"]]]
        inv = np.linalg.inv(img.affine.numpy())
        for stream in item["keypoints"].values():
            for mm in stream["mm"]:
                if mm is not None:
                    assert abs((inv @ [*mm, 1.0])[2]) < 1e-3  # on the middle slice's plane


def test_selection_picks_sagittal_t2(phantoms):
    root = phantoms["rsna"]
    descriptions = root / "train_series_descriptions.csv"
    for item in build_rsna_datalist(root):
        study_dir = Path(item["image"]).parent
        chosen = select_sagittal_t2(study_dir, descriptions)
        assert {p.parent for p in chosen} == {Path(item["image"])}
        assert {p.parent for p in select_sagittal_t2(study_dir)} == {Path(item["image"])}  # headers alone
    troot = phantoms["tianchi"]
    for item in build_tianchi_datalist(troot / "lumbar_train", troot / "lumbar_train_annotation.json"):
        study_dir = Path(item["image"][0]).parent
        assert sorted(map(str, select_sagittal_t2(study_dir))) == sorted(item["image"])
