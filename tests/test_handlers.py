"""Handlers: objective-association switch, resumable state, in-plane projection, keypoint metric, writers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from bundle.handlers import (
    KeypointDetectionMetric,
    ObjectiveAssociationHandler,
    TrainingStateCheckpoint,
    atomic_write_text,
    in_plane,
)
from bundle.losses import SpineOneLoss
from bundle.outputs import KeypointsWriter, clamp_to_image, keypoint_record, keypoints_to_pixels, read_rsna_prior
from bundle.streams import RSNA_STREAMS
from ignite.engine import Engine, Events
from stream_fixtures import streams


def _run_epochs(handler: ObjectiveAssociationHandler, max_epochs: int) -> list[bool]:
    seen: list[bool] = []
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(handler.loss.oa_enabled))
    engine.run([0], max_epochs=max_epochs)
    return seen


def test_oa_switches_on_at_fraction_of_epochs():
    loss = SpineOneLoss(streams(disc=3))
    seen = _run_epochs(ObjectiveAssociationHandler(loss, start_fraction=0.75), max_epochs=8)
    # epochs 1..6 off (75% of 8 = 6 epochs done), 7 and 8 on
    assert seen == [False] * 6 + [True] * 2


def test_oa_disabled_and_argument_checks():
    loss = SpineOneLoss(streams(disc=3))
    assert _run_epochs(ObjectiveAssociationHandler(loss, start_fraction=0.0, enabled=False), 3) == [False] * 3
    assert _run_epochs(ObjectiveAssociationHandler(loss, start_fraction=0.0), 2) == [True, True]
    with pytest.raises(ValueError, match="start_fraction"):
        ObjectiveAssociationHandler(loss, start_fraction=1.5)
    with pytest.raises(TypeError, match="oa_enabled"):
        ObjectiveAssociationHandler(torch.nn.L1Loss())


def _trainer(model, optimizer, path, stop_after=None):
    def step(engine, batch):
        optimizer.zero_grad()
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    engine = Engine(step)
    TrainingStateCheckpoint(path, {"model": model, "optimizer": optimizer}).attach(engine)
    if stop_after is not None:

        def interrupt(e):
            if e.state.epoch == stop_after:
                raise KeyboardInterrupt

        engine.add_event_handler(Events.EPOCH_COMPLETED, interrupt)
    return engine


def test_training_state_resumes_after_interruption(tmp_path):
    data = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        return model, torch.optim.Adam(model.parameters(), lr=0.1)

    model_ref, opt_ref = fresh()
    ref_engine = Engine(lambda e, b: (opt_ref.zero_grad(), model_ref(b).pow(2).mean().backward(), opt_ref.step()))
    ref_engine.run(data, max_epochs=4)

    path = tmp_path / "models" / "checkpoint.pt"
    model, opt = fresh()
    with pytest.raises(KeyboardInterrupt):
        _trainer(model, opt, path, stop_after=2).run(data, max_epochs=4)
    assert path.exists() and not list(path.parent.glob(".*tmp"))

    model2, opt2 = fresh()  # a new process: fresh weights, state comes from the file
    epochs_run = []
    engine = _trainer(model2, opt2, path)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs_run.append(e.state.epoch))
    engine.run(data, max_epochs=4)
    assert epochs_run == [3, 4]
    for p_ref, p in zip(model_ref.parameters(), model2.parameters()):
        torch.testing.assert_close(p, p_ref)


def test_training_state_rejects_corrupt_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("not a checkpoint")
    model = torch.nn.Linear(2, 2)
    engine = _trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), path)
    with pytest.raises(RuntimeError, match="cannot resume"):
        engine.run([torch.zeros(1, 2)], max_epochs=1)


def test_atomic_write_text_replaces_whole_file(tmp_path):
    target = tmp_path / "out" / "a.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def _oblique_affine() -> np.ndarray:
    row_dir = np.array([0.0, 0.1, -1.0]) / np.linalg.norm([0.0, 0.1, -1.0])
    col_dir = np.array([0.05, 1.0, 0.1])
    col_dir -= row_dir * (col_dir @ row_dir)
    col_dir /= np.linalg.norm(col_dir)
    normal = np.cross(col_dir, row_dir)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = 0.6 * row_dir, 0.5 * col_dir, 4.0 * normal
    affine[:3, 3] = [-10.0, -80.0, 120.0]
    return affine


def test_in_plane_drops_only_the_normal_component():
    affine = _oblique_affine()
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    on_plane = (affine @ np.array([12.0, 30.0, 0.0, 1.0]))[:3]
    shifted = on_plane + 7.5 * normal
    np.testing.assert_allclose(in_plane(np.stack([shifted, on_plane]), affine), np.stack([on_plane, on_plane]))


def test_keypoints_to_pixels_inverts_the_affine():
    affine = _oblique_affine()
    mm = (affine @ np.array([40.25, 17.5, 0.0, 1.0]))[:3]
    assert keypoints_to_pixels(mm, affine) == pytest.approx((17.5, 40.25))


def test_points_outside_the_image_move_onto_its_border_keeping_their_normal_offset():
    affine = _oblique_affine()
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    normal /= np.linalg.norm(normal)
    outside = (affine @ np.array([70.0, -3.0, 0.0, 1.0]))[:3] + 2.5 * normal  # row 70, column -3 of a 64 x 48 image
    x, y, mm, inside = clamp_to_image(outside, affine, (64, 48))
    assert not inside and (x, y) == pytest.approx((0.0, 63.0))
    np.testing.assert_allclose(mm, (affine @ np.array([63.0, 0.0, 0.0, 1.0]))[:3] + 2.5 * normal, atol=1e-9)
    within = (affine @ np.array([10.0, 20.0, 0.0, 1.0]))[:3]
    x, y, mm, inside = clamp_to_image(within, affine, (64, 48))
    assert inside and (x, y) == pytest.approx((20.0, 10.0)) and np.allclose(mm, within)
    point = {"level": "L1/L2", "label": 0, "probabilities": [1.0, 0.0, 0.0], "score": 1.0, "mm": outside.tolist()}
    record = keypoint_record(RSNA_STREAMS[0], point, affine, 3, image_size=(64, 48))
    assert record["inside_image"] is False and (record["x"], record["y"]) == pytest.approx((0.0, 63.0))
    assert "inside_image" not in keypoint_record(RSNA_STREAMS[0], point, affine, 3)


def test_keypoint_metric_uses_in_plane_distance():
    from monai.data import MetaTensor

    affine = _oblique_affine()
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    spec = RSNA_STREAMS[0]
    gt = np.stack([(affine @ np.array([10.0 * i, 5.0, 0.0, 1.0]))[:3] for i in range(5)])
    gt_off_plane = gt + 9.0 * normal  # 9 mm out of plane: still a hit in-plane
    labels = np.array([0, 1, 2, 0, -1])
    predicted = [
        {
            "level_index": i,
            "label": int(max(labels[i], 0)),
            "mm": gt[i].tolist() if i != 3 else (gt[i] + [0, 0, 20]).tolist(),
        }
        for i in range(5)
    ]
    metric = KeypointDetectionMetric({"disc": {"levels": spec.levels, "classes": spec.classes}})
    metric.reset()
    image = MetaTensor(torch.zeros(7, 8, 8), affine=torch.as_tensor(affine))
    truth = {"disc_points": torch.as_tensor(gt_off_plane), "disc_labels": torch.as_tensor(labels)}
    metric.update([{"image": image, "label": truth, "keypoints": {"disc": predicted}}])  # decollated evaluator output
    score = metric.compute()
    result = metric.results["disc"]
    assert result["pck"]["6"] == pytest.approx(4 / 5)  # level 3 is 20 mm off
    assert result["counts"]["Normal/Mild"]["tp"] == 1 and result["counts"]["Normal/Mild"]["fn"] == 1
    assert result["counts"]["Moderate"]["tp"] == 1 and result["counts"]["Severe"]["tp"] == 1
    assert score == pytest.approx((result["macro_f1"] + 0.8) / 2)


def _item_with_meta(affine: np.ndarray, middle_file: str):
    from monai.data import MetaTensor

    meta = {"original_affine": affine, "middle_instance_number": 8, "middle_filename": middle_file}
    return {
        "image": MetaTensor(torch.zeros(7, 4, 4), affine=torch.as_tensor(affine), meta=meta),
        "study_id": "42",
        "series_id": "7",
    }


def test_keypoints_writer_json_and_submission(tmp_path):
    affine = _oblique_affine()
    spec = RSNA_STREAMS[0]
    predicted = {
        "disc": [
            {
                "level": lvl,
                "level_index": i,
                "label": i % 3,
                "probabilities": (
                    [0.7, 0.2, 0.1] if i % 3 == 0 else [0.1, 0.6, 0.3] if i % 3 == 1 else [0.05, 0.15, 0.8]
                ),
                "score": 0.9,
                "mm": (affine @ np.array([20.0 + 10 * i, 30.0, 0.0, 1.0]))[:3].tolist(),
            }
            for i, lvl in enumerate(spec.levels)
        ]
    }
    writer = KeypointsWriter(tmp_path / "out", RSNA_STREAMS, dataset_format="rsna", overlay=False)
    content = writer.write_study(_item_with_meta(affine, "unused"), predicted)
    saved = json.loads((tmp_path / "out" / "42" / "keypoints.json").read_text())
    assert saved == content
    assert saved["study_id"] == "42" and saved["instance_number"] == 8 and len(saved["keypoints"]) == 5
    first = saved["keypoints"][0]
    assert first["level"] == "L1/L2" and first["label"] == "Normal/Mild"
    assert (first["x"], first["y"]) == pytest.approx((30.0, 20.0), abs=0.01)
    assert set(first["probabilities"]) == set(spec.classes)
    writer.write_submission(None)
    with open(tmp_path / "out" / "submission.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 25
    by_id = {r["row_id"]: r for r in rows}
    assert float(by_id["42_spinal_canal_stenosis_l3_l4"]["severe"]) == pytest.approx(0.8)
    prior = writer.prior["left_subarticular_stenosis"]
    assert float(by_id["42_left_subarticular_stenosis_l1_l2"]["normal_mild"]) == pytest.approx(prior[0], abs=1e-6)


def test_rsna_prior_from_train_csv(tmp_path):
    from bundle.rsna_metric import LABEL_COLUMNS

    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study_id", *LABEL_COLUMNS])
        writer.writerow(["1", *(["Severe"] * 5 + [""] * 20)])
        writer.writerow(["2", *(["Normal/Mild"] * 5 + [""] * 20)])
    prior = read_rsna_prior(path)
    # counts (5, 0, 5) smoothed to (6, 1, 6) / 13; the weighted constant is (6 * 1, 1 * 2, 6 * 4) / 32
    assert prior["spinal_canal_stenosis"] == pytest.approx((6 / 32, 2 / 32, 24 / 32))
    assert prior["left_neural_foraminal_narrowing"] == read_rsna_prior(None)["left_neural_foraminal_narrowing"]


def test_inference_optimizer_folds_batchnorm_after_loading():
    from bundle.handlers import InferenceOptimizer
    from bundle.networks import SpineOne

    torch.manual_seed(0)
    net = SpineOne(streams(disc=3), backbone_depth=18).eval()
    for module in net.modules():  # non-trivial running statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 7, 64, 64)
    with torch.no_grad():
        expected = net(x)
    engine = Engine(lambda e, b: None)
    InferenceOptimizer(net).attach(engine)
    engine.run([0], max_epochs=1)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    with torch.inference_mode():
        torch.testing.assert_close(net(x), expected, atol=1e-4, rtol=1e-4)


def test_overlay_shows_the_slice_in_grey_and_each_class_in_its_colour(tmp_path):
    """overlay.png: the slice's 0.5/99.5 percentiles map to black and white, the markers to their class colour."""
    from bundle.outputs import OVERLAY_COLOURS, render_overlay
    from PIL import Image

    rows, cols = 96, 128
    slice_2d = np.tile(np.linspace(100.0, 1100.0, cols, dtype=np.float32), (rows, 1))
    points = [{"x": 30.0, "y": 40.0, "level": "L1/L2", "label": "Normal/Mild", "label_index": 0}]
    points.append({"x": 90.0, "y": 60.0, "level": "L4/L5", "label": "Severe", "label_index": 2})
    render_overlay(slice_2d, points, tmp_path / "overlay.png")
    rgb = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).astype(int)
    assert rgb.shape == (rows, cols, 3)
    assert tuple(rgb[5, 0]) == (0, 0, 0) and tuple(rgb[5, -1]) == (255, 255, 255)  # grey ramp, no marker there
    grey = rgb[5, 1:-1]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all() and (np.diff(grey[:, 0]) >= 0).all()
    for point in points:  # the circle's rim, radius 3 pixels: left edge at x - 3
        y, x = int(point["y"]), int(point["x"]) - 3
        assert tuple(rgb[y, x]) == OVERLAY_COLOURS[point["label_index"]]
