"""In-memory description of one phantom study: spine, series, identifiers, encodings and label points.

``phantom_study(seed, index, layout)`` is deterministic and cheap (nothing is rendered); pixels come
from :meth:`PhantomStudy.pixels`. The same objects drive the file layouts and serve as ground truth
(patient mm) in tests of other components.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from bundle.phantoms.anatomy import BODY_NAMES, Spine, check_class_frequencies, sample_spine
from bundle.phantoms.geometry import SeriesGeometry, sample_axial, sample_sagittal
from bundle.phantoms.render import render_series
from bundle.streams import TIANCHI_DISC_LEVELS, TIANCHI_VERTEBRA_LEVELS
from pydicom.uid import generate_uid

__all__ = ["PHI_MARKER", "LAYOUTS", "FOV_TOPS", "PhantomSeries", "PhantomStudy", "phantom_study", "fov_top_s"]

PHI_MARKER = "XPHIX"  # in PatientName, PatientID and InstitutionName of every phantom file
LAYOUTS = ("rsna", "tianchi")
FOV_TOPS = ("T9", "T10", "T11", "T12", "L1")  # where the top of a lumbar sagittal field of view may lie
_ID_STRIDE = 1_000_003  # ids = 10^7 + running number + stride * random: unique, and some above 2**31
_TIANCHI_T2 = ("T2_SAG", "SAG T2 FSE", "t2_tse_sag")
_TIANCHI_T1 = ("T1_SAG", "SAG T1 FSE")


@dataclass(frozen=True, eq=False)
class PhantomSeries:
    """One series. Per-slice tuples follow the spatial order of ``geometry.positions``.

    Stored pixel values relate to the rendered signal by ``real = stored * slope + intercept`` with
    ``real = gain * signal``; MONOCHROME1 series store ``max(stored) - stored`` (inverted).
    """

    kind: str  # "sag_t2" | "sag_t1" | "ax_t2"
    contrast: str  # "T2" | "T1"
    description: str
    series_id: int
    series_uid: str
    series_number: int
    geometry: SeriesGeometry
    instance_numbers: tuple[int, ...]
    sop_uids: tuple[str, ...]
    photometric: str
    slope: float
    intercept: float
    gain: float
    render_seed: tuple[int, ...]

    @property
    def middle(self) -> int:
        """Spatial index of the middle slice, ``(S - 1) // 2``."""
        return (self.geometry.num_slices - 1) // 2


@dataclass(frozen=True, eq=False)
class PhantomStudy:
    """A phantom study: ``series[0]`` is always the labelled sagittal T2 series."""

    layout: str
    seed: int
    index: int
    study_id: int
    study_uid: str
    frame_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    study_date: str
    study_time: str
    institution: str
    spine: Spine
    series: tuple[PhantomSeries, ...]

    @property
    def sagittal_t2(self) -> PhantomSeries:
        return self.series[0]

    def keypoints_mm(self) -> dict[str, dict[str, np.ndarray]]:
        """Ground truth on the mid-sagittal plane, patient mm: see :meth:`Spine.keypoints`."""
        return self.spine.keypoints()

    def labels(self) -> dict[str, dict[str, str]]:
        """Class names per level: see :meth:`Spine.labels`."""
        return self.spine.labels()

    def pixels(self, series: PhantomSeries) -> np.ndarray:
        """Stored DICOM pixel values, uint16 (S, rows, cols) in spatial order."""
        signal = render_series(self.spine, series.geometry, series.contrast, np.random.default_rng(series.render_seed))
        stored = np.rint((signal * series.gain - series.intercept) / series.slope)
        stored = np.clip(stored, 0, 65535).astype(np.uint16)
        if series.photometric == "MONOCHROME1":
            stored = stored.max() - stored
        return stored

    def rsna_points(self) -> list[dict]:
        """Spinal canal label points on the sagittal T2, each on the slice closest to the 3D point.

        Returns ``[{"level", "k" (spatial index), "instance_number", "x", "y" (pixels, 2 decimals),
        "mm" (projection of the 3D point on that slice, patient mm), "class"}]`` in ``RSNA_LEVELS`` order.
        """
        ser = self.sagittal_t2
        g = ser.geometry
        classes = self.labels()["stenosis"]
        out = []
        for level, p in self.keypoints_mm()["canal"].items():
            k = g.nearest_slice(p)
            x, y, _ = g.to_pixel(p, k)
            x, y = round(x, 2), round(y, 2)
            point = dict(level=level, k=k, instance_number=ser.instance_numbers[k], x=x, y=y, mm=g.to_mm(x, y, k))
            point["class"] = classes[level]
            out.append(point)
        return out

    def tianchi_points(self) -> list[dict]:
        """The 11 Tianchi points on the middle sagittal T2 slice (integer pixels).

        Returns ``[{"identification", "structure" ("vertebra"|"disc"), "tag", "coord" [x, y],
        "zIndex" (InstanceNumber), "mm" (projection on the slice, patient mm)}]``, vertebrae then discs.
        """
        ser = self.sagittal_t2
        g, m = ser.geometry, ser.middle
        kp = self.keypoints_mm()
        sp = self.spine
        rows = [("vertebra", lv, "v2" if c else "v1") for lv, c in zip(TIANCHI_VERTEBRA_LEVELS, sp.vertebra_labels)]
        rows += [("disc", lv, tag) for lv, tag in zip(TIANCHI_DISC_LEVELS, sp.disc_tags)]
        out = []
        for structure, level, tag in rows:
            x, y, _ = g.to_pixel(kp[structure][level], m)
            xi, yi = int(round(x)), int(round(y))
            out.append(
                dict(
                    identification=level,
                    structure=structure,
                    tag=tag,
                    coord=[xi, yi],
                    zIndex=ser.instance_numbers[m],
                    mm=g.to_mm(xi, yi, m),
                )
            )
        return out


