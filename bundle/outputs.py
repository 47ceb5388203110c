"""Inference outputs per study: ``keypoints.json``, ``overlay.png`` and, for RSNA, ``submission.csv``.

Keypoints come from the evaluator in patient mm; they are mapped back to the pixels of the middle
instance of the original series with its own geometry. Only de-identified fields are written.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bundle.atomic import atomic_write_bytes, atomic_write_text
from bundle.codec import mm_to_pixels_np, pixels_to_mm_np
from bundle.csvrows import read_csv_rows
from bundle.intensity import percentiles
from bundle.rsna_labels import CONDITIONS, GROUPS
from bundle.rsna_labels import LEVEL_KEYS as LEVELS
from bundle.rsna_labels import SAMPLE_WEIGHTS, SEVERITIES, snake
from bundle.skipping import SKIPPED_KEY
from bundle.streams import AXIAL_LEVEL, STREAM_CONDITIONS, StreamSpec, parse_streams
from ignite.engine import Engine, Events

__all__ = [
    "KeypointsWriter",
    "RsnaScoreHandler",
    "keypoint_record",
    "keypoints_to_pixels",
    "render_overlay",
    "RSNA_CLASS_FREQUENCIES",
    "RSNA_PRIOR",
    "best_constant",
    "read_rsna_prior",
]

logger = logging.getLogger(__name__)
#: zlib level of overlay.png: 1 writes a 512 x 512 overlay in about a quarter of the default (6)'s time for
#: about 4% more bytes
PNG_COMPRESS_LEVEL = 1
#: overlay.png is a palette image: grey levels 0 .. OVERLAY_GREYS - 1 for the slice, then one entry per marker
#: colour (class 0, 1, 2, other); a palette PNG is written unfiltered, in a third of an RGB one's time
OVERLAY_COLOURS = ((60, 220, 60), (255, 200, 0), (255, 60, 60), (80, 160, 255))
OVERLAY_GREYS = 256 - len(OVERLAY_COLOURS)
_OVERLAY_PALETTE = [round(255 * i / (OVERLAY_GREYS - 1)) for i in range(OVERLAY_GREYS) for _ in range(3)] + [
    v for rgb in OVERLAY_COLOURS for v in rgb
]

# Class frequencies (Normal/Mild, Moderate, Severe) of the RSNA 2024 training labels (train.csv, 1,975 studies)
# per condition group; used when no train.csv is at hand.
RSNA_CLASS_FREQUENCIES: dict[str, tuple[float, float, float]] = {
    "spinal": (0.878, 0.075, 0.048),
    "foraminal": (0.780, 0.181, 0.040),
    "subarticular": (0.714, 0.190, 0.096),
}


def best_constant(frequencies: Sequence[float], weights: Sequence[float] = SAMPLE_WEIGHTS) -> tuple[float, ...]:
    """The constant prediction with the lowest expected weighted log loss: ``p_c = w_c f_c / sum_k w_k f_k``.

    The expected loss ``-sum_c w_c f_c log p_c`` over the probability simplex is minimised (Gibbs'
    inequality) by ``p`` proportional to ``w_c f_c``; with the competition's weights 1, 2, 4 this moves mass
    to the rarer, heavier classes, and beats both the plain frequencies and the uniform prediction.

    Example:
        >>> [round(p, 4) for p in best_constant((0.5, 0.25, 0.25))]
        [0.25, 0.25, 0.5]
    """
    mass = np.asarray(frequencies, dtype=np.float64) * np.asarray(weights, dtype=np.float64)
    if mass.ndim != 1 or mass.sum() <= 0 or (mass < 0).any():
        raise ValueError(f"need non-negative frequencies with a positive weighted sum, got {list(frequencies)}")
    return tuple(float(v) for v in mass / mass.sum())


def _condition_group(condition: str) -> str:
    return next(g for g in GROUPS if g in condition)


#: constant prediction per condition for rows the model does not predict (no train.csv at hand)
RSNA_PRIOR: dict[str, tuple[float, ...]] = {
    c: best_constant(RSNA_CLASS_FREQUENCIES[_condition_group(c)]) for c in CONDITIONS
}


def read_rsna_prior(train_csv: str | Path | None) -> dict[str, tuple[float, ...]]:
    """Per-condition constant prediction (:func:`best_constant`) from a ``train.csv``'s class counts (add-one
    smoothed, empty cells ignored), or from ``RSNA_CLASS_FREQUENCIES`` when the file is absent."""
    prior = dict(RSNA_PRIOR)
    if not train_csv or not Path(train_csv).is_file():
        return prior
    counts = {c: np.zeros(len(SEVERITIES)) for c in CONDITIONS}
    for _, row in read_csv_rows(train_csv, ["study_id"], what="train.csv"):
        for condition in CONDITIONS:
            for level in LEVELS:
                value = row.get(f"{condition}_{level}", "")
                if value in SEVERITIES:
                    counts[condition][SEVERITIES.index(value)] += 1
    for condition, count in counts.items():
        if count.sum() > 0:
            prior[condition] = best_constant((count + 1.0) / (count.sum() + len(SEVERITIES)))  # no class gets 0
    return prior


def keypoints_to_pixels(mm: Sequence[float], affine: np.ndarray) -> tuple[float, float]:
    """Patient mm (3,) to ``(x, y)`` = (column, row) pixels of the slice whose 4x4 voxel-to-mm affine is given."""
    x, y = mm_to_pixels_np(np.asarray(mm, dtype=np.float64).reshape(1, 3), affine)[0]
    return float(x), float(y)


def clamp_to_image(
    mm: Sequence[float], affine: np.ndarray, image_size: Sequence[int]
) -> tuple[float, float, np.ndarray, bool]:
    """``(x, y, mm, inside)`` of a patient-mm point (3,) on the slice of 4x4 ``affine`` whose image is
    ``image_size = (rows, cols)`` pixels: a point outside the image is moved in-plane to the nearest pixel
    centre of its border (its distance along the slice normal kept), so that ``x, y`` name a real pixel.

    Example:
        >>> x, y, mm, inside = clamp_to_image([5.0, -2.0, 1.0], np.eye(4), (4, 4))
        >>> (x, y, mm.tolist(), inside)
        (0.0, 3.0, [3.0, 0.0, 1.0], False)
    """
    point = np.asarray(mm, dtype=np.float64).reshape(3)
    x, y = keypoints_to_pixels(point, affine)
    rows, cols = (int(v) for v in image_size[:2])
    cx, cy = min(max(x, 0.0), cols - 1.0), min(max(y, 0.0), rows - 1.0)
    if (cx, cy) == (x, y):
        return x, y, point, True
    border, here = pixels_to_mm_np([[cx, cy], [x, y]], affine)  # both on the plane: the shift is in-plane
    return cx, cy, point + (border - here), False


def keypoint_record(
    spec: StreamSpec,
    point: Mapping[str, Any],
    affine: np.ndarray,
    instance_number: int,
    ndigits: int | None = None,
    image_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One decoded keypoint as written out: ``stream, level, level_confidence, x, y`` (pixels of the slice
    whose 4x4 voxel-to-mm ``affine`` is given), ``instance_number``, ``position_mm``, ``label`` (class name),
    ``label_index``, ``probabilities`` ({class: p}) and ``score``; floats rounded to ``ndigits`` when given.
    With ``image_size = (rows, cols)`` a point outside the image is moved onto its border
    (:func:`clamp_to_image`) and ``inside_image`` says whether it was inside."""

    def num(value: float) -> float:
        return round(float(value), ndigits) if ndigits is not None else float(value)

    mm, inside = np.asarray(point["mm"], dtype=np.float64), True
    if image_size is None:
        x, y = keypoints_to_pixels(mm, affine)
    else:
        x, y, mm, inside = clamp_to_image(mm, affine, image_size)
    record = {
        "stream": spec.name,
        "level": point["level"],
        "level_confidence": num(point.get("level_confidence", 1.0)),
        "x": num(x),
        "y": num(y),
        "instance_number": int(instance_number),
        "position_mm": [num(v) for v in mm],
        "label": spec.classes[point["label"]],
        "label_index": int(point["label"]),
        "probabilities": {c: num(p) for c, p in zip(spec.classes, point["probabilities"])},
        "score": num(point["score"]),
    }
    if image_size is not None:
        record["inside_image"] = bool(inside)
    return record


