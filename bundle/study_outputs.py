"""Outputs of the study-level inference (:class:`bundle.study_engine.StudyEvaluator`), per study and per run.

Per study ``output_dir/{study_id}/``: ``keypoints.json`` (every condition's points, each with its series type,
``series_id``, ``instance_number`` and ``x``, ``y`` on that instance, see :func:`bundle.outputs.keypoint_record`;
which series were used and why others were not) and one overlay per series type used
(``overlay_sagittal_t2.png``; ``overlay_sagittal_t1.png``: the left and right slab centre slices side by side;
``overlay_axial_t2.png``: the per-level axial slices in a row). Per run: ``submission.csv`` with all 25 rows of
every study; a condition-level without a prediction gets the constant prior (its reason is in the result's
``partial`` list, which ``bundle.skipping.SkippedStudiesWriter`` writes to ``skipped.csv``). No keypoints.json
for a study without a usable sagittal T2: its 25 rows are the prior.
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
from bundle.atomic import atomic_write_text
from bundle.outputs import RSNA_PRIOR, render_overlay
from bundle.rsna_labels import CONDITIONS, LEVEL_KEYS, snake
from ignite.engine import Engine, Events

__all__ = ["StudyWriter", "overlay_panels", "study_rows"]

logger = logging.getLogger(__name__)


def study_rows(
    study_id: str, records: Sequence[Mapping[str, Any]], prior: Mapping[str, Sequence[float]]
) -> list[tuple[str, tuple[float, ...]]]:
    """The 25 submission rows ``(row_id, (normal_mild, moderate, severe))`` of a study: the highest-scoring
    record of each condition-level, else ``prior[condition]``."""
    best: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in records:
        key = (r["condition"], snake(r["level"]))
        if len(r["probabilities"]) == 3 and (key not in best or r["score"] > best[key]["score"]):
            best[key] = r
    rows = []
    for condition in CONDITIONS:
        for level in LEVEL_KEYS:
            hit = best.get((condition, level))
            probs = tuple(hit["probabilities"].values()) if hit else tuple(prior[condition])
            rows.append((f"{study_id}_{condition}_{level}", tuple(float(p) for p in probs)))
    return rows


def overlay_panels(panels: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> tuple[np.ndarray, list[dict]]:
    """Slices (file, its records) side by side, each top-aligned and zero-padded to the tallest: the image
    (rows, sum of cols) and the records with ``x`` shifted by the widths to their left."""
    from bundle.io import read_dicom_pixels

    slices = [np.asarray(read_dicom_pixels(path), dtype=np.float32) for path, _ in panels]
    height = max(s.shape[0] for s in slices)
    out, points, left = [], [], 0
    for image, (_, records) in zip(slices, panels):
        out.append(np.pad(image, ((0, height - image.shape[0]), (0, 0))))
        points += [{**r, "x": r["x"] + left} for r in records]
        left += image.shape[1]
    return np.concatenate(out, axis=1), points


class StudyWriter:
    """Write each study's ``keypoints.json`` and overlays after every iteration, ``submission.csv`` at the end.

    Args:
        output_dir: root of the outputs; nothing is written outside it.
        prior: per-condition constant prediction (``bundle.read_rsna_prior``), for rows without a prediction.
        overlay: write the per-series overlays.
    """

    def __init__(
        self, output_dir: str | Path, prior: Mapping[str, Sequence[float]] | None = None, overlay: bool = True
    ) -> None:
        self.output_dir = Path(output_dir)
        self.prior = {k: tuple(v) for k, v in (prior or RSNA_PRIOR).items()}
        self.overlay = overlay
        self.rows: list[tuple[str, tuple[float, ...]]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_iteration)
        engine.add_event_handler(Events.COMPLETED, self.write_submission)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def write_iteration(self, engine: Engine) -> None:
        """Write the study results of one iteration (``engine.state.output``: a list, one dict per study)."""
        output = engine.state.output
        if not isinstance(output, list):
            raise TypeError("StudyWriter needs the StudyEvaluator's output: a list of study results")
        for result in output:
            if result["skipped"]:
                self.rows += study_rows(result["study_id"], [], self.prior)
                continue
            self.write_study(result)

    def write_study(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """``keypoints.json`` and overlays of one study result; its rows are added; returns the JSON content."""
        study_id = str(result["study_id"])
        content = {
            "study_id": study_id,
            "series": result["series"],
            "keypoints": list(result["keypoints"]),
            "constant_rows": list(result.get("partial", [])),
        }
        study_dir = self.output_dir / study_id
        study_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(study_dir / "keypoints.json", json.dumps(content, indent=2))
        if self.overlay:
            for kind, panels in result["overlays"].items():
                if panels:
                    image, points = overlay_panels(panels)
                    render_overlay(image, points, study_dir / f"overlay_{kind}.png")
        self.rows += study_rows(study_id, content["keypoints"], self.prior)
        return content

    def write_submission(self, engine: Engine) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["row_id", "normal_mild", "moderate", "severe"])
        for row_id, probs in self.rows:
            writer.writerow([row_id, *(f"{p:.6f}" for p in probs)])
        atomic_write_text(self.output_dir / "submission.csv", buffer.getvalue())
        logger.info(f"submission with {len(self.rows)} rows written to {self.output_dir / 'submission.csv'}")
