"""Ignite handlers specific to SpineOne: objective-association switch, resumable training state,
the keypoint metric as an ignite Metric, and the metrics writer."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bundle.atomic import atomic_write, atomic_write_text
from bundle.codec import mm_to_pixels_np, pixels_to_mm_np
from bundle.metrics import KeypointMetric, plot_confusion_matrix, plot_pck_curve
from bundle.skipping import SKIPPED_KEY
from bundle.streams import StreamSpec, parse_streams
from ignite.engine import Engine, Events
from ignite.metrics import Metric

__all__ = [
    "ObjectiveAssociationHandler",
    "TrainingStateCheckpoint",
    "KeypointDetectionMetric",
    "MetricsWriter",
    "InferenceOptimizer",
    "atomic_write_text",
    "in_plane",
]

logger = logging.getLogger(__name__)


class ObjectiveAssociationHandler:
    """Switch the loss's objective association on from ``start_fraction * max_epochs`` (paper: 75%).

    The state is derived from the epoch at every epoch start, so a resumed run gets it right without
    storing it. The switch is logged once.
    """

    def __init__(self, loss: torch.nn.Module, start_fraction: float = 0.75, enabled: bool = True) -> None:
        if not 0.0 <= start_fraction <= 1.0:
            raise ValueError(f"start_fraction must lie in [0, 1], got {start_fraction}")
        if not hasattr(loss, "oa_enabled"):
            raise TypeError("loss must have an 'oa_enabled' attribute (SpineOneLoss)")
        self.loss = loss
        self.start_fraction = float(start_fraction)
        self.enabled = bool(enabled)

    def start_epoch(self, max_epochs: int) -> int:
        """First epoch (1-based) trained with OA on."""
        return int(np.floor(self.start_fraction * max_epochs)) + 1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch  # already incremented for the epoch about to run (1-based)
        on = self.enabled and epoch >= self.start_epoch(engine.state.max_epochs)
        if on != bool(self.loss.oa_enabled):
            logger.info(f"objective association {'on' if on else 'off'} from epoch {epoch} (mode {self.loss.oa_mode})")
        self.loss.oa_enabled = on


class TrainingStateCheckpoint:
    """Save the full training state after every epoch and resume from it when training starts again.

    Written by hand because MONAI's CheckpointSaver writes non-atomically under epoch-numbered names,
    while resuming needs one fixed, always-valid file: ``torch.save`` to a temporary file, then ``os.replace``.
    ``save_dict`` maps names to objects with ``state_dict``/``load_state_dict`` (network, optimizer,
    lr scheduler); the engine it is attached to is added as ``trainer``. Under ``torch.distributed`` only
    rank 0 writes; every rank resumes from the same file. DDP-wrapped modules are saved unwrapped.
    """

    def __init__(self, save_path: str | Path, save_dict: Mapping[str, Any], resume: bool | str = True) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object")
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.resume = resume.strip().lower() in ("1", "true", "yes") if isinstance(resume, str) else bool(resume)

    def attach(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", engine)  # epoch and iteration counters
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def save(self, engine: Engine) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_rank() != 0:
            return  # multi-GPU: every rank holds the same state; rank 0 alone writes it
        state = {}
        for name, obj in self.save_dict.items():
            module = obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj
            state[name] = module.state_dict()
        atomic_write(self.save_path, lambda f: torch.save(state, f))

    def load(self, engine: Engine) -> None:
        if not self.resume or not self.save_path.exists():
            return
        try:
            state = torch.load(self.save_path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt or foreign file: say which and stop
            raise RuntimeError(f"cannot resume from {self.save_path}: {err}. Delete it to start afresh.") from err
        missing = set(self.save_dict) - set(state)
        if missing:
            raise RuntimeError(f"resume file {self.save_path} lacks {sorted(missing)}; delete it to start afresh")
        max_epochs = engine.state.max_epochs
        for name, obj in self.save_dict.items():
            module = obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj
            module.load_state_dict(state[name])
        if engine.state.max_epochs != max_epochs:  # keep the configured length when it is longer
            engine.state.max_epochs = max(max_epochs, engine.state.max_epochs)
        logger.info(f"resumed from {self.save_path} at epoch {engine.state.epoch} of {engine.state.max_epochs}")


def in_plane(points_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Project patient-mm points (L, 3) onto the image plane k = 0 of a 4x4 voxel-to-mm ``affine`` (codec geometry)."""
    return pixels_to_mm_np(mm_to_pixels_np(points_mm, affine), affine)