def _uid(*parts) -> str:
    return str(generate_uid(entropy_srcs=["spineone-phantom", *map(str, parts)]))


def _instance_numbers(rng: np.random.Generator, n: int, kind: str) -> tuple[int, ...]:
    if kind == "ax_t2":  # head to feet
        return tuple(int(v) for v in range(n, 0, -1))
    mode = rng.choice(3, p=[0.45, 0.2, 0.35])
    order = np.arange(1, n + 1) if mode == 0 else np.arange(n, 0, -1) if mode == 1 else rng.permutation(n) + 1
    return tuple(int(v) for v in order)


def fov_top_s(spine: Spine, body: str) -> float:
    """Arc length ``s`` (mm) of the cranial endplate of vertebral ``body`` (T9 lies one T10 height above T10)."""
    if body not in FOV_TOPS:
        raise ValueError(f"fov_top must be one of {FOV_TOPS}, got {body!r}")
    if body == "T9":  # not modelled: its cranial endplate is one T10 body and one T9-T10 disc above T10's
        return float(spine.body_s[0] - 3.0 * spine.body_half[0] - 2.0 * spine.disc_half[0])
    k = BODY_NAMES.index(body)
    return float(spine.body_s[k] - spine.body_half[k])


def _fov_from_top(geom: SeriesGeometry, spine: Spine, top_s: float) -> SeriesGeometry:
    """Shift a sagittal geometry along its rows so that its top edge passes through the centreline at ``top_s``."""
    m = (geom.num_slices - 1) // 2
    _, row, _ = geom.to_pixel(spine.point(top_s), m)
    shift = (row + 0.5) * geom.pixel_spacing[0] * geom.row_dir
    return replace(geom, positions=np.round(geom.positions + shift[None, :], 4))


