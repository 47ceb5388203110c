"""In-memory description of one phantom study: spine, series, identifiers, encodings and label points.

``phantom_study(seed, index, layout)`` is deterministic and cheap (nothing is rendered); pixels come
from :meth:`PhantomStudy.pixels`. The same objects drive the file layouts and serve as ground truth
(patient mm) in tests of other components.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from bundle.phantoms.anatomy import (
    BODY_NAMES,
    DISC_NAMES,
    THORACIC_NAMES,
    Lateral,
    Spine,
    check_class_frequencies,
    sample_lateral,
    sample_spine,
)
from bundle.phantoms.geometry import (
    SeriesGeometry,
    sample_axial,
    sample_axial_blocks,
    sample_axial_stack,
    sample_sagittal,
)
from bundle.phantoms.profiles import check_profile, sample_anatomy, sample_appearance
from bundle.phantoms.render import render_realistic, render_series
from bundle.rsna_labels import CONDITION_NAMES, CONDITIONS, LEVELS
from bundle.streams import TIANCHI_DISC_LEVELS, TIANCHI_VERTEBRA_LEVELS
from pydicom.uid import generate_uid

__all__ = [
    "PHI_MARKER",
    "LAYOUTS",
    "FOV_TOPS",
    "RSNA_DESCRIPTIONS",
    "SERIES_RATES",
    "PhantomSeries",
    "PhantomStudy",
    "phantom_study",
    "fov_top_s",
    "realistic_top_s",
]

PHI_MARKER = "XPHIX"  # in PatientName, PatientID and InstitutionName of every phantom file
LAYOUTS = ("rsna", "tianchi")
FOV_TOPS = ("T9", "T10", "T11", "T12", "L1")  # where the top of a lumbar sagittal field of view may lie
_ID_STRIDE = 1_000_003  # ids = 10^7 + running number + stride * random: unique, and some above 2**31
_TIANCHI_T2 = ("T2_SAG", "SAG T2 FSE", "t2_tse_sag")
_TIANCHI_T1 = ("T1_SAG", "SAG T1 FSE")
RSNA_DESCRIPTIONS = {"sag_t2": "Sagittal T2/STIR", "sag_t1": "Sagittal T1", "ax_t2": "Axial T2"}
# independent random streams of the full RSNA layout, next to the study's main stream [seed, index]
# (5 and 7 are the Tianchi file-name and point orders in layouts.py)
_LATERAL_STREAM, _PLAN_STREAM, _EMPTY_STREAM = 11, 12, 14
#: quirk rates of the full RSNA layout (per study unless said otherwise)
SERIES_RATES = {
    "no_sag_t2": 0.03,  # real data: 1 in 1,975; a few percent here so tests and batch runs meet it
    "no_sag_t1": 0.03,  # only in studies that have a sagittal T2
    "two_sag_t1": 0.05,
    "axial_count": (0.03, 0.82, 0.12, 0.03),  # P(0, 1, 2, 3 axial T2 series)
    "axial_stack": 0.35,  # a single axial series: one stack through all levels (else per-level blocks)
    "axial_ascending": 0.25,  # per axial series: InstanceNumber 1 at the feet (else at the head)
    "empty_cell": 0.0125,  # per foraminal / subarticular train.csv cell (about 1% of all 25 cells)
}


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
    levels: tuple[str, ...] = ()  # axial series of the full RSNA layout: the RSNA levels it covers
    appearance: dict | None = None  # "realistic" profile draws (bundle.phantoms.profiles); None: the easy look
    bits_stored: int = 16
    # acquisition artefacts of the realistic profile (spatial slice index, -1 = none): a slice whose file is not
    # written (a gap in the positions), and a slice written twice, the copy with ``duplicate_instance`` and
    # ``duplicate_uid`` (InstanceNumber above all others, so readers keeping the lowest keep the original)
    missing: int = -1
    duplicate: int = -1
    duplicate_uid: str = ""

    @property
    def duplicate_instance(self) -> int:
        """InstanceNumber of the duplicated slice's second file: one above the series' highest."""
        return max(self.instance_numbers) + 1

    @property
    def files(self) -> list[tuple[int, bool]]:
        """The series' files on disk in spatial order: ``(spatial slice index, is the duplicate's copy)``."""
        out = [(k, False) for k in range(self.geometry.num_slices) if k != self.missing]
        if self.duplicate >= 0:
            out.insert(out.index((self.duplicate, False)) + 1, (self.duplicate, True))
        return out

    @property
    def middle(self) -> int:
        """Spatial index of the middle slice, ``(S - 1) // 2``."""
        return (self.geometry.num_slices - 1) // 2


