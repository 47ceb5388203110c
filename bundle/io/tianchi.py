"""Datalist items from the Tianchi spinal disease (SDID-TC) layout.

Study folders mix several series; files are matched to the annotation by their
StudyInstanceUID / SeriesInstanceUID / SOPInstanceUID headers, indexed once without pixel data.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bundle.errors import BundleInputError
from bundle.io.dicom_series import pixel_to_patient, slice_header
from bundle.io.pixels import read_header
from bundle.skipping import skipped_item
from bundle.streams import TIANCHI_DISC_LEVELS, TIANCHI_STREAMS, TIANCHI_VERTEBRA_LEVELS, StreamSpec, parse_streams

__all__ = ["DEFAULT_TIANCHI_CLASS_MAP", "DicomIndex", "index_dicom_folder", "tag_class", "build_tianchi_datalist"]

logger = logging.getLogger(__name__)

# label -> class index; a tag listing several labels gets the largest class; "" is an empty tag
DEFAULT_TIANCHI_CLASS_MAP: dict[str, dict[str, int]] = {
    "vertebra": {"v1": 0, "v2": 1},
    "disc": {"": 0, "v1": 0, "v2": 1, "v3": 1, "v4": 1, "v5": 1},
}
_TAG_KEY = {"disc": "disc", "vertebra": "vertebra"}  # stream name -> key of the label in a point's "tag"
_KNOWN_IGNORED = {"T11-T12"}
_UID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]


@dataclass
class DicomIndex:
    """UIDs of every DICOM file under a folder."""

    by_sop: dict[str, Path] = field(default_factory=dict)
    by_series: dict[tuple[str, str], list[Path]] = field(default_factory=dict)  # (study, series) -> files


def index_dicom_folder(root: str | os.PathLike) -> DicomIndex:
    """Read the UID headers of all ``*.dcm`` files under ``root`` (recursive, no pixel data)."""
    root = Path(root)
    if not root.is_dir():
        raise BundleInputError(f"{root}: image folder not found")
    index = DicomIndex()
    for path in sorted(root.rglob("*.dcm")):
        try:
            ds = read_header(path, specific_tags=_UID_TAGS)
        except BundleInputError as err:
            logger.warning("skipping %s: %s", path, err)
            continue
        study, series, sop = (str(getattr(ds, t, "") or "") for t in _UID_TAGS)
        if sop:
            index.by_sop[sop] = path
        index.by_series.setdefault((study, series), []).append(path)
    if not index.by_sop:
        raise BundleInputError(f"{root}: no DICOM files (*.dcm) found")
    return index


def tag_class(value: str, class_map: Mapping[str, int], where: str) -> int:
    """Class of a tag value such as ``"v2"`` or ``"v3,v5"`` (largest class of its labels).

    An empty value uses the map's ``""`` entry, or is -1 (unscored) when the map has none.

    Example:
        >>> tag_class("v1,v5", DEFAULT_TIANCHI_CLASS_MAP["disc"], "demo")
        1
    """
    labels = [part.strip().lower() for part in str(value).split(",") if part.strip()]
    if not labels:
        return int(class_map[""]) if "" in class_map else -1
    unknown = [lb for lb in labels if lb not in class_map]
    if unknown:
        raise BundleInputError(f"{where}: unknown label(s) {unknown} in tag {value!r}; known {sorted(class_map)}")
    return max(int(class_map[lb]) for lb in labels)


def _stream_of(identification: str, streams: Sequence[StreamSpec]) -> tuple[StreamSpec | None, int]:
    for spec in streams:
        if identification in spec.levels:
            return spec, spec.levels.index(identification)
    return None, -1


def build_tianchi_datalist(
    images_root: str | os.PathLike,
    annotation_json: str | os.PathLike,
    *,
    class_map: Mapping[str, Mapping[str, int]] | None = None,
    streams: Mapping[str, Mapping] | Sequence[StreamSpec] = TIANCHI_STREAMS,
    index: DicomIndex | None = None,
    keep_unusable: bool = False,
) -> list[dict]:
    """Datalist items (project datalist format) for a Tianchi image folder and its annotation JSON.

    Args:
        images_root: folder of study folders (``study{N}/image{K}.dcm``, any depth).
        annotation_json: the competition's annotation file (list of studies).
        class_map: ``{stream: {label: class}}``; default ``DEFAULT_TIANCHI_CLASS_MAP`` (v1 normal, others
            degenerative; an empty disc tag is v1).
        streams: stream specs (default disc T12-L1..L5-S1, vertebra L1..L5); points of levels outside them
            (e.g. the rare T11-T12) are ignored with a debug log.
        index: a prebuilt :func:`index_dicom_folder` result (else built here).
        keep_unusable: an annotated series whose files are absent becomes a skipped item
            (:func:`bundle.skipping.skipped_item`) instead of an error (evaluation).

    Returns:
        one item per annotated series: ``{"image": [files of the series], "study_id": studyUid,
        "series_id": seriesUid, "keypoints": {stream: {"mm": [...], "label": [...]}}}``.
    """
    specs = parse_streams(streams)
    cmap = {k: dict(v) for k, v in (class_map or DEFAULT_TIANCHI_CLASS_MAP).items()}
    for spec in specs:
        if spec.name not in cmap:
            raise ValueError(f"class_map has no entry for stream {spec.name!r}")
        bad = {lb: c for lb, c in cmap[spec.name].items() if not 0 <= int(c) < spec.num_classes}
        if bad:
            raise ValueError(f"class_map[{spec.name!r}] has classes outside 0..{spec.num_classes - 1}: {bad}")
    known_levels = set(TIANCHI_DISC_LEVELS) | set(TIANCHI_VERTEBRA_LEVELS) | _KNOWN_IGNORED
    json_path = Path(annotation_json)
    if not json_path.is_file():
        raise BundleInputError(f"{json_path}: annotation file not found")
    try:
        studies = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleInputError(f"{json_path}: not valid JSON ({err})") from err
    if not isinstance(studies, list):
        raise BundleInputError(f"{json_path}: expected a list of studies, got {type(studies).__name__}")
    index = index or index_dicom_folder(images_root)

    items = []
    for s_i, study in enumerate(studies):
        try:
            study_uid = str(study["studyUid"])
            elements = list(study["data"])
        except (KeyError, TypeError) as err:
            raise BundleInputError(f"{json_path}: study #{s_i} lacks studyUid/data ({err})") from err
        for element in elements:
            where_study = f"{json_path}: study {study_uid}"
            try:
                series_uid, sop_uid = str(element["seriesUid"]), str(element["instanceUid"])
                annotations = list(element["annotation"])
                points = list(annotations[0]["data"]["point"]) if annotations else []
            except (KeyError, TypeError, IndexError) as err:
                raise BundleInputError(f"{where_study}: malformed series entry ({err!r})") from err
            files = index.by_series.get((study_uid, series_uid))
            missing = (
                f"no DICOM file of series {series_uid} under {images_root}"
                if not files
                else (
                    f"annotated instance {sop_uid} not found under {images_root}" if sop_uid not in index.by_sop else ""
                )
            )
            if missing and keep_unusable:  # evaluation: the batch run reports it (bundle.skipping)
                unlocated = {s.name: {"mm": [None] * s.num_levels, "label": [-1] * s.num_levels} for s in specs}
                items.append(skipped_item(study_uid, f"{where_study}: {missing}", series_uid, keypoints=unlocated))
                continue
            if missing:
                raise BundleInputError(f"{where_study}: {missing}")
            path = index.by_sop[sop_uid]
            header = slice_header(read_header(path), path)
            keypoints = {s.name: {"mm": [None] * s.num_levels, "label": [-1] * s.num_levels} for s in specs}
            for p_i, point in enumerate(points):
                where = f"{where_study}, point #{p_i}"
                try:
                    tag = dict(point["tag"])
                    identification = str(tag["identification"]).strip()
                    x, y = (float(v) for v in point["coord"])
                except (KeyError, TypeError, ValueError) as err:
                    raise BundleInputError(f"{where}: malformed point {point!r} ({err!r})") from err
                where = f"{where_study}, point #{p_i} ({identification})"
                if identification not in known_levels:
                    raise BundleInputError(f"{where}: unknown identification {identification!r}")
                spec, level = _stream_of(identification, specs)
                if spec is None:
                    logger.debug("%s: level outside the configured streams, ignored", where)
                    continue
                key = _TAG_KEY.get(spec.name, spec.name)
                if key not in tag:
                    raise BundleInputError(f"{where}: tag has no {key!r} label: {tag}")
                if not (math.isfinite(x) and math.isfinite(y) and 0 <= x < header.cols and 0 <= y < header.rows):
                    raise BundleInputError(
                        f"{where}: coord ({x}, {y}) outside the annotated instance ({header.cols} x {header.rows})"
                    )
                entry = keypoints[spec.name]
                if entry["mm"][level] is not None:
                    logger.warning("%s: duplicate point, the first one is kept", where)
                    continue
                entry["mm"][level] = [float(v) for v in pixel_to_patient(header, x, y)]
                entry["label"][level] = tag_class(tag[key], cmap[spec.name], where)
            items.append(
                {
                    "image": [str(f.resolve()) for f in files],
                    "study_id": study_uid,
                    "series_id": series_uid,
                    "keypoints": keypoints,
                }
            )
    return items
