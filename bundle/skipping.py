"""Batch runs that go on past a study they cannot use.

A study is *skipped* when its datalist entry could not be built (no sagittal T2 series, say) or its series
fails to load (undecodable or truncated file, failed geometry check): :class:`SkipUnusableStudyd` gives it a
placeholder image so that DataLoader workers keep going and batches still collate, and marks it with its
reason under ``"skipped"`` (``""`` for a usable study, on every item). Downstream, the keypoint writer gives a
skipped study the constant prediction, the keypoint metric counts its annotated keypoints as missed, and
:class:`SkippedStudiesWriter` logs one warning line per skipped study, writes ``skipped.csv`` and a summary.
Training does not use any of this: there a bad input stops the run with an error naming the file or row.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle.atomic import atomic_write_text
from bundle.errors import BundleInputError
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform
from monai.utils import SpaceKeys

__all__ = [
    "SKIPPED_KEY",
    "PARTIAL_KEY",
    "skipped_item",
    "skipped_reasons",
    "placeholder_series",
    "SkipUnusableStudyd",
    "skip_unusable",
    "SkippedStudiesWriter",
]

logger = logging.getLogger(__name__)

SKIPPED_KEY = "skipped"
#: key of a study result's list of reasons for rows given the constant prediction (study-level inference)
PARTIAL_KEY = "partial"
_PLACEHOLDER_SIZE = 16  # pixels; padded to the network input size by the usual preprocessing


def skipped_item(study_id: str, reason: str, series_id: str = "", **extra: Any) -> dict[str, Any]:
    """A datalist item for a study that cannot be used: no image, the ``reason`` under ``"skipped"``."""
    return {"image": [], "study_id": str(study_id), "series_id": str(series_id), SKIPPED_KEY: str(reason), **extra}


def skipped_reasons(batch: Mapping[str, Any], size: int) -> list[str]:
    """The ``"skipped"`` reason of each of the ``size`` items of a collated batch (``""`` = usable)."""
    reasons = batch.get(SKIPPED_KEY) if isinstance(batch, Mapping) else None
    if reasons is None:
        return [""] * size
    reasons = [reasons] if isinstance(reasons, str) else [str(r) for r in reasons]
    if len(reasons) != size:
        raise ValueError(f"batch has {len(reasons)} 'skipped' entries for {size} items")
    return reasons


def placeholder_series(num_slices: int, study_id: str = "", series_id: str = "") -> MetaTensor:
    """A ramp image (num_slices, 16, 16) at 1 mm pixels, with the metadata keys of
    :func:`bundle.io.load_sagittal_series` (so it collates with real series); identity affine."""
    size = _PLACEHOLDER_SIZE
    affine = np.eye(4)
    meta: dict[str, Any] = {
        "filename_or_obj": "",
        "series_instance_uid": str(series_id),
        "instance_numbers": [0] * int(num_slices),
        "middle_instance_number": 0,
        "middle_filename": "",
        "series_num_slices": 0,
        "pixel_spacing": np.ones(2, dtype=np.float64),
        "slice_spacing": 1.0,
        "spatial_shape": np.array([size, size], dtype=np.int64),
        "original_affine": affine.copy(),
        "original_channel_dim": 0,
        "space": SpaceKeys.LPS.value,
        "study_id": str(study_id),
        "series_id": str(series_id),
    }
    ramp = torch.linspace(0.0, 1.0, size * size, dtype=torch.float32).reshape(size, size)  # not constant: the
    volume = ramp.expand(int(num_slices), size, size).clone()  # intensity scaling then has a range to map
    return MetaTensor(volume, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


class SkipUnusableStudyd(MapTransform):
    """Run a series loader; a study it cannot use gets a placeholder image and its reason under ``"skipped"``.

    Catches :class:`bundle.errors.BundleInputError` only (each names the file and what is wrong); other
    exceptions are bugs and propagate. Items already marked skipped (by the datalist builders) are not loaded.
    Every item leaves with a ``"skipped"`` entry, ``""`` when the study was loaded.

    Args:
        transform: the loader, a :class:`bundle.io.slices.SliceLoaderd` (e.g. ``bundle.LoadSagittalSeriesd``);
            its ``channels`` (else ``num_slices``) sizes the placeholder.
        keys: the image key(s) the loader fills.

    Example:
        >>> from bundle import LoadSagittalSeriesd
        >>> load = SkipUnusableStudyd(LoadSagittalSeriesd(keys="image", num_slices=3))
        >>> out = load({"image": "/no/such/folder", "study_id": "1"})
        >>> tuple(out["image"].shape), out["skipped"].endswith("not found")
        ((3, 16, 16), True)
    """

    def __init__(
        self, transform: Callable[[Mapping], Mapping], keys: KeysCollection = "image", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = transform
        self.num_slices = int(getattr(transform, "channels", getattr(transform, "num_slices", 1)))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        reason = str(d.get(SKIPPED_KEY) or "")
        if not reason:
            try:
                out = dict(self.transform(d))
                out[SKIPPED_KEY] = ""
                return out
            except BundleInputError as err:
                reason = str(err)
        study_id, series_id = str(d.get("study_id", "")), str(d.get("series_id", ""))
        for key in self.key_iterator(d):
            d[key] = placeholder_series(self.num_slices, study_id, series_id)
        d[SKIPPED_KEY] = reason
        return d


def skip_unusable(preprocessing: Compose) -> Compose:
    """A copy of a preprocessing ``Compose`` whose series loader(s) (:class:`bundle.io.slices.SliceLoaderd`: the
    sagittal T2, sagittal T1 and axial loaders) are wrapped in :class:`SkipUnusableStudyd`.

    The configs keep ``preprocessing`` strict (MONAI Label serves one image and must report its error) and give
    this copy to the batch runs' datasets.
    """
    from bundle.io.slices import SliceLoaderd

    if not isinstance(preprocessing, Compose):
        raise TypeError(f"expected a monai.transforms.Compose, got {type(preprocessing).__name__}")
    wrapped = copy.copy(preprocessing)
    wrapped.transforms = tuple(
        SkipUnusableStudyd(t, keys=t.keys) if isinstance(t, SliceLoaderd) else t for t in preprocessing.transforms
    )
    if tuple(wrapped.transforms) == tuple(preprocessing.transforms):
        raise ValueError("the preprocessing has no series loader (bundle.io.slices.SliceLoaderd) to wrap")
    return wrapped


class SkippedStudiesWriter:
    """Record the studies a batch run skipped: one warning line each, ``output_dir/skipped.csv``
    (``study_id,reason``, written atomically at the end, header only when none was skipped) and a summary.

    A study processed only in part (the study-level inference: a missing series type, a level not found)
    lists each reason under ``PARTIAL_KEY`` in its result (``engine.state.output``, a list of dicts); those
    lines follow the skipped studies in ``skipped.csv`` (the study counts as done, not as skipped).

    ``engine.state.extra_metrics["skipped_studies"]`` holds the running count (``MetricsWriter`` puts it in
    metrics.json). When no study at all could be processed the run fails after writing ``skipped.csv``.
    """

    def __init__(self, output_dir: str | Path, filename: str = "skipped.csv") -> None:
        self.path = Path(output_dir) / filename
        self.done = 0
        self.skipped: list[tuple[str, str]] = []
        self.partial: list[tuple[str, str]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED, self.finish)

    def reset(self, engine: Engine) -> None:
        self.done, self.skipped, self.partial = 0, [], []
        self._publish(engine)

    def record(self, engine: Engine) -> None:
        """Count the iteration's studies from its batch, collated (a dict) or decollated (a list of items)."""
        batch = engine.state.batch
        if isinstance(batch, Mapping):
            ids = batch.get("study_id", [])
            ids = [ids] if isinstance(ids, str) else [str(i) for i in ids]
            reasons = skipped_reasons(batch, len(ids))
        else:
            items = [item for item in (batch or []) if isinstance(item, Mapping)]
            ids = [str(item.get("study_id", "")) for item in items]
            reasons = [str(item.get(SKIPPED_KEY) or "") for item in items]
        for study_id, reason in zip(ids, reasons):
            if reason:
                logger.warning(f"study {study_id} skipped: {reason}")
                self.skipped.append((study_id, reason))
            else:
                self.done += 1
        output = engine.state.output if isinstance(engine.state.output, list) else []
        for result in output:
            if isinstance(result, Mapping):
                self.partial += [(str(result.get("study_id", "")), str(r)) for r in result.get(PARTIAL_KEY) or []]
        self._publish(engine)

    def _publish(self, engine: Engine) -> None:
        extra = getattr(engine.state, "extra_metrics", None) or {}
        extra["skipped_studies"] = len(self.skipped)
        engine.state.extra_metrics = extra

    def finish(self, engine: Engine) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["study_id", "reason"])
        writer.writerows(self.skipped + self.partial)
        atomic_write_text(self.path, buffer.getvalue())
        part = f", {len(self.partial)} reasons for constant rows of processed studies" if self.partial else ""
        logger.info(f"studies: {self.done} done, {len(self.skipped)} skipped{part} (listed in {self.path})")
        if self.done == 0:
            raise BundleInputError(
                f"no study could be processed: all {len(self.skipped)} were skipped; reasons in {self.path}"
            )