@dataclass(frozen=True, eq=False)
class PhantomStudy:
    """A phantom study: ``series[0]`` is the labelled sagittal T2 series wherever the study has one.

    RSNA-layout studies carry the lateral conditions (``lateral``) and the (condition key, level) cells
    left empty in train.csv (``empty``); Tianchi studies have ``lateral=None``.
    """

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
    lateral: Lateral | None = None
    empty: frozenset = frozenset()
    anatomy: dict | None = None  # realistic profile's anatomy draws (bundle.phantoms.profiles); None: easy

    @property
    def has_sagittal_t2(self) -> bool:
        return bool(self.series) and self.series[0].kind == "sag_t2"

    @property
    def sagittal_t2(self) -> PhantomSeries:
        if not self.has_sagittal_t2:
            raise ValueError(f"phantom study {self.study_id} (seed {self.seed}, index {self.index}) has no sagittal T2")
        return self.series[0]

    def series_of(self, kind: str) -> list[PhantomSeries]:
        """The study's series of one kind ("sag_t2" | "sag_t1" | "ax_t2") in study order."""
        return [ser for ser in self.series if ser.kind == kind]

    def keypoints_mm(self) -> dict[str, dict[str, np.ndarray]]:
        """Ground truth on the mid-sagittal plane, patient mm: see :meth:`Spine.keypoints`."""
        return self.spine.keypoints()

    def labels(self) -> dict[str, dict[str, str]]:
        """Class names per level: see :meth:`Spine.labels`."""
        return self.spine.labels()

    def pixels(self, series: PhantomSeries) -> np.ndarray:
        """Stored DICOM pixel values, uint16 (S, rows, cols) in spatial order."""
        lateral = None if series.kind == "sag_t2" else self.lateral  # the sagittal T2 stays as before them
        if series.appearance is None:
            rng = np.random.default_rng(series.render_seed)
            signal = render_series(self.spine, series.geometry, series.contrast, rng, lateral)
        else:
            signal = render_realistic(self.spine, series.geometry, series.contrast, series.appearance, lateral)
        stored = np.rint((signal * series.gain - series.intercept) / series.slope)
        stored = np.clip(stored, 0, 2**series.bits_stored - 1).astype(np.uint16)
        if series.photometric == "MONOCHROME1":
            stored = stored.max() - stored
        return stored

    def rsna_points(self) -> list[dict]:
        """Spinal canal label points on the sagittal T2, each on the slice closest to the 3D point.

        Returns ``[{"level", "series_id", "k" (spatial index), "instance_number", "x", "y" (pixels, 2 decimals),
        "mm" (projection of the 3D point on that slice, patient mm), "class"}]`` in ``RSNA_LEVELS`` order.
        A study without sagittal T2 has them on its first sagittal T1 (as the real one), else none.
        """
        carriers = self.series_of("sag_t2") or self.series_of("sag_t1")
        if not carriers:
            return []
        classes = self.labels()["stenosis"]
        return [_point_on(carriers[0], level, p, classes[level]) for level, p in self.keypoints_mm()["canal"].items()]

    def condition_points_mm(self) -> dict[str, dict[str, np.ndarray]]:
        """Ground truth of the lateral conditions in patient mm: ``{condition key: {level: (3,)}}``.

        Foraminal points are the foramen centres, subarticular points lie in the lateral recess on the
        disc's centre plane; keys as ``bundle.rsna_labels.CONDITIONS[1:]``. Empty for Tianchi studies.
        """
        if self.lateral is None:
            return {}
        out = {}
        for cond in CONDITIONS[1:]:
            side = "left" if cond.startswith("left") else "right"
            where = self.spine.foramen_point if "foraminal" in cond else self.spine.recess_point
            out[cond] = {lv: where(lv, side) for lv in LEVELS}
        return out

    def grades(self) -> dict[str, dict[str, str]]:
        """All 25 train.csv cells: ``{condition key: {level: severity name or "" (unscored)}}``."""
        out = {CONDITIONS[0]: dict(self.labels()["stenosis"])}
        if self.lateral is None:
            return out
        lab = self.lateral.labels()
        for cond in CONDITIONS[1:]:
            side = "left" if cond.startswith("left") else "right"
            group = lab["foraminal" if "foraminal" in cond else "subarticular"][side]
            out[cond] = {lv: "" if (cond, lv) in self.empty else group[lv] for lv in LEVELS}
        return out

    def condition_points(self, condition: str) -> list[dict]:
        """Label points of one lateral condition (key, e.g. "left_subarticular_stenosis") on their series.

        Foraminal points lie on the first sagittal T1 slice nearest the foramen; subarticular points on the
        slice of the axial series covering the level that is nearest the recess point (which lies on the
        disc's centre plane), projected on that slice. Dicts as :meth:`rsna_points`; levels whose series is
        missing or whose cell is empty have no point.
        """
        if condition not in CONDITIONS[1:]:
            raise ValueError(f"condition must be one of {CONDITIONS[1:]}, got {condition!r}")
        truth = self.condition_points_mm().get(condition, {})
        grades = self.grades().get(condition, {})
        out = []
        for level, p in truth.items():
            if not grades[level]:
                continue
            if "foraminal" in condition:
                carriers = self.series_of("sag_t1")
            else:
                carriers = [ser for ser in self.series_of("ax_t2") if level in ser.levels]
            if carriers:
                out.append(_point_on(carriers[0], level, p, grades[level]))
        return out

    def label_rows(self) -> list[tuple[int, int, str, str, float, float]]:
        """Rows of train_label_coordinates.csv: ``(series_id, instance_number, condition name, level, x, y)``."""
        rows = [
            (p["series_id"], p["instance_number"], CONDITION_NAMES[0], p["level"], p["x"], p["y"])
            for p in self.rsna_points()
        ]
        if self.lateral is not None:
            for cond, name in zip(CONDITIONS[1:], CONDITION_NAMES[1:]):
                rows += [
                    (p["series_id"], p["instance_number"], name, p["level"], p["x"], p["y"])
                    for p in self.condition_points(cond)
                ]
        return rows

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