class KeypointDetectionMetric(Metric):
    """Ignite metric over the evaluator's decollated output: decoded keypoints against the ground truth.

    Each output item holds ``image`` (the input MetaTensor, its affine), ``keypoints`` (from the
    ``KeypointsDecoded`` postprocessing) and ``label`` (the ground truth from ``bundle.EvaluationBatch``:
    ``{stream}_points`` (L, 3) mm, ``{stream}_labels`` (L,), ``skipped``). ``compute`` returns the key score
    (mean over streams of ``(macro_f1 + pck@6mm) / 2``); the full per-stream results (PCK curve, P/R/F1,
    confusion matrices) are left in ``engine.state.keypoint_metrics``. Distances are in-plane mm: ground
    truth is projected onto the middle slice's plane. A level not found counts as missed.
    """

    def __init__(
        self,
        streams: Mapping[str, Mapping] | Sequence[StreamSpec],
        hit_mm: float = 6.0,
        output_transform: Any = lambda x: x,
    ) -> None:
        self.specs = parse_streams(streams)
        self.hit_mm = float(hit_mm)
        self.results: dict[str, Any] = {}
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._metric = KeypointMetric(self.specs, hit_mm=self.hit_mm)

    def update(self, output: Sequence[Mapping[str, Any]]) -> None:
        """``output``: the decollated evaluator output, a list of ``{"image", "keypoints", "label"}`` items."""
        for item in [output] if isinstance(output, Mapping) else output:
            truth = item.get("label") or {}
            affine = torch.as_tensor(item["image"].affine).detach().cpu().double().numpy()
            skipped = bool(truth.get(SKIPPED_KEY, ""))
            predicted = {} if skipped else item["keypoints"]  # a skipped study's keypoints all count as missed
            for spec in self.specs:
                gt_mm = torch.as_tensor(truth[f"{spec.name}_points"]).double().cpu().numpy().reshape(-1, 3)
                gt_labels = torch.as_tensor(truth[f"{spec.name}_labels"]).long().cpu().numpy().reshape(-1)
                pred_mm = np.full((spec.num_levels, 3), np.nan)
                pred_labels = np.full((spec.num_levels,), -1, dtype=np.int64)
                for point in predicted.get(spec.name, []):
                    pred_mm[point["level_index"]] = point["mm"]
                    pred_labels[point["level_index"]] = point["label"]
                gt_plane = in_plane(np.nan_to_num(gt_mm), affine)
                unlocated = np.isnan(gt_mm).any(axis=1)
                if skipped:  # labelled levels of a study skipped before its points were located: missed too
                    unlocated &= gt_labels < 0
                gt_plane[unlocated] = np.nan
                self._metric.update(spec.name, pred_mm, pred_labels, gt_plane, gt_labels)

    def compute(self) -> float:
        self.results = self._metric.compute()
        scores = [(r["macro_f1"] + r["pck"]["6"]) / 2.0 for r in self.results.values()]
        return float(np.mean(scores))

    def completed(self, engine: Engine, name: str) -> None:
        super().completed(engine, name)
        engine.state.keypoint_metrics = self.results


class MetricsWriter:
    """At the end of an evaluation, write ``metrics.json`` (per stream) and the PCK / confusion plots."""

    def __init__(self, output_dir: str | Path, extra: Mapping[str, Any] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.extra = dict(extra or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        results = getattr(engine.state, "keypoint_metrics", None)
        if not results:
            raise RuntimeError("no keypoint metrics on the engine: attach KeypointDetectionMetric as key metric")
        content: dict[str, Any] = {"streams": results, **self.extra}
        for key, value in getattr(engine.state, "extra_metrics", {}).items():
            content[key] = value
        atomic_write_text(self.output_dir / "metrics.json", json.dumps(content, indent=2))
        plot_pck_curve(results, self.output_dir / "pck_curve.png")
        for stream in results:
            plot_confusion_matrix(results, stream, self.output_dir / f"confusion_{stream}.png")
        logger.info(f"metrics written to {self.output_dir / 'metrics.json'}")


class InferenceOptimizer:
    """Before an inference run, fold BatchNorm into the convolutions and switch to channels-last memory.

    Attach it after the ``CheckpointLoader`` (handlers attach in list order, so it runs after the weights
    are in). Outputs agree with the eager network to float32 rounding; see ``bundle.networks.fusion``.
    """

    def __init__(self, network: torch.nn.Module, channels_last: bool = True) -> None:
        self.network = network
        self.channels_last = bool(channels_last)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from bundle.networks import fuse_for_inference

        self.network.eval()
        fuse_for_inference(self.network, inplace=True)
        if self.channels_last:
            self.network.to(memory_format=torch.channels_last)