def render_overlay(slice_2d: np.ndarray, points: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Draw keypoints (``x``, ``y``, ``level``, ``label``, ``label_index``) with level and class on a 2D slice
    (rows, cols); write a palette PNG atomically (``OVERLAY_GREYS`` grey levels, then the marker colours)."""
    from PIL import Image, ImageDraw

    arr = np.asarray(slice_2d, dtype=np.float32)
    lo, hi = percentiles(arr, (0.5, 99.5)) if arr.size else (0.0, 1.0)
    grey = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1) * (OVERLAY_GREYS - 1)
    image = Image.fromarray(np.rint(grey).astype(np.uint8))
    image.putpalette(_OVERLAY_PALETTE)  # the greyscale image becomes a palette image
    draw = ImageDraw.Draw(image)
    radius = max(3, round(min(arr.shape) / 128))
    for point in points:
        x, y = point["x"], point["y"]
        colour = OVERLAY_GREYS + int(point.get("label_index", 0)) % len(OVERLAY_COLOURS)  # palette index
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=2)
        draw.text((x + radius + 3, y - radius - 3), f"{point['level']} {point['label']}", fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    atomic_write_bytes(path, buffer.getvalue())


class KeypointsWriter:
    """Write each study's outputs after every evaluator iteration, and ``submission.csv`` at the end (RSNA).

    Args:
        output_dir: root of the outputs; nothing is written outside it.
        streams: the model's streams (names, levels, classes).
        dataset_format: ``"rsna"`` adds ``submission.csv`` (25 rows per study, competition format).
        submission_streams: ``{stream: rsna condition}`` that the model predicts; other conditions get ``prior``.
            Default for RSNA: ``bundle.streams.STREAM_CONDITIONS`` of the model's streams.

    Items of one study may come in several iterations (the axial model: one item per level, its ``level``
    naming the disc; keypoints.json then goes to ``{study}/{level key}/``): the submission has 25 rows per
    study, each from the item that predicted it.
        prior: per-condition constant prediction (see ``read_rsna_prior``).
        overlay: write ``overlay.png`` per study.
    """

    def __init__(
        self,
        output_dir: str | Path,
        streams: Mapping[str, Mapping] | Sequence[StreamSpec],
        dataset_format: str = "rsna",
        submission_streams: Mapping[str, str] | None = None,
        prior: Mapping[str, Sequence[float]] | None = None,
        overlay: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.specs = parse_streams(streams)
        self.dataset_format = dataset_format
        default = {s.name: STREAM_CONDITIONS[s.name] for s in self.specs if s.name in STREAM_CONDITIONS}
        self.submission_streams = dict(submission_streams or (default if dataset_format == "rsna" else {}))
        self.prior = {k: tuple(v) for k, v in (prior or RSNA_PRIOR).items()}
        self.overlay = overlay
        self.predicted: dict[str, dict[tuple[str, str], tuple[float, ...]]] = {}

    @property
    def rows(self) -> list[tuple[str, tuple[float, ...]]]:
        """Submission rows ``(row_id, probabilities)`` of the studies seen, 25 per study, in order seen."""
        return [
            (
                f"{study}_{condition}_{level}",
                tuple(float(p) for p in found.get((condition, level), self.prior[condition])),
            )
            for study, found in self.predicted.items()
            for condition in CONDITIONS
            for level in LEVELS
        ]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_iteration)
        if self.dataset_format == "rsna":
            engine.add_event_handler(Events.COMPLETED, self.write_submission)

    def _reset(self, engine: Engine) -> None:
        self.predicted = {}

    def write_iteration(self, engine: Engine) -> None:
        """Write the studies of one evaluator iteration: its decollated batch and output (``keypoints``)."""
        batch, output = engine.state.batch, engine.state.output
        if isinstance(batch, Mapping) or isinstance(output, Mapping):
            raise TypeError("KeypointsWriter needs the evaluator's decollated batch and output (decollate=True)")
        for item, result in zip(batch, output):
            if item.get(SKIPPED_KEY):  # no keypoints.json for a skipped study; its rows get the constant prediction
                if self.dataset_format == "rsna":
                    self._add_submission_rows(str(item["study_id"]), [], item.get("level"))
                continue
            self.write_study(item, result["keypoints"])

    def write_study(self, item: Mapping[str, Any], predicted: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict:
        """Write ``keypoints.json`` (and ``overlay.png``) of one study; return the JSON content."""
        meta = item["image"].meta
        study_id = str(item.get("study_id", meta.get("study_id", "study")))
        series_id = str(item.get("series_id", meta.get("series_id", meta.get("series_instance_uid", ""))))
        original_affine = np.asarray(meta["original_affine"], dtype=np.float64)
        instance_number = int(meta["middle_instance_number"])
        size = np.asarray(meta["spatial_shape"]).reshape(-1)[:2] if "spatial_shape" in meta else None
        points = [
            keypoint_record(spec, point, original_affine, instance_number, ndigits=5, image_size=size)
            for spec in self.specs
            for point in predicted.get(spec.name, [])
        ]
        content = {
            "study_id": study_id,
            "series_id": series_id,
            "instance_number": instance_number,
            "keypoints": points,
        }
        level = item.get("level")
        study_dir = self.output_dir / study_id / (snake(str(level)) if level else "")
        study_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(study_dir / "keypoints.json", json.dumps(content, indent=2))
        if self.overlay:
            render_overlay(self._middle_slice(meta), points, study_dir / "overlay.png")
        if self.dataset_format == "rsna":
            self._add_submission_rows(study_id, points, level)
        return content

    @staticmethod
    def _middle_slice(meta: Mapping[str, Any]) -> np.ndarray:
        from bundle.io import read_dicom_pixels

        return read_dicom_pixels(meta["middle_filename"])

    def _add_submission_rows(
        self, study_id: str, points: Sequence[Mapping[str, Any]], item_level: str | None = None
    ) -> None:
        """Record a study's predicted (condition, level) probabilities; a point of the axial model's one level
        (``AXIAL_LEVEL``) takes the item's ``level``."""
        predicted = self.predicted.setdefault(study_id, {})
        for point in points:
            condition = self.submission_streams.get(point["stream"])
            if condition is None or len(point["probabilities"]) != 3:
                continue
            level = item_level if point["level"] == AXIAL_LEVEL and item_level else point["level"]
            predicted[(condition, snake(str(level)))] = tuple(point["probabilities"].values())

    def write_submission(self, engine: Engine) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["row_id", "normal_mild", "moderate", "severe"])
        for row_id, probs in self.rows:
            writer.writerow([row_id, *(f"{p:.6f}" for p in probs)])
        atomic_write_text(self.output_dir / "submission.csv", buffer.getvalue())
        logger.info(f"submission with {len(self.rows)} rows written to {self.output_dir / 'submission.csv'}")


