"""Study-level inference: the three series models of an RSNA study in one evaluator iteration.

One iteration = one study (batch size 1; a larger batch is looped over). :class:`StudyEvaluator` is MONAI's
``SupervisedEvaluator``: its own iteration runs the sagittal T2 network on the batch (``prepare_batch``, the
configured ``inferer``, the FORWARD/MODEL_COMPLETED events), then, per study,

1. the spinal canal points (patient mm) are decoded with the sagittal T2 codec;
2. the sagittal T1 model runs on ``LoadForamenSlabsd`` with ``canal_mm`` = those points, and its left/right
   foramen points are moved from the middle slice's plane (the plane the decoding maps to) onto the plane of
   their side's slab centre slice;
3. the axial T2 model runs once per level that has a spinal point, on ``LoadAxialSlicesd`` with ``disc_mm`` =
   that point (all levels in one forward pass); a level no axial slice covers is left out, with its reason.

Each series model's network, codec and preprocessing come from its own training config
(:func:`load_series_model`); its BatchNorm is folded at the start of the run (``bundle.InferenceOptimizer``).
The output of an iteration is a list with one result per study (see :meth:`StudyEvaluator.study_result`);
``decollate`` is off and there is no ``postprocessing``: the results are final. The configured ``inferer`` (e.g.
``bundle.AutocastInferer``) runs all three networks; its precision is resolved once per device, on the first (the
sagittal T2) network. Pixel positions are those of the instance through the point: sagittal T2 and T1 the
nearest slice of the series, axial the slice nearest the disc point (:func:`bundle.io.axial.nearest_axial_slices`),
via :func:`bundle.io.dicom_series.patient_to_pixel`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle.checkpoints import checked_network, load_state_dict
from bundle.codec import OCPCCodec
from bundle.errors import BundleInputError
from bundle.handlers import InferenceOptimizer
from bundle.io.axial import read_axial_stacks
from bundle.io.dicom_series import SliceHeader, list_dicom_files, read_slice_headers, series_affine, sort_series
from bundle.outputs import keypoint_record
from bundle.rsna_labels import LEVELS, snake
from bundle.skipping import SKIPPED_KEY
from bundle.streams import RSNA_AXIAL_STREAMS, RSNA_STREAMS, RSNA_T1_STREAMS, STREAM_CONDITIONS, StreamSpec
from bundle.studies import STUDY_SERIES_KEY
from bundle.transforms import KeypointsToArraysd, OCPCTargetsd
from monai.bundle import ConfigParser
from monai.data import list_data_collate
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose
from torch import nn

__all__ = ["SeriesModel", "load_series_model", "study_models", "collate_studies", "nearest_slice", "StudyEvaluator"]

logger = logging.getLogger(__name__)

_LABEL_TRANSFORMS = (KeypointsToArraysd, OCPCTargetsd)
#: the series type whose model predicts each stream
_STREAM_SERIES = {
    s.name: kind
    for kind, specs in (
        ("sagittal_t2", RSNA_STREAMS),
        ("sagittal_t1", RSNA_T1_STREAMS),
        ("axial_t2", RSNA_AXIAL_STREAMS),
    )
    for s in specs
}


@dataclass
class SeriesModel:
    """One series type's model: its network (weights loaded, eval mode), codec and inference preprocessing."""

    name: str
    network: nn.Module
    codec: OCPCCodec
    preprocessing: Compose


def load_series_model(
    name: str,
    config_files: Sequence[str],
    checkpoint: str | os.PathLike,
    device: torch.device | str = "cpu",
    bundle_root: str | os.PathLike = ".",
) -> SeriesModel:
    """Build a series model from its training config, e.g. ``['configs/train.json', 'configs/sagittal_t1.json']``.

    ``network_def``, ``codec`` and ``validate#preprocessing`` (less the label transforms) are parsed with
    MONAI's ConfigParser; relative config paths are taken from ``bundle_root``. The weights of ``checkpoint``
    must fit the network strictly (:func:`bundle.checkpoints.checked_network`).

    Raises:
        BundleInputError: the checkpoint is missing (naming the file and how to train it) or does not fit.
    """
    root = Path(bundle_root)
    files = [os.fspath(f if Path(f).is_absolute() else root / f) for f in config_files]
    if not Path(checkpoint).is_file():
        raise BundleInputError(
            f"{name} model: checkpoint {checkpoint} not found; train it with python -m monai.bundle run training "
            f'--config_file "{list(config_files)}" or point the study inference\'s option at its model.pt'
        )
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = os.fspath(root)
    parser.get_parsed_content("imports")
    codec = parser.get_parsed_content("codec")
    network = checked_network(parser.get_parsed_content("network_def"), checkpoint)
    network.load_state_dict(load_state_dict(checkpoint))
    network.to(device).eval()
    validate = parser.get_parsed_content("validate#preprocessing")
    transforms = [t for t in validate.transforms if not isinstance(t, _LABEL_TRANSFORMS)]
    return SeriesModel(name, network, codec, Compose(transforms))