def phantom_study(
    seed: int,
    index: int,
    layout: str = "rsna",
    *,
    min_size: int = 256,
    max_size: int = 512,
    class_frequencies: Mapping[str, Sequence[float]] | None = None,
    fov_top: str | None = None,
) -> PhantomStudy:
    """Describe study ``index`` of the phantom set ``seed`` (deterministic; renders nothing).

    Args:
        seed: set seed (non-negative int). index: study number in the set (non-negative int).
        layout: "rsna" (sagittal T2, ~30% of studies add a sagittal T1 or axial T2 series) or "tianchi"
            (sagittal T2, sagittal T1 and axial T2 in every study).
        min_size, max_size: range of Rows/Columns in pixels (sagittal pixel spacing is 0.4-0.9 mm when
            the size allows a ~240 mm field of view, coarser for tiny test images).
        class_frequencies: see :func:`bundle.phantoms.anatomy.check_class_frequencies`.
        fov_top: None (the default field of view, around T12..S1 and every keypoint) or one of ``FOV_TOPS``:
            the top edge of the sagittal series then lies at that vertebra's cranial endplate (T9..L1) and the
            field of view reaches down past S1; keypoints above the top edge fall outside the image.

    Example:
        >>> st = phantom_study(0, 0, "rsna", min_size=64, max_size=96)
        >>> st.sagittal_t2.description
        'Sagittal T2/STIR'
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, v in (("seed", seed), ("index", index)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if not (isinstance(min_size, (int, np.integer)) and isinstance(max_size, (int, np.integer))):
        raise ValueError(f"min_size and max_size must be ints, got {min_size!r}, {max_size!r}")
    if not 32 <= min_size <= max_size <= 2048:
        raise ValueError(f"need 32 <= min_size <= max_size <= 2048, got {min_size}, {max_size}")
    freqs = check_class_frequencies(class_frequencies)
    seed, index = int(seed), int(index)
    rng = np.random.default_rng([seed, index])
    spine = sample_spine(rng, freqs)
    kp = spine.keypoints()
    fov_points = np.array(
        [p for group in kp.values() for p in group.values()] + [spine.body_centre("T12"), spine.body_centre("S1")]
    )
    top_s = None if fov_top is None else fov_top_s(spine, fov_top)
    if top_s is not None:  # keep what lies below the top edge in view: the top point, the lumbar keypoints, S1
        arc = spine.coords(fov_points[:, 0], fov_points[:, 1], fov_points[:, 2])[0]
        fov_points = np.concatenate([spine.point(top_s)[None], fov_points[arc > top_s]])

    kinds = ["sag_t2"]
    if layout == "tianchi":
        kinds += ["sag_t1", "ax_t2"]
    else:
        r = rng.random()
        kinds += ["sag_t1"] if r < 0.13 else ["ax_t2"] if r < 0.26 else ["sag_t1", "ax_t2"] if r < 0.3 else []
    numbers = rng.choice(np.arange(1, 11), size=len(kinds), replace=False)  # SeriesNumber
    series = []
    for j, kind in enumerate(kinds):
        if kind == "ax_t2":
            discs = ("L3-L4", "L4-L5", "L5-S1")[int(rng.integers(0, 2)) :]
            geom = sample_axial(rng, spine, np.array([kp["disc"][d] for d in discs]), min_size, max_size)
        else:
            geom = sample_sagittal(rng, spine, fov_points, min_size, max_size)
            if top_s is not None:
                geom = _fov_from_top(geom, spine, top_s)
        if layout == "rsna":
            desc = {"sag_t2": "Sagittal T2/STIR", "sag_t1": "Sagittal T1", "ax_t2": "Axial T2"}[kind]
        else:
            names = {"sag_t2": _TIANCHI_T2, "sag_t1": _TIANCHI_T1, "ax_t2": ("T2_TRA",)}[kind]
            desc = str(names[int(rng.integers(0, len(names)))])
        series_uid = _uid(seed, index, "series", j)
        series.append(
            PhantomSeries(
                kind=kind,
                contrast="T1" if kind == "sag_t1" else "T2",
                description=desc,
                series_id=10_000_000 + index * 8 + j + _ID_STRIDE * int(rng.integers(0, 4000)),
                series_uid=series_uid,
                series_number=int(numbers[j]),
                geometry=geom,
                instance_numbers=_instance_numbers(rng, geom.num_slices, kind),
                sop_uids=tuple(_uid(seed, index, "image", j, k) for k in range(geom.num_slices)),
                photometric="MONOCHROME1" if rng.random() < 0.2 else "MONOCHROME2",
                slope=float(rng.choice([1.0, 2.0])),
                intercept=float(rng.choice([0.0, -1024.0])),
                gain=float(rng.uniform(500.0, 3000.0)),
                render_seed=(seed, index, 100 + j),
            )
        )
    year, month, day = int(rng.integers(2015, 2024)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return PhantomStudy(
        layout=layout,
        seed=seed,
        index=index,
        study_id=10_000_000 + index + _ID_STRIDE * int(rng.integers(0, 4000)),
        study_uid=_uid(seed, index, "study"),
        frame_uid=_uid(seed, index, "frame"),
        patient_name=f"{PHI_MARKER}^PHANTOM{index:04d}",
        patient_id=f"{PHI_MARKER}-{seed}-{index}",
        birth_date=f"{year - int(rng.integers(25, 80))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        study_date=f"{year}{month:02d}{day:02d}",
        study_time=f"{int(rng.integers(7, 20)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        institution=f"{PHI_MARKER} Phantom Hospital",
        spine=spine,
        series=tuple(series),
    )