def _point_on(ser: PhantomSeries, level: str, p: np.ndarray, severity: str) -> dict:
    """Label point of patient-mm ``p`` on the slice of ``ser`` nearest to it."""
    g = ser.geometry
    k = g.nearest_slice(p)
    x, y, _ = g.to_pixel(p, k)
    x, y = round(x, 2), round(y, 2)
    point = dict(level=level, series_id=ser.series_id, k=k, instance_number=ser.instance_numbers[k], x=x, y=y)
    point["mm"] = g.to_mm(x, y, k)
    point["class"] = severity
    return point


def _uid(*parts) -> str:
    return str(generate_uid(entropy_srcs=["spineone-phantom", *map(str, parts)]))


def _instance_numbers(rng: np.random.Generator, n: int, kind: str) -> tuple[int, ...]:
    if kind == "ax_t2":  # head to feet
        return tuple(int(v) for v in range(n, 0, -1))
    mode = rng.choice(3, p=[0.45, 0.2, 0.35])
    order = np.arange(1, n + 1) if mode == 0 else np.arange(n, 0, -1) if mode == 1 else rng.permutation(n) + 1
    return tuple(int(v) for v in order)


def fov_top_s(spine: Spine, body: str) -> float:
    """Arc length ``s`` (mm) of the cranial endplate of vertebral ``body`` (one of ``FOV_TOPS``)."""
    if body not in FOV_TOPS:
        raise ValueError(f"fov_top must be one of {FOV_TOPS}, got {body!r}")
    return _body_top_s(spine, body)


def _body_top_s(spine: Spine, body: str) -> float:
    """Cranial endplate ``s`` (mm) of ``body``: T7..T9 from the drawn thoracic bodies where the spine has them
    (realistic profile), else T9 lies one T10 body and one T9-T10 disc above T10's cranial endplate."""
    if body in THORACIC_NAMES and spine.thoracic.shape[1]:
        k = THORACIC_NAMES.index(body)
        return float(spine.thoracic[0, k] - spine.thoracic[1, k])
    if body == "T9":
        return float(spine.body_s[0] - 3.0 * spine.body_half[0] - 2.0 * spine.disc_half[0])
    k = BODY_NAMES.index(body)
    return float(spine.body_s[k] - spine.body_half[k])