def collate_studies(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``list_data_collate`` of the items without their ``STUDY_SERIES_KEY`` entries, which come back as a list
    (one dict per item: folder lists of varying length would not collate)."""
    series = [dict(item.get(STUDY_SERIES_KEY) or {}) for item in batch]
    collated = list_data_collate([{k: v for k, v in item.items() if k != STUDY_SERIES_KEY} for item in batch])
    collated[STUDY_SERIES_KEY] = series
    return collated


def nearest_slice(headers: Sequence[SliceHeader], point_mm: Sequence[float]) -> SliceHeader:
    """The slice whose plane lies nearest the patient-mm point (distance along each slice's normal)."""
    point = np.asarray(point_mm, dtype=np.float64)
    return min(headers, key=lambda h: abs(float((point - h.position) @ h.normal)))


def _on_plane(point_mm: Sequence[float], header: SliceHeader) -> np.ndarray:
    """The point (3,) moved along ``header``'s normal onto its plane."""
    point = np.asarray(point_mm, dtype=np.float64)
    return point + header.normal * float((header.position - point) @ header.normal)


def _record(spec: StreamSpec, point: Mapping, header: SliceHeader, series: str, level: str | None = None) -> dict:
    """The written keypoint: :func:`bundle.outputs.keypoint_record` on ``header``'s slice (moved onto its image
    when outside), plus condition and series."""
    affine, size = series_affine(header, 1.0), (header.rows, header.cols)
    record = keypoint_record(spec, point, affine, header.instance_number, ndigits=5, image_size=size)
    record["level"] = level or record["level"]
    record.update(condition=STREAM_CONDITIONS[spec.name], series=series, series_id=header.path.parent.name)
    return record


def _best_per_level(points: Sequence[Mapping]) -> dict[str, Mapping]:
    """``{level: the highest-scoring point of that level}``."""
    best: dict[str, Mapping] = {}
    for p in points:
        if p["level"] not in best or p["score"] > best[p["level"]]["score"]:
            best[p["level"]] = p
    return best


class StudyEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` whose iteration runs the sagittal T2 ``network`` and then the other series models.

    Args:
        codec: the sagittal T2 model's codec (spinal canal stream ``disc``).
        series_models: ``{"sagittal_t1": SeriesModel, "axial_t2": SeriesModel}`` (:func:`load_series_model`);
            a series type left out is reported missing for every study.
        fold_batchnorm: fold each series network's BatchNorm at the start (``bundle.InferenceOptimizer``); the
            sagittal T2 network's is folded by the config's own ``InferenceOptimizer`` handler.
        other arguments: those of ``SupervisedEvaluator``; ``decollate`` and ``postprocessing`` are fixed
            (off, none) because each iteration's output is already one final result per study.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Any,
        network: nn.Module,
        codec: OCPCCodec,
        series_models: Mapping[str, SeriesModel] | None = None,
        fold_batchnorm: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.update(decollate=False, postprocessing=None)
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, **kwargs)
        self.codec = codec
        self.series_models = dict(series_models or {})
        unknown = set(self.series_models) - {"sagittal_t1", "axial_t2"}
        if unknown:
            raise ValueError(f"series_models takes 'sagittal_t1' and 'axial_t2', got {sorted(unknown)}")
        if fold_batchnorm:
            for model in self.series_models.values():
                InferenceOptimizer(model.network).attach(self)

    def _iteration(self, engine: SupervisedEvaluator, batchdata: dict[str, Any]) -> list[dict[str, Any]]:
        output = super()._iteration(engine, batchdata)
        image, pred = output["image"], output["pred"]
        series = batchdata.get(STUDY_SERIES_KEY) or [{} for _ in range(len(pred))]
        skipped = batchdata.get(SKIPPED_KEY) or [""] * len(pred)
        skipped = [skipped] if isinstance(skipped, str) else list(skipped)
        results = []
        for b in range(len(pred)):
            study_id = str(batchdata["study_id"][b])
            results.append(self.study_result(study_id, image[b], pred[b], series[b], str(skipped[b] or "")))
        engine.state.output = results
        return results

    @staticmethod
    def _prepare(model: SeriesModel, item: Mapping) -> dict:
        """``model.preprocessing(item)``; a BundleInputError inside (wrapped by MONAI's Compose) is re-raised."""
        try:
            return model.preprocessing(dict(item))
        except RuntimeError as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, BundleInputError):
                cause = cause.__cause__
            if cause is None:
                raise
            raise cause from err

    def _run(self, model: SeriesModel, prepared: Sequence[Mapping]) -> list[dict]:
        """Run ``model`` on preprocessed items in one batch; the decoded points of each."""
        images = [p["image"] for p in prepared]
        batch = torch.stack([torch.as_tensor(i) for i in images]).to(self.state.device)
        with torch.no_grad():
            out = self.inferer(batch, model.network)
        affines = torch.stack([torch.as_tensor(i.affine, dtype=torch.float64) for i in images])
        return model.codec.decode(out.detach().float().cpu(), affines)

    def study_result(
        self, study_id: str, image: torch.Tensor, pred: torch.Tensor, series: Mapping[str, Any], skipped: str
    ) -> dict[str, Any]:
        """One study's result: ``{"study_id", "skipped", "series": {type: {"series_id(s)", "used", "reason"}},
        "keypoints": [record, ...], "overlays": {type: [(slice file, [record, ...]), ...]}, "partial": [reason]}``.

        ``partial`` names each condition-level without a prediction and why (a missing series or model, a level
        without a spinal point, an axial level no slice covers).
        """
        result: dict[str, Any] = {"study_id": study_id, "skipped": skipped, "keypoints": [], "overlays": {}}
        missing = dict(series.get("missing") or {})
        status = {
            "sagittal_t2": {"series_id": "" if skipped else str(series.get("sagittal_t2_id", ""))},
            "sagittal_t1": {"series_id": str(series.get("sagittal_t1_id", ""))},
            "axial_t2": {"series_ids": list(series.get("axial_t2_ids") or [])},
        }
        result["series"] = status
        level_notes: dict[tuple[str, str], str] = {}
        if skipped:
            missing.setdefault("sagittal_t2", skipped)
        else:
            spinal = self._spinal(study_id, image, pred, series, result)
            for kind, run in (("sagittal_t1", self._sagittal_t1), ("axial_t2", self._axial)):
                if kind in missing:
                    continue
                if kind not in self.series_models:
                    missing[kind] = f"no {kind} model in this run"
                    continue
                try:
                    run(study_id, spinal, series, result, level_notes)
                except BundleInputError as err:  # one unreadable series: its rows get the prior, the study goes on
                    missing[kind] = str(err)
        for kind, entry in status.items():
            entry["used"] = kind not in missing
            entry["reason"] = missing.get(kind, "")
        result["partial"] = self._partial(result["keypoints"], missing, level_notes) if not skipped else []
        return result

    def _spinal(
        self, study_id: str, image: torch.Tensor, pred: torch.Tensor, series: Mapping, result: dict
    ) -> dict[str, list[float]]:
        """Decode the sagittal T2 output; records on the nearest T2 slice; ``{level: spinal point mm}``."""
        points = self.codec.decode(pred[None].detach().float().cpu(), torch.as_tensor(image.affine))[0]
        files = series.get("sagittal_t2_files") or []
        headers = sort_series(read_slice_headers(files)).slices if files else []
        records, spinal = [], {}
        for spec in self.codec.streams:
            for level, point in _best_per_level(points.get(spec.name, [])).items():
                if spec.name in STREAM_CONDITIONS and headers:
                    header = nearest_slice(headers, point["mm"])
                    records.append((header, _record(spec, point, header, "sagittal_t2")))
                if spec.name == "disc":
                    spinal[level] = [float(v) for v in point["mm"]]
        self._add(result, "sagittal_t2", records)
        return spinal

    @staticmethod
    def _add(result: dict, kind: str, records: Sequence[tuple[SliceHeader, dict]]) -> None:
        """Append records and group them by slice for the overlays (slices in first-seen order)."""
        panels: dict[str, list[dict]] = {}
        for header, record in records:
            panels.setdefault(os.fspath(header.path), []).append(record)
            result["keypoints"].append(record)
        result["overlays"][kind] = list(panels.items())

    def _sagittal_t1(self, study_id: str, spinal: Mapping, series: Mapping, result: dict, notes: dict) -> None:
        """Foramen slabs around the spinal points -> T1 model -> records on each side's slab centre slice."""
        model = self.series_models["sagittal_t1"]
        folder = series["sagittal_t1"]
        canal = [spinal.get(level) for level in LEVELS]
        item = {"image": folder, "study_id": study_id, "series_id": series.get("sagittal_t1_id", ""), "canal_mm": canal}
        prepared = self._prepare(model, item)
        points = self._run(model, [prepared])[0]
        headers = read_slice_headers(list_dicom_files(folder))
        meta = prepared["image"].meta
        sides, instances = list(meta["slab_sides"]), [int(i) for i in meta["instance_numbers"]]
        records = []
        for spec in model.codec.streams:
            side = spec.name.split("_")[0]
            channels = [i for i, s in enumerate(sides) if s == side]
            centre = instances[channels[(len(channels) - 1) // 2]]
            header = next(h for h in headers if h.instance_number == centre)
            for point in _best_per_level(points.get(spec.name, [])).values():
                moved = {**point, "mm": _on_plane(point["mm"], header).tolist()}
                records.append((header, _record(spec, moved, nearest_slice(headers, moved["mm"]), "sagittal_t1")))
        self._add(result, "sagittal_t1", records)

    def _axial(self, study_id: str, spinal: Mapping, series: Mapping, result: dict, notes: dict) -> None:
        """Per level with a spinal point, the axial slices nearest it -> axial model (one batch) -> records on the
        nearest slice, named by that level; ``notes[("axial_t2", level)]`` says why a level was not run."""
        model = self.series_models["axial_t2"]
        folders = list(series["axial_t2"])
        stacks = read_axial_stacks(folders)  # once for all levels
        prepared = []
        for level in LEVELS:
            if level not in spinal:
                notes[("axial_t2", level)] = f"axial_t2: no sagittal T2 spinal point at {level} to place the slices"
                continue
            item = {"image": folders, "disc_mm": spinal[level], "level": level, "study_id": study_id}
            item["axial_stacks"] = stacks
            try:
                prepared.append(self._prepare(model, item))
            except BundleInputError as err:  # e.g. no axial slice covers this disc: only this level's rows
                notes[("axial_t2", level)] = f"axial_t2: {err}"
        records = []
        for item, points in zip(prepared, self._run(model, prepared) if prepared else []):
            meta = item["image"].meta
            header = read_slice_headers([meta["middle_filename"]])[0]  # the slice nearest the disc point
            for spec in model.codec.streams:
                for point in _best_per_level(points.get(spec.name, [])).values():
                    records.append((header, _record(spec, point, header, "axial_t2", level=str(meta["level"]))))
        self._add(result, "axial_t2", records)

    @staticmethod
    def _partial(records: Sequence[Mapping], missing: Mapping[str, str], notes: Mapping) -> list[str]:
        """One reason per series type or level whose condition-levels have no prediction."""
        done = {(r["condition"], r["level"]) for r in records}
        reasons: dict[str, list[str]] = {}
        for stream, condition in STREAM_CONDITIONS.items():
            kind = _STREAM_SERIES[stream]
            for level in LEVELS:
                if (condition, level) in done:
                    continue
                why = missing.get(kind) or notes.get((kind, level)) or f"{kind}: no {stream} point found at {level}"
                if kind in missing:
                    why = f"{kind} not used: {why}"
                reasons.setdefault(why, []).append(f"{condition}_{snake(level)}")
        return [f"{why} (constant prior for {', '.join(rows)})" for why, rows in reasons.items()]


def study_models(
    configs: Mapping[str, Sequence[str]],
    checkpoints: Mapping[str, str],
    device: torch.device | str,
    bundle_root: str = ".",
    enabled: Sequence[str] = ("sagittal_t1", "axial_t2"),
) -> dict[str, SeriesModel]:
    """``{series type: load_series_model(...)}`` for the ``enabled`` types (config files and checkpoint each)."""
    return {k: load_series_model(k, configs[k], checkpoints[k], device, bundle_root) for k in enabled}
