"""Keypoint detection and classification metrics (paper Section IV-B) and their plots.

Per level (levels aligned by index between prediction and ground truth, coordinates in patient mm):

- a level is *predicted* when its predicted point is finite and its label >= 0;
- a level is *annotated* when its ground-truth point is finite; un-annotated levels are ignored;
- PCK at t mm: fraction of annotated GT points (any label, -1 included) whose same-level predicted
  point lies within t mm (distance <= t);
- classification uses annotated GT with label g >= 0; hit = predicted and distance <= ``hit_mm``:
  ``hit and p == g`` is TP for g; otherwise a prediction of class p is FP for p and the GT is FN for g
  (a wrong class is FP for p and FN for g; a far prediction FP and FN; a missing one FN).
- precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R); each is 0 when its
  denominator is 0 (also PCK with no annotated GT). Macro = mean over classes; micro precision =
  sum TP / (sum TP + sum FP) (the Tianchi score).
- confusion matrix: rows = GT class, columns = predicted class of a hit, then a last "missed" column
  for GT with no prediction within ``hit_mm``.

Written with numpy: the MONAI / ignite metrics score images or labels, not level-matched keypoints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from bundle.atomic import atomic_write
from bundle.streams import StreamSpec, parse_streams

__all__ = ["DEFAULT_PCK_THRESHOLDS_MM", "KeypointMetric", "keypoint_scores", "plot_confusion_matrix", "plot_pck_curve"]

DEFAULT_PCK_THRESHOLDS_MM: tuple[float, ...] = tuple(float(t) for t in range(1, 11))
MISSED = "missed"


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def _threshold_key(t: float) -> str:
    return f"{float(t):g}"


def _check_inputs(
    pred_mm: np.ndarray, pred_labels: np.ndarray, gt_mm: np.ndarray, gt_labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pred_mm = np.asarray(pred_mm, dtype=np.float64)
    gt_mm = np.asarray(gt_mm, dtype=np.float64)
    pred_labels = np.asarray(pred_labels)
    gt_labels = np.asarray(gt_labels)
    if pred_mm.ndim != 2 or pred_mm.shape[1] not in (2, 3):
        raise ValueError(f"pred_mm must be (L, 2) or (L, 3) in mm, got shape {pred_mm.shape}")
    if gt_mm.shape != pred_mm.shape:
        raise ValueError(f"gt_mm shape {gt_mm.shape} differs from pred_mm shape {pred_mm.shape}")
    n = pred_mm.shape[0]
    for name, lab in (("pred_labels", pred_labels), ("gt_labels", gt_labels)):
        if lab.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {lab.shape}")
        integral = np.issubdtype(lab.dtype, np.integer) or (
            np.issubdtype(lab.dtype, np.floating) and np.array_equal(lab, np.round(lab))
        )
        if lab.size and (not integral or lab.min() < -1 or lab.max() >= num_classes):
            raise ValueError(f"{name} must be integers in [-1, {num_classes - 1}], got {lab.tolist()}")
    return pred_mm, pred_labels.astype(np.int64), gt_mm, gt_labels.astype(np.int64)


def keypoint_scores(
    pred_mm: np.ndarray,
    pred_labels: np.ndarray,
    gt_mm: np.ndarray,
    gt_labels: np.ndarray,
    class_names: Sequence[str],
    hit_mm: float = 6.0,
    pck_thresholds_mm: Sequence[float] = DEFAULT_PCK_THRESHOLDS_MM,
) -> dict:
    """Scores of level-matched keypoints (one study, or several concatenated along L).

    Args:
        pred_mm: (L, D) predicted points in mm, D = 2 or 3, NaN rows for levels not predicted.
        pred_labels: (L,) predicted class index, -1 = none.
        gt_mm: (L, D) ground-truth points in mm, NaN rows for un-annotated levels.
        gt_labels: (L,) ground-truth class index, -1 = class unscored (PCK only).
        class_names: names of the C classes, in index order.
        hit_mm: distance (mm) within which a prediction is a hit.
        pck_thresholds_mm: thresholds (mm) of the PCK curve.

    Returns:
        JSON-serialisable dict: ``pck`` {"1": ..}, ``precision``/``recall``/``f1`` {class: ..},
        ``macro_precision``, ``macro_recall``, ``macro_f1``, ``micro_precision``, ``confusion_matrix``
        (C rows x C + 1 columns), ``confusion_columns``, ``class_names``, ``counts`` {class: {tp, fp, fn}},
        ``num_gt`` (annotated GT points).

    Example:
        >>> s = keypoint_scores([[0.0, 0.0]], [1], [[3.0, 4.0]], [1], ["normal", "degenerative"])
        >>> s["counts"]["degenerative"], s["pck"]["5"], s["pck"]["4"]
        ({'tp': 1, 'fp': 0, 'fn': 0}, 1.0, 0.0)
    """
    names = [str(c) for c in class_names]
    c = len(names)
    if c == 0:
        raise ValueError("class_names must not be empty")
    if hit_mm < 0:
        raise ValueError(f"hit_mm must be >= 0, got {hit_mm}")
    pred_mm, pred_labels, gt_mm, gt_labels = _check_inputs(pred_mm, pred_labels, gt_mm, gt_labels, c)

    annotated = np.isfinite(gt_mm).all(axis=1)
    located = np.isfinite(pred_mm).all(axis=1)
    with np.errstate(invalid="ignore"):
        dist = np.linalg.norm(pred_mm - gt_mm, axis=1)  # NaN where either side is missing
    dist = np.where(annotated & located, dist, np.inf)

    num_gt = int(annotated.sum())
    pck = {_threshold_key(t): _ratio(((dist <= t) & annotated).sum(), num_gt) for t in pck_thresholds_mm}

    predicted = located & (pred_labels >= 0)
    scored = annotated & (gt_labels >= 0)
    hit = predicted & (dist <= hit_mm)
    correct = scored & hit & (pred_labels == gt_labels)
    tp = np.bincount(gt_labels[correct], minlength=c)
    fp = np.bincount(pred_labels[scored & predicted & ~correct], minlength=c)
    fn = np.bincount(gt_labels[scored & ~correct], minlength=c)

    confusion = np.zeros((c, c + 1), dtype=np.int64)
    np.add.at(confusion, (gt_labels[scored & hit], pred_labels[scored & hit]), 1)
    np.add.at(confusion, (gt_labels[scored & ~hit], c), 1)

    precision = {n: _ratio(tp[i], tp[i] + fp[i]) for i, n in enumerate(names)}
    recall = {n: _ratio(tp[i], tp[i] + fn[i]) for i, n in enumerate(names)}
    f1 = {n: _ratio(2 * precision[n] * recall[n], precision[n] + recall[n]) for n in names}
    return {
        "pck": pck,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "macro_precision": float(np.mean(list(precision.values()))),
        "macro_recall": float(np.mean(list(recall.values()))),
        "macro_f1": float(np.mean(list(f1.values()))),
        "micro_precision": _ratio(tp.sum(), tp.sum() + fp.sum()),
        "confusion_matrix": confusion.tolist(),
        "confusion_columns": names + [MISSED],
        "class_names": names,
        "counts": {n: {"tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i])} for i, n in enumerate(names)},
        "num_gt": num_gt,
    }


class KeypointMetric:
    """Accumulates level-matched keypoints of studies per stream; ``compute()`` scores them.

    Args:
        streams: StreamSpecs or the config mapping ``{name: {"levels": [...], "classes": [...]}}``.
        hit_mm: hit distance in mm (paper: 6).
        pck_thresholds_mm: PCK curve thresholds in mm (paper Fig. 8: 1 to 10).

    Example:
        >>> m = KeypointMetric({"disc": {"levels": ["a", "b"], "classes": ["n", "d"]}})
        >>> m.update("disc", [[0, 0], [np.nan, np.nan]], [0, -1], [[1, 0], [5, 5]], [0, 1])
        >>> r = m.compute()["disc"]
        >>> r["counts"]["n"]["tp"], r["counts"]["d"]["fn"], r["num_studies"]
        (1, 1, 1)
    """

    def __init__(
        self,
        streams: Mapping[str, Mapping] | Sequence[StreamSpec],
        hit_mm: float = 6.0,
        pck_thresholds_mm: Sequence[float] = DEFAULT_PCK_THRESHOLDS_MM,
    ) -> None:
        self.streams = {s.name: s for s in parse_streams(streams)}
        if hit_mm < 0:
            raise ValueError(f"hit_mm must be >= 0, got {hit_mm}")
        thresholds = tuple(float(t) for t in pck_thresholds_mm)
        if not thresholds or min(thresholds) < 0:
            raise ValueError(f"pck_thresholds_mm must be non-empty and >= 0, got {pck_thresholds_mm}")
        self.hit_mm = float(hit_mm)
        self.pck_thresholds_mm = thresholds
        self.reset()

    def reset(self) -> None:
        """Forget all accumulated studies."""
        self._data: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = {
            name: [] for name in self.streams
        }

    def update(
        self, stream: str, pred_mm: np.ndarray, pred_labels: np.ndarray, gt_mm: np.ndarray, gt_labels: np.ndarray
    ) -> None:
        """Add one study of ``stream``: arrays as in :func:`keypoint_scores`, L = the stream's level count."""
        if stream not in self.streams:
            raise ValueError(f"unknown stream {stream!r}; known: {list(self.streams)}")
        spec = self.streams[stream]
        arrays = _check_inputs(pred_mm, pred_labels, gt_mm, gt_labels, spec.num_classes)
        if arrays[0].shape[0] != spec.num_levels:
            raise ValueError(f"stream {stream!r} has {spec.num_levels} levels, got {arrays[0].shape[0]} rows")
        if self._data[stream] and arrays[0].shape[1] != self._data[stream][0][0].shape[1]:
            raise ValueError(f"stream {stream!r}: all studies must use the same point dimension (2 or 3)")
        self._data[stream].append(tuple(a.copy() for a in arrays))

    def compute(self) -> dict[str, dict]:
        """``{stream: keypoint_scores(...) + {"num_studies": n}}`` over all studies added so far."""
        out: dict[str, dict] = {}
        for name, spec in self.streams.items():
            studies = self._data[name]
            if studies:
                pm, pl, gm, gl = (np.concatenate(parts) for parts in zip(*studies))
            else:
                pm = gm = np.zeros((0, 2))
                pl = gl = np.zeros((0,), dtype=np.int64)
            scores = keypoint_scores(pm, pl, gm, gl, spec.classes, self.hit_mm, self.pck_thresholds_mm)
            scores["num_studies"] = len(studies)
            out[name] = scores
        return out