def realistic_top_s(spine: Spine, anatomy: Mapping) -> float:
    """Top edge ``s`` (mm) of the sagittal field of view drawn by the realistic profile (``anatomy["fov_top"]``):
    a thoracic body's cranial endplate, or for "cut" inside T12 at ``fov_cut`` of its height above its caudal
    endplate."""
    if anatomy["fov_top"] != "cut":
        return _body_top_s(spine, anatomy["fov_top"])
    k = BODY_NAMES.index("T12")
    return float(spine.body_s[k] + spine.body_half[k] * (1.0 - 2.0 * anatomy["fov_cut"]))


def _fov_from_top(geom: SeriesGeometry, spine: Spine, top_s: float) -> SeriesGeometry:
    """Shift a sagittal geometry along its rows so that its top edge passes through the centreline at ``top_s``."""
    m = (geom.num_slices - 1) // 2
    _, row, _ = geom.to_pixel(spine.point(top_s), m)
    shift = (row + 0.5) * geom.pixel_spacing[0] * geom.row_dir
    return replace(geom, positions=np.round(geom.positions + shift[None, :], 4))


def _sagittal(rng, spine: Spine, fov_points: np.ndarray, min_size: int, max_size: int, top_s) -> SeriesGeometry:
    geom = sample_sagittal(rng, spine, fov_points, min_size, max_size)
    return geom if top_s is None else _fov_from_top(geom, spine, top_s)


def _series(
    rng: np.random.Generator,
    key: tuple[int, int, int],
    kind: str,
    desc: str,
    geom: SeriesGeometry,
    number: int,
    levels: tuple[str, ...] = (),
) -> PhantomSeries:
    """Series ``j`` of study ``(seed, index)`` (``key = (seed, index, j)``): ids and encoding drawn from ``rng``."""
    seed, index, j = key
    if kind == "ax_t2" and levels:  # full layout: head to feet, or now and then the opposite
        instances = tuple(range(geom.num_slices, 0, -1))
        if rng.random() < SERIES_RATES["axial_ascending"]:
            instances = instances[::-1]
    else:
        instances = None
    return PhantomSeries(
        kind=kind,
        contrast="T1" if kind == "sag_t1" else "T2",
        description=desc,
        series_id=10_000_000 + index * 8 + j + _ID_STRIDE * int(rng.integers(0, 4000)),
        series_uid=_uid(seed, index, "series", j),
        series_number=number,
        geometry=geom,
        instance_numbers=instances or _instance_numbers(rng, geom.num_slices, kind),
        sop_uids=tuple(_uid(seed, index, "image", j, k) for k in range(geom.num_slices)),
        photometric="MONOCHROME1" if rng.random() < 0.2 else "MONOCHROME2",
        slope=float(rng.choice([1.0, 2.0])),
        intercept=float(rng.choice([0.0, -1024.0])),
        gain=float(rng.uniform(500.0, 3000.0)),
        render_seed=(seed, index, 100 + j),
        levels=levels,
    )


