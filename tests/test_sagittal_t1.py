"""The sagittal T1 (neural foraminal narrowing) model: streams, foramen slabs in mm, datalist, tiny training."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle.codec import mm_to_pixels_np
from bundle.errors import BundleInputError
from bundle.io import (
    LoadForamenSlabsd,
    build_rsna_t1_datalist,
    list_dicom_files,
    load_foramen_slabs,
    read_dicom_pixels,
    read_slice_headers,
    series_affine,
    slice_header,
)
from bundle.io.pixels import read_header
from bundle.phantoms import generate_phantoms, phantom_study
from bundle.phantoms.anatomy import DISC_NAMES, foramen_frame, foramen_outline
from bundle.rsna_labels import LEVELS, SEVERITIES
from bundle.streams import RSNA_T1_STREAMS
from bundle.workflow import default_streams, load_datalist

ROOT = Path(__file__).resolve().parents[1]
SEED, STUDIES, SIZE = 11, 6, dict(min_size=64, max_size=128)
SIDES = ("left", "right")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return generate_phantoms(tmp_path_factory.mktemp("t1") / "rsna", layout="rsna", studies=STUDIES, seed=SEED, **SIZE)


@pytest.fixture(scope="module")
def truth() -> dict:
    studies = (phantom_study(seed=SEED, index=i, layout="rsna", **SIZE) for i in range(STUDIES))
    return {str(st.study_id): st for st in studies}


@pytest.fixture(scope="module")
def items(phantoms) -> list[dict]:
    return build_rsna_t1_datalist(phantoms)


def _label_rows(root: Path) -> list[dict]:
    with open(root / "train_label_coordinates.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_t1_streams_use_the_rsna_names():
    assert [s.name for s in RSNA_T1_STREAMS] == ["left_foramen", "right_foramen"]
    assert all(s.levels == LEVELS and s.classes == SEVERITIES for s in RSNA_T1_STREAMS)
    assert list(default_streams("rsna", "sagittal_t1")) == ["left_foramen", "right_foramen"]
    assert list(default_streams("rsna")) == ["disc"]  # the spinal model is unchanged
    with pytest.raises(ValueError, match="series"):
        default_streams("tianchi", "sagittal_t1")


def test_datalist_items_are_complete_and_points_round_trip(phantoms, items, truth):
    with_t1 = [sid for sid, st in truth.items() if st.series_of("sag_t1")]
    assert sorted(it["study_id"] for it in items) == sorted(with_t1)
    rows = _label_rows(phantoms)
    for it in items:
        st = truth[it["study_id"]]
        assert Path(it["image"]).is_dir() and it["series_id"] in {str(s.series_id) for s in st.series_of("sag_t1")}
        assert set(it["keypoints"]) == {"left_foramen", "right_foramen"}
        grades = st.grades()
        for side in SIDES:
            entry = it["keypoints"][f"{side}_foramen"]
            key = f"{side}_neural_foraminal_narrowing"
            expected = [SEVERITIES.index(grades[key][lv]) if grades[key][lv] else -1 for lv in LEVELS]
            assert entry["label"] == expected
            for lv, mm in zip(LEVELS, entry["mm"]):
                row = [
                    r
                    for r in rows
                    if r["study_id"] == it["study_id"]
                    and r["condition"].lower() == key.replace("_", " ")
                    and r["level"] == lv
                ]
                assert (mm is None) == (not row)
                if mm is None:
                    continue
                path = Path(it["image"]).parent / row[0]["series_id"] / f"{row[0]['instance_number']}.dcm"
                xy = mm_to_pixels_np([mm], series_affine(slice_header(read_header(path), path), 1.0))[0]
                np.testing.assert_allclose(xy, [float(row[0]["x"]), float(row[0]["y"])], atol=1e-6)
                # left foramina lie at larger patient x (LPS: +x = left), right ones at smaller
                canal_x = np.mean([p[0] for p in it["canal_mm"] if p is not None])
                assert (mm[0] - canal_x) * (1 if side == "left" else -1) > 5.0


def test_slab_centres_lie_on_each_side_within_the_offset(items, truth):
    for it in items:
        spine = truth[it["study_id"]].spine
        for canal in (it["canal_mm"], None):
            image = load_foramen_slabs(it["image"], 3, 14.0, canal)
            for side in SIDES:
                anatomy_x = spine.foramen_point("L3/L4", side)[0]
                assert abs(image.meta["foramen_x_mm"][side] - anatomy_x) < 5.0, (it["study_id"], side)
            assert image.meta["foramen_x_mm"]["left"] > image.meta["canal_x_mm"] > image.meta["foramen_x_mm"]["right"]


def test_slabs_hold_the_labelled_foramen_instances(phantoms, items):
    rows = _label_rows(phantoms)
    for num_slices in (3, 5):
        found, total = 0, 0
        for it in items:
            image = load_foramen_slabs(it["image"], num_slices, 14.0, it["canal_mm"])
            for s, side in enumerate(SIDES):
                slab = image.meta["instance_numbers"][s * num_slices : (s + 1) * num_slices]
                labelled = [
                    int(r["instance_number"])
                    for r in rows
                    if r["study_id"] == it["study_id"] and r["condition"].startswith(f"{side.title()} Neural")
                ]
                found += sum(n in slab for n in labelled)
                total += len(labelled)
        assert total > 0 and found / total >= (0.95 if num_slices == 3 else 1.0), (num_slices, found, total)


def _outline_fat(image, side: int, num_slices: int, mm: list[float], foramen: tuple) -> float:
    """Fraction of the pixels inside the outline of a labelled foramen that are fat, on the side's channel with
    the most fat.

    ``foramen = (spine, level, narrowing)``: the outline is the phantom anatomy's (``foramen_outline`` in the
    ``foramen_frame`` of that level's foramen, ``rho < 0.95`` to keep clear of its dark rim),
    evaluated on the plane of the label point ``mm``. Fat: above 0.7 of the slab's 99th percentile (fat is the
    brightest tissue on T1; the intermediate tissue of a narrowed foramen about half of it, the root less).
    """
    spine, level, narrowing = foramen
    slab = np.asarray(image)[side * num_slices : (side + 1) * num_slices]
    a = np.asarray(image.affine)
    rows, cols = np.mgrid[: slab.shape[1], : slab.shape[2]]
    k = (np.asarray(mm) - a[:3, 3]) @ a[:3, 2] / (a[:3, 2] @ a[:3, 2])  # the label point's plane
    xyz = a[:3, 3] + rows[..., None] * a[:3, 0] + cols[..., None] * a[:3, 1] + k * a[:3, 2]
    s, u, _ = spine.coords(xyz[..., 0], xyz[..., 1], xyz[..., 2])
    fs, fu, fa, fb, _ = spine.foramen(DISC_NAMES.index(level.replace("/", "-")))
    ts, tu, _ = foramen_frame(s, u, (fs, fu), (fa, fb), narrowing)
    inside = foramen_outline(ts, tu)[0] < 0.95
    bright = slab > 0.7 * np.percentile(slab, 99)
    return float(max(ch[inside].mean() for ch in bright))


GRADED = dict(layout="rsna", seed=5, min_size=224, max_size=256, class_frequencies={"foraminal": (1.0, 1.0, 1.0)})


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> tuple[list[dict], dict]:
    """Three studies whose foramina take the three grades equally often, at a size where a Severe one shows: the
    T1 datalist items and the phantom studies by study id."""
    root = generate_phantoms(tmp_path_factory.mktemp("t1_graded") / "rsna", studies=3, **GRADED)
    studies = (phantom_study(index=i, **GRADED) for i in range(3))
    return build_rsna_t1_datalist(root), {str(st.study_id): st for st in studies}


def test_fat_fraction_inside_the_outlined_foramen_reads_the_grade(graded):
    """The model's input shows the grade as a fraction, whatever the spine's size: inside the outline of each
    labelled foramen (drawn in full at every grade) the share of fat in the side's slab falls from Normal/Mild to
    Moderate to Severe in disjoint ranges (measured: Normal 0.85-0.90, Moderate 0.39-0.61, Severe 0.02-0.09)."""
    items, truth = graded
    fat: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for it in items:
        st = truth[it["study_id"]]
        image = load_foramen_slabs(it["image"], 3, 14.0, it["canal_mm"])
        for s, side in enumerate(SIDES):
            entry = it["keypoints"][f"{side}_foramen"]
            for j, (level, mm, label) in enumerate(zip(LEVELS, entry["mm"], entry["label"])):
                if mm is not None and label >= 0:
                    foramen = (st.spine, level, float(st.lateral.foramen_narrowing[s, j]))
                    fat[label].append(_outline_fat(image, s, 3, mm, foramen))
    assert all(len(v) >= 4 for v in fat.values()), {k: len(v) for k, v in fat.items()}
    assert min(fat[0]) > 0.7 and max(fat[2]) < 0.2, fat
    assert min(fat[0]) > max(fat[1]) and min(fat[1]) > max(fat[2]), fat


def test_loader_channels_are_the_nearest_slices(items):
    it = items[0]
    num_slices = 3
    out = LoadForamenSlabsd(keys="image", num_slices=num_slices)(dict(it))
    image = out["image"]
    assert "canal_mm" not in out and image.shape[0] == 2 * num_slices
    headers = read_slice_headers(list_dicom_files(it["image"]))
    normal = headers[0].normal
    centre = np.mean([p for p in it["canal_mm"] if p is not None], axis=0)
    for s, sign in enumerate((1.0, -1.0)):
        target = centre + np.array([sign * 14.0, 0.0, 0.0])
        dist = sorted(headers, key=lambda h: abs(float(np.dot(h.position - target, normal))))
        nearest = {h.instance_number for h in dist[:num_slices]}
        channels = image.meta["instance_numbers"][s * num_slices : (s + 1) * num_slices]
        assert set(channels) == nearest
        xs = [next(h.position[0] for h in headers if h.instance_number == n) for n in channels]
        assert xs == sorted(xs)  # ascending patient x within a slab
        for c, n in enumerate(channels):
            h = next(h for h in headers if h.instance_number == n)
            np.testing.assert_array_equal(
                image[s * num_slices + c].numpy(), read_dicom_pixels(h.path).astype(np.float32)
            )
    np.testing.assert_allclose(image.affine.numpy()[:3, :2], image.meta["original_affine"][:3, :2])


def _copy(phantoms: Path, tmp_path: Path) -> Path:
    root = tmp_path / "rsna"
    root.mkdir()
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"):
        shutil.copy(phantoms / name, root / name)
    os.symlink(phantoms / "train_images", root / "train_images")
    return root


def test_bad_rows_give_clear_errors(phantoms, tmp_path):
    root = _copy(phantoms, tmp_path)
    path = root / "train_label_coordinates.csv"
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if "Left Neural Foraminal" in line)
    good = lines[index]
    parts = good.split(",")
    lines[index] = ",".join(parts[:5] + ["abc", parts[6]])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BundleInputError, match=rf"train_label_coordinates.csv, row {index + 1}.*non-numeric"):
        build_rsna_t1_datalist(root)
    lines[index] = ",".join(parts[:5] + ["5000.0", parts[6]])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BundleInputError, match=r"left_neural_foraminal_narrowing .*outside the referenced instance"):
        build_rsna_t1_datalist(root)


def test_study_without_t1_is_skipped_with_the_reason(phantoms, items, tmp_path, caplog):
    root = _copy(phantoms, tmp_path)
    study = items[0]["study_id"]
    t1 = {it["series_id"] for it in items if it["study_id"] == study}
    t1 |= {
        line.split(",")[1]
        for line in (root / "train_series_descriptions.csv").read_text().splitlines()
        if line.startswith(f"{study},") and "Sagittal T1" in line
    }
    for name in ("train_series_descriptions.csv", "train_label_coordinates.csv"):  # the series is gone
        path = root / name
        kept = [line for line in path.read_text().splitlines() if not any(f"{study},{sid}," in line for sid in t1)]
        path.write_text("\n".join(kept) + "\n")
    with caplog.at_level(logging.WARNING):
        out = build_rsna_t1_datalist(root)
    assert study not in {it["study_id"] for it in out} and f"study {study}: no Sagittal T1" in caplog.text
    kept_items = {it["study_id"]: it for it in build_rsna_t1_datalist(root, keep_unusable=True)}
    assert "no Sagittal T1 series" in kept_items[study]["skipped"]
    assert kept_items[study]["keypoints"]["left_foramen"]["label"] == items[0]["keypoints"]["left_foramen"]["label"]
    assert len(load_datalist(root, "rsna", "all", series="sagittal_t1")) == len(items) - 1


def test_tiny_t1_training_through_monai_bundle_writes_a_checkpoint(tmp_path):
    tiny = "--backbone_depth 18 --pixdim 4.375 --input_size 64 --batch_size 2 --num_workers 0 --phantom_studies 5"
    tiny += " --phantom_max_size 256 --codec#radius 2.0 --learning_rate 0.0005 --max_epochs 1"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--meta_file", "configs/metadata.json"]
    command += ["--config_file", "['configs/train.json','configs/sagittal_t1.json']", "--bundle_root", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command + tiny.split(), cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ckpt = tmp_path / "models" / "sagittal_t1"
    assert (ckpt / "model.pt").is_file() and (ckpt / "checkpoint.pt").is_file()
    import torch

    weights = torch.load(ckpt / "model.pt", weights_only=True)
    first = next(v for k, v in weights.items() if v.ndim == 4)
    assert first.shape[1] == 6  # in_channels = 2 * num_slices: left slab then right slab
    assert not (tmp_path / "models" / "model.pt").exists()  # the spinal model's folder is untouched


def test_batch_runs_skip_an_unreadable_t1_study_with_a_placeholder_of_both_slabs(items, tmp_path):
    """skip_unusable wraps the T1 loader too: a missing series folder becomes a skipped item whose placeholder
    has the 2 * num_slices channels the network takes (evaluation and inference keep going)."""
    from bundle.skipping import SKIPPED_KEY, skip_unusable
    from monai.transforms import Compose

    preprocessing = skip_unusable(Compose([LoadForamenSlabsd(keys="image", num_slices=3)]))
    good = preprocessing(dict(items[0]))
    assert good[SKIPPED_KEY] == "" and good["image"].shape[0] == 6
    bad = preprocessing({**items[0], "image": str(tmp_path / "missing_series")})
    assert "missing_series" in bad[SKIPPED_KEY] and bad["image"].shape[0] == 6