class RsnaScoreHandler:
    """After an evaluation, score the writer's predictions with the RSNA 2024 competition metric.

    Only the conditions the model covers (``writer.submission_streams``) are scored, against the rows of
    ``solution_csv`` (a train.csv) of the evaluated studies. The result lands in
    ``engine.state.extra_metrics["rsna"]`` for ``MetricsWriter``.
    """

    def __init__(self, solution_csv: str | Path, writer: KeypointsWriter) -> None:
        self.solution_csv = Path(solution_csv)
        self.writer = writer

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        from bundle.rsna_metric import read_rsna_solution, rsna_score

        covered = tuple(self.writer.submission_streams.values())
        rows = [
            {"row_id": row_id, "normal_mild": p[0], "moderate": p[1], "severe": p[2]}
            for row_id, p in self.writer.rows
            if any(f"_{condition}_" in row_id for condition in covered)
        ]
        if not rows or not self.solution_csv.is_file():
            logger.warning(f"RSNA score skipped: {'no predictions' if not rows else f'{self.solution_csv} missing'}")
            return
        solution = read_rsna_solution(self.solution_csv)
        score = rsna_score(solution, rows, solution_name=str(self.solution_csv), submission_name="predictions")
        extra = getattr(engine.state, "extra_metrics", {})
        extra["rsna"] = score
        engine.state.extra_metrics = extra
        logger.info(f"RSNA competition metric on {', '.join(covered)}: {score}")