def _series_plan(rng: np.random.Generator) -> tuple[bool, int, list[tuple[str, tuple[str, ...]]]]:
    """(has sagittal T2, number of sagittal T1, axial series as ``(mode "stack"|"blocks", levels)``)."""
    r = SERIES_RATES
    u = rng.random(3)
    has_t2 = bool(u[0] >= r["no_sag_t2"])
    n_t1 = 0 if has_t2 and u[1] < r["no_sag_t1"] else 2 if u[1] >= 1.0 - r["two_sag_t1"] else 1
    n_ax = int(np.searchsorted(np.cumsum(r["axial_count"]), u[2], side="right"))
    if n_ax == 0:
        return has_t2, n_t1, []
    if n_ax == 1:
        return has_t2, n_t1, [("stack" if rng.random() < r["axial_stack"] else "blocks", LEVELS)]
    cuts = [0, *sorted(int(c) for c in rng.choice(np.arange(1, len(LEVELS)), n_ax - 1, replace=False)), len(LEVELS)]
    return has_t2, n_t1, [("blocks", LEVELS[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def _full_layout(
    key: tuple[int, int],
    sag_t2: PhantomSeries,
    spine: Spine,
    fov_points: np.ndarray,
    top_s: float | None,
    min_size: int,
    max_size: int,
) -> list[PhantomSeries]:
    """The series of a full-layout RSNA study: the given sagittal T2 (unless planned missing), T1s, axials."""
    seed, index = key
    rng = np.random.default_rng([seed, index, _PLAN_STREAM])
    has_t2, n_t1, axials = _series_plan(rng)
    numbers = [int(v) for v in rng.permutation(np.arange(1, 21)) if v != sag_t2.series_number]
    out = [sag_t2] if has_t2 else []
    for j in range(1, 1 + n_t1):
        geom = _sagittal(rng, spine, fov_points, min_size, max_size, top_s)
        out.append(_series(rng, (seed, index, j), "sag_t1", RSNA_DESCRIPTIONS["sag_t1"], geom, numbers[j]))
    for j, (mode, levels) in enumerate(axials, start=1 + n_t1):
        disc_s = np.array([spine.disc_s[DISC_NAMES.index(lv.replace("/", "-"))] for lv in levels])
        sampler = sample_axial_stack if mode == "stack" else sample_axial_blocks
        geom = sampler(rng, spine, disc_s, min_size, max_size)
        out.append(_series(rng, (seed, index, j), "ax_t2", RSNA_DESCRIPTIONS["ax_t2"], geom, numbers[j], levels))
    return out


def _respaced(geom: SeriesGeometry, ps: float, thickness: float, max_size: int) -> SeriesGeometry:
    """``geom`` with in-plane spacing ``ps`` (mm, raised to keep its field of view within ``max_size`` pixels)."""
    fov_r, fov_c = geom.rows * geom.pixel_spacing[0], geom.cols * geom.pixel_spacing[1]
    ps = round(max(ps, fov_r / max_size, fov_c / max_size), 6)
    rows, cols = max(32, int(round(fov_r / ps))), max(32, int(round(fov_c / ps)))
    pos = []
    for k in range(geom.num_slices):
        c, r, _ = geom.dirs(k)
        centre = geom.positions[k] + 0.5 * (geom.cols - 1) * geom.pixel_spacing[1] * c
        centre = centre + 0.5 * (geom.rows - 1) * geom.pixel_spacing[0] * r
        pos.append(centre - 0.5 * (cols - 1) * ps * c - 0.5 * (rows - 1) * ps * r)
    return replace(
        geom,
        rows=rows,
        cols=cols,
        pixel_spacing=(ps, ps),
        positions=np.round(np.array(pos), 4),
        slice_thickness=round(float(thickness), 3),
    )


def _with_profile(series: list[PhantomSeries], seed: int, index: int, max_size: int) -> list[PhantomSeries]:
    """Series with the "realistic" appearance draws, spacing, thickness and bit depth (see ``profiles``)."""
    out = []
    for j, ser in enumerate(series):
        a = sample_appearance("realistic", seed, index, j, ser.contrast)
        geom = _respaced(ser.geometry, a["pixel_spacing"], a["slice_thickness"], max_size)
        gain = ser.gain if a["bits"] == 16 else min(ser.gain, 2000.0)
        out.append(replace(ser, geometry=geom, appearance=a, bits_stored=a["bits"], gain=gain))
    return out


def _empty_cells(rng: np.random.Generator) -> set[tuple[str, str]]:
    """(condition key, level) cells of the lateral conditions left empty (unscored) in train.csv."""
    u = rng.random((len(CONDITIONS) - 1, len(LEVELS)))
    return {
        (c, lv)
        for i, c in enumerate(CONDITIONS[1:])
        for j, lv in enumerate(LEVELS)
        if u[i, j] < SERIES_RATES["empty_cell"]
    }


def phantom_study(
    seed: int,
    index: int,
    layout: str = "rsna",
    *,
    min_size: int = 256,
    max_size: int = 512,
    class_frequencies: Mapping[str, Sequence[float]] | None = None,
    fov_top: str | None = None,
    profile: str = "easy",
) -> PhantomStudy:
    """Describe study ``index`` of the phantom set ``seed`` (deterministic; renders nothing).

    Args:
        seed: set seed (non-negative int). index: study number in the set (non-negative int).
        layout: "rsna" (the full real layout: sagittal T2/STIR, sagittal T1 and axial T2 series with the quirk
            rates of ``SERIES_RATES``; lateral conditions in ``lateral``) or "tianchi" (sagittal T2, sagittal T1
            and axial T2 in every study).
        min_size, max_size: range of Rows/Columns in pixels (sagittal pixel spacing is 0.4-0.9 mm when
            the size allows a ~240 mm field of view, coarser for tiny test images).
        class_frequencies: see :func:`bundle.phantoms.anatomy.check_class_frequencies`.
        fov_top: None (the default field of view: around T12..S1 and every keypoint for "easy", drawn per
            study for "realistic") or one of ``FOV_TOPS``: the top edge of the sagittal series then lies at that
            vertebra's cranial endplate (T9..L1) and the field of view reaches down past S1; keypoints above the
            top edge fall outside the image.
        profile: "easy" (the original look and anatomy) or "realistic" (randomised appearance, spacing
            0.3..1.2 mm, thickness 3..6 mm, 12/16-bit; field of view from T8..T11 or cut just above L1,
            transitional anatomy, lordosis, scoliosis, collapsed discs, spondylolisthesis, a missing or duplicated
            sagittal slice now and then (``PhantomSeries.missing`` / ``duplicate``): see ``bundle.phantoms.profiles``).
            The grades do not depend on it; the realistic keypoints follow its anatomy.

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
    anatomy = sample_anatomy(profile, seed, index)
    spine = sample_spine(rng, freqs, anatomy)
    kp = spine.keypoints()
    fov_points = np.array(
        [p for group in kp.values() for p in group.values()] + [spine.body_centre("T12"), spine.body_centre("S1")]
    )
    top_s = None if fov_top is None else fov_top_s(spine, fov_top)
    if top_s is None and anatomy is not None:
        top_s = realistic_top_s(spine, anatomy)
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
            geom = _sagittal(rng, spine, fov_points, min_size, max_size, top_s)
        if layout == "rsna":
            desc = RSNA_DESCRIPTIONS[kind]
        else:
            names = {"sag_t2": _TIANCHI_T2, "sag_t1": _TIANCHI_T1, "ax_t2": ("T2_TRA",)}[kind]
            desc = str(names[int(rng.integers(0, len(names)))])
        series.append(_series(rng, (seed, index, j), kind, desc, geom, int(numbers[j])))
    lateral = empty = None
    if layout == "rsna":  # the full layout, from streams of its own: the draws above stay as they were
        lateral = sample_lateral(np.random.default_rng([seed, index, _LATERAL_STREAM]), freqs)
        series = _full_layout((seed, index), series[0], spine, fov_points, top_s, min_size, max_size)
        empty = _empty_cells(np.random.default_rng([seed, index, _EMPTY_STREAM]))
    if check_profile(profile) == "realistic":
        series = _with_profile(list(series), seed, index, max_size)
    year, month, day = int(rng.integers(2015, 2024)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    study = PhantomStudy(
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
        lateral=lateral,
        empty=frozenset(empty or ()),
        anatomy=anatomy,
    )
    return study if anatomy is None else _with_slice_artefacts(study)


def _labelled_slices(study: PhantomStudy) -> dict[int, set[int]]:
    """Spatial slice indices carrying a label point, per series id (RSNA rows; the Tianchi middle sagittal T2)."""
    out: dict[int, set[int]] = {}
    by_id = {ser.series_id: ser for ser in study.series}
    if study.layout == "rsna":
        for series_id, instance, *_ in study.label_rows():
            out.setdefault(series_id, set()).add(by_id[series_id].instance_numbers.index(instance))
    elif study.has_sagittal_t2:
        out[study.sagittal_t2.series_id] = {study.sagittal_t2.middle}
    return out


def _with_slice_artefacts(study: PhantomStudy) -> PhantomStudy:
    """The study with the realistic profile's missing or duplicated slice on its series (draws
    ``slice_artefact`` / ``slice_pick``): one slice among those that are neither the first, the last, the middle
    nor carrying a label point, so every label keeps its instance and a missing slice is always a gap."""
    labelled = _labelled_slices(study)
    series = []
    for ser in study.series:
        a = ser.appearance
        n = ser.geometry.num_slices
        eligible = [k for k in range(1, n - 1) if k != ser.middle and k not in labelled.get(ser.series_id, set())]
        if not a["slice_artefact"] or not eligible:
            series.append(ser)
            continue
        k = eligible[min(int(a["slice_pick"] * len(eligible)), len(eligible) - 1)]
        if a["slice_artefact"] == "missing":
            series.append(replace(ser, missing=k))
        else:
            series.append(replace(ser, duplicate=k, duplicate_uid=_uid(ser.series_uid, "duplicate", k)))
    return replace(study, series=tuple(series))