def _figure(size: tuple[float, float]):
    # Figure + Agg canvas without pyplot: no global backend switch, no figure registry to leak.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(fig, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))


def plot_pck_curve(metrics: Mapping[str, Mapping], path: str | os.PathLike) -> None:
    """Write a PNG of PCK (%) against threshold (mm), one line per stream of ``KeypointMetric.compute()``."""
    if not metrics:
        raise ValueError("no streams to plot")
    fig = _figure((5.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, m in metrics.items():
        keys = list(m["pck"])
        ax.plot([float(k) for k in keys], [100.0 * m["pck"][k] for k in keys], marker="o", label=name)
    ax.set_xlabel("threshold (mm)")
    ax.set_ylabel("PCK (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend()
    _save_atomic(fig, path)


def plot_confusion_matrix(metrics: Mapping[str, Mapping], stream: str, path: str | os.PathLike) -> None:
    """Write a PNG of ``stream``'s confusion matrix (rows GT class, columns predicted class + missed)."""
    if stream not in metrics:
        raise ValueError(f"unknown stream {stream!r}; known: {list(metrics)}")
    m = metrics[stream]
    cm = np.asarray(m["confusion_matrix"], dtype=np.int64)
    rows = list(m["class_names"])
    cols = list(m.get("confusion_columns", rows + [MISSED]))
    fig = _figure((1.2 * len(cols) + 2.0, 1.0 * len(rows) + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, int(cm.max(initial=0))))
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(stream)
    half = cm.max(initial=0) / 2.0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > half else "black")
    _save_atomic(fig, path)
