"""Lumbar spine anatomy of one phantom study, in patient mm (DICOM LPS: +x left, +y posterior, +z head).

The spine's mid-sagittal centreline is a circular arc in the (y, z) plane at ``x = x_mid`` (lordosis:
the centre of the circle lies posterior to the spine). Every point gets *spine coordinates*
``(s, u, dx)``: ``s`` arc length along the centreline in mm (increasing towards the feet), ``u`` signed
distance from the centreline along the posterior normal in mm (posterior positive), ``dx = x - x_mid``
the lateral offset in mm. Vertebral bodies and discs are rounded rectangles in ``(s, u)`` whose
antero-posterior extent shrinks laterally, so the structures are 3D and fade on lateral slices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from bundle.streams import RSNA_LEVELS, RSNA_SEVERITIES, TIANCHI_DISC_LEVELS, TIANCHI_VERTEBRA_LEVELS

__all__ = [
    "BODY_NAMES",
    "DISC_NAMES",
    "THORACIC_NAMES",
    "smoothstep",
    "DEFAULT_CLASS_FREQUENCIES",
    "FORAMEN_HEIGHT_LOSS",
    "FORAMEN_NARROWING",
    "FORAMEN_RESIDUAL",
    "FORAMEN_ROOT",
    "RECESS_NARROWING",
    "STENOSIS_RESIDUAL",
    "SIDES",
    "Lateral",
    "Spine",
    "check_class_frequencies",
    "foramen_fat_band",
    "foramen_frame",
    "foramen_narrowing_of",
    "foramen_outline",
    "sample_lateral",
    "sample_spine",
]

BODY_NAMES = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3")
DISC_NAMES = tuple(f"{a}-{b}" for a, b in zip(BODY_NAMES[:-1], BODY_NAMES[1:]))
# nominal sizes in mm at scale 1 (adult lumbar spine)
_BODY_HEIGHT = np.array([22, 23, 24, 25, 26, 27, 27, 26, 28, 24, 20], float)
_BODY_DEPTH = np.array([30, 31, 33, 35, 37, 39, 40, 40, 38, 30, 24], float)
_BODY_HALF_WIDTH = np.array([17, 18, 19, 20, 21, 22, 23, 24, 27, 24, 20], float)
_DISC_HEIGHT = np.array([6, 6.5, 7, 8, 9, 10, 11, 10, 2, 1.5], float)
# thoracic bodies drawn above T10 in the realistic profile (a field of view from T8), cranial first; the discs
# below them (T7-T8, T8-T9, T9-T10)
THORACIC_NAMES = ("T7", "T8", "T9")
_THORACIC_HEIGHT = np.array([20.0, 21.0, 21.5])
_THORACIC_DEPTH = np.array([26.0, 27.0, 28.5])
_THORACIC_HALF_WIDTH = np.array([15.0, 15.5, 16.5])
_THORACIC_DISC = np.array([5.0, 5.5, 5.5])
_CANAL_REL = np.array([1.0, 1.0, 1.0, 1.05, 1.05, 1.0, 0.98, 0.95, 0.7, 0.35, 0.0], float)

DEFAULT_CLASS_FREQUENCIES: dict[str, tuple[float, ...]] = {
    "stenosis": (0.80, 0.13, 0.07),  # Normal/Mild, Moderate, Severe (RSNA spinal canal stenosis)
    "disc": (0.65, 0.35),  # Normal, Degenerative (Tianchi discs)
    "vertebra": (0.70, 0.30),  # Normal, Degenerative (Tianchi vertebrae)
    # real RSNA class frequencies (data-formats.md), normalised (the published figures are rounded)
    "foraminal": tuple(float(f) / 1.001 for f in (0.780, 0.181, 0.040)),  # neural foraminal narrowing
    "subarticular": (0.714, 0.190, 0.096),  # subarticular stenosis
}
SIDES = ("left", "right")  # patient left is +x (LPS)
# foraminal fat: radii of the residual fat ellipse / the normal foramen, range per grade (the axial T2 view)
FORAMEN_RESIDUAL = ((0.85, 1.0), (0.5, 0.62), (0.15, 0.3))
# the sagittal T1 view (foramen_outline): fraction of the outlined foramen's width filled by intermediate tissue
# at its top (twice that at its bottom), range per grade, mapped from the residual's place in its grade's range
FORAMEN_NARROWING = ((0.0, 0.06), (0.25, 0.36), (0.62, 0.8))
FORAMEN_HEIGHT_LOSS = 0.3  # loss of the outline's height (fraction) per unit of narrowing; its top stays
# the exiting nerve root in the outline's normalised coordinates: centre (ts, tu), semi-axes (along ts, tu)
FORAMEN_ROOT = (-0.45, -0.15, 0.2, 0.3)
# lateral recess: radius of the facet / ligamentum bulge / canal half-width, range per grade
RECESS_NARROWING = ((0.0, 0.1), (0.45, 0.6), (0.75, 0.9))
# residual canal AP width / normal width, range per stenosis class
STENOSIS_RESIDUAL = ((0.88, 1.0), (0.45, 0.55), (0.10, 0.20))
_DEGENERATIVE_DISC_TAGS = ("v2", "v3", "v4", "v2,v5", "v3,v5", "v5")
_STENOSIS_DISCS = tuple(level.replace("/", "-") for level in RSNA_LEVELS)  # "L1-L2" .. "L5-S1"


def check_class_frequencies(freqs: Mapping[str, Sequence[float]] | None) -> dict[str, tuple[float, ...]]:
    """Validate and normalise class frequencies ``{"stenosis": 3, "disc": 2, "vertebra": 2, "foraminal": 3,
    "subarticular": 3 values}``.

    Missing keys keep their defaults; values must be non-negative with a positive sum.

    Example:
        >>> check_class_frequencies({"disc": [1, 1]})["disc"]
        (0.5, 0.5)
    """
    out = dict(DEFAULT_CLASS_FREQUENCIES)
    for key, values in (freqs or {}).items():
        if key not in out:
            raise ValueError(f"class_frequencies: unknown key {key!r}, expected one of {sorted(out)}")
        v = np.asarray(values, dtype=float)
        if v.shape != (len(out[key]),):
            raise ValueError(f"class_frequencies[{key!r}] needs {len(out[key])} values, got {list(values)}")
        if not np.all(np.isfinite(v)) or np.any(v < 0) or v.sum() <= 0:
            raise ValueError(f"class_frequencies[{key!r}] must be non-negative with a positive sum, got {list(values)}")
        out[key] = tuple(float(x) for x in v / v.sum())
    return out


def smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def foramen_frame(s, u, centre: tuple, half: tuple, narrowing):
    """Normalised coordinates ``(ts, tu, a)`` of spine coordinates ``s, u`` (mm) in one neural foramen's outline.

    ``centre = (s, u)`` and ``half = (a_s, b_u)`` of the normal foramen (:meth:`Spine.foramen`, mm); a
    ``narrowing`` (0..1, :data:`FORAMEN_NARROWING`) lowers its caudal end by ``FORAMEN_HEIGHT_LOSS * narrowing``
    of its height, its cranial end (the upper pedicle) staying. ``ts`` runs from -1 (top) to 1 (bottom) of that
    outline, ``tu`` from -1 (anterior) to 1 (posterior); ``a`` is the outline's half height in mm. Scalars or
    arrays of one shape; float32 arrays stay float32.
    """
    a = half[0] * (1 - FORAMEN_HEIGHT_LOSS * narrowing)
    return (s - (centre[0] - half[0] + a)) / a, (u - centre[1]) / half[1], a


def foramen_outline(ts, tu):
    """Inverted-teardrop outline of a neural foramen on a parasagittal slice: ``(rho, w)``, ``rho < 1`` inside.

    ``ts, tu`` from :func:`foramen_frame`. The outline is an ellipse whose antero-posterior half width ``w``
    (fraction of the normal one) narrows from 1 in its upper part (the exiting root) to 0.5 at its bottom (the
    disc level, between the disc and the facet joint). ``rho`` is the normalised radius.
    """
    w = 1 - 0.5 * smoothstep((ts + 0.3) / 1.3)
    return np.sqrt(ts * ts + (tu / w) ** 2), w


def foramen_fat_band(ts, w, narrowing, front):
    """Limits ``(lo, hi)`` in ``tu`` of the foraminal fat at height ``ts`` (``w`` from :func:`foramen_outline`).

    Intermediate tissue fills ``narrowing * (1 + h)`` of the outline's width at height ``h`` (0 at the top, 1
    at the bottom): the share ``front`` (0..1) from the front (disc bulge, osteophyte), the rest from behind
    (facet and ligamentum flavum hypertrophy). Fat lies where ``lo < tu < hi`` inside the outline; the
    fraction still fat depends on ``narrowing`` and the shape only, not on the foramen's size in mm.
    """
    half = w * np.sqrt(np.clip(1 - ts * ts, 0.0, None))
    closed = 2 * half * narrowing * (1 + np.clip((ts + 1) * 0.5, 0.0, 1.0))
    return -half + front * closed, half - (1 - front) * closed


def _rotate(v: np.ndarray, a: float) -> np.ndarray:
    """Rotate a 2-vector (y, z) by ``a`` radians (counter-clockwise in the (y, z) plane)."""
    return np.array([np.cos(a) * v[0] - np.sin(a) * v[1], np.sin(a) * v[0] + np.cos(a) * v[1]])


@dataclass(frozen=True, eq=False)
class Spine:
    """Geometry, appearance factors and labels of one phantom spine (all lengths in patient mm).

    Per-body arrays follow ``BODY_NAMES``, per-disc arrays ``DISC_NAMES``. ``stenosis`` holds the RSNA
    class index per ``RSNA_LEVELS``; ``disc_labels``/``vertebra_labels`` the Tianchi class index
    (0 normal, 1 degenerative) per ``TIANCHI_DISC_LEVELS``/``TIANCHI_VERTEBRA_LEVELS``.
    """

    scale: float
    x_mid: float
    centre: np.ndarray  # (2,) circle centre (y, z)
    radius: float
    apex_dir: np.ndarray  # (2,) unit vector (y, z) from the centre to the centreline point at s_apex
    s_apex: float
    body_s: np.ndarray
    body_half: np.ndarray
    body_depth: np.ndarray
    body_half_width: np.ndarray
    body_marrow: np.ndarray  # marrow signal factor
    body_degenerate: np.ndarray  # bool: endplate / marrow (Modic-like) change
    disc_s: np.ndarray
    disc_half: np.ndarray
    disc_bulge: np.ndarray  # posterior bulge in mm
    disc_degenerate: np.ndarray  # bool: dark, thin, bulging disc
    disc_narrowing: np.ndarray  # canal narrowing fraction (1 - residual) at each disc
    canal_width: np.ndarray  # normal canal AP width at each body centre
    canal_half_width: float  # lateral half-width of the dural sac
    canal_gap: float  # posterior body margin to dural sac (ligament + epidural space)
    conus_s: float  # end of the spinal cord
    stenosis: tuple[int, ...]
    disc_labels: tuple[int, ...]
    vertebra_labels: tuple[int, ...]
    disc_tags: tuple[str, ...]
    # realistic-profile anatomy (defaults: the original spine)
    lumbar: int = 5  # lumbar-type vertebrae above the sacrum (4 or 6: transitional anatomy, see profiles)
    scoliosis: tuple[float, float, float] = (0.0, 0.0, 1.0)  # lateral deviation (mm), its centre s, half-width
    # drawn thoracic bodies above T10 (THORACIC_NAMES, cranial first): centre s, half height, depth, half width;
    # and the discs below each of them (T7-T8 .. T9-T10): centre s, half height
    thoracic: np.ndarray = field(default_factory=lambda: np.zeros((4, 0)))
    thoracic_disc: np.ndarray = field(default_factory=lambda: np.zeros((2, 0)))
    # per disc: Schmorl's node (radius mm, 0 = none; endplate side -1 cranial / +1 caudal; AP offset mm) and the
    # anterior osteophytes of its two endplates (reach mm, 0 = none)
    disc_node: np.ndarray = field(default_factory=lambda: np.zeros((3, len(DISC_NAMES))))
    disc_spur: np.ndarray = field(default_factory=lambda: np.zeros(len(DISC_NAMES)))
    # spondylolisthesis: DISC_NAMES index of the slipped disc (-1 = none) and the forward slip (mm) of everything
    # above it over the body below
    slip: tuple[int, float] = (-1, 0.0)
    # body habitus in mm at scale 1: paraspinal muscle depth behind the canal, posterior subcutaneous fat, and the
    # depth of the abdomen in front of the vertebral bodies
    habitus: tuple[float, float, float] = (45.0, 22.0, 230.0)

    # ---- mapping between patient mm and spine coordinates
    def lateral_at(self, s):
        """Lateral (x) offset of the centreline in mm at arc length ``s``: the scoliotic curve (0 without)."""
        amp, centre, width = self.scoliosis
        if amp == 0:
            return np.zeros_like(np.asarray(s, dtype=float))
        return amp * np.exp(-0.5 * ((np.asarray(s, dtype=float) - centre) / width) ** 2)

    def slip_at(self, s):
        """Offset (mm, posterior positive) of the centreline along the arc's normal at arc length ``s``: minus the
        slip above the slipped disc (the spine there lies forward), 0 below it, linear across the disc's height;
        0 everywhere without a spondylolisthesis."""
        k, mm = self.slip
        s = np.asarray(s, dtype=float)
        if k < 0 or mm == 0:
            return np.zeros_like(s)
        bottom, height = self.disc_s[k] + self.disc_half[k], 2.0 * self.disc_half[k]
        return -mm * np.clip((bottom - s) / height, 0.0, 1.0)

    def point(self, s: float, u: float = 0.0, dx: float = 0.0) -> np.ndarray:
        """Patient-mm point (3,) of spine coordinates ``(s, u, dx)``."""
        d = _rotate(self.apex_dir, (float(s) - self.s_apex) / self.radius)
        if self.slip[0] >= 0:
            u = float(u) + float(self.slip_at(s))
        yz = self.centre + (self.radius - float(u)) * d
        x = self.x_mid + float(dx)
        if self.scoliosis[0] != 0:
            x += float(self.lateral_at(s))
        return np.array([x, yz[0], yz[1]])

    def drawn(self) -> dict[str, np.ndarray]:
        """Per-body and per-disc arrays of everything drawn: the thoracic bodies above T10, then ``BODY_NAMES``.

        Keys as the fields (``body_s``, ``body_half``, ``body_depth``, ``body_half_width``, ``body_marrow``,
        ``body_degenerate``, ``canal_width``, ``disc_s``, ``disc_half``, ``disc_bulge``, ``disc_degenerate``)
        and ``extra`` (number of thoracic bodies drawn above T10). Without them, the fields themselves.
        """
        n = self.thoracic.shape[1]
        out = dict(extra=n)
        body = dict(body_s=0, body_half=1, body_depth=2, body_half_width=3)
        for key, row in body.items():
            out[key] = np.concatenate([self.thoracic[row], getattr(self, key)])
        out["body_marrow"] = np.concatenate([np.full(n, self.body_marrow[0]), self.body_marrow])
        out["body_degenerate"] = np.concatenate([np.zeros(n, bool), self.body_degenerate])
        out["canal_width"] = np.concatenate([np.full(n, self.canal_width[0]), self.canal_width])
        out["disc_s"] = np.concatenate([self.thoracic_disc[0], self.disc_s])
        out["disc_half"] = np.concatenate([self.thoracic_disc[1], self.disc_half])
        out["disc_bulge"] = np.concatenate([np.zeros(n), self.disc_bulge])
        out["disc_degenerate"] = np.concatenate([np.zeros(n, bool), self.disc_degenerate])
        out["disc_node"] = np.concatenate([np.zeros((3, n)), self.disc_node], axis=1)
        out["disc_spur"] = np.concatenate([np.zeros(n), self.disc_spur])
        return out

    def coords(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Spine coordinates ``(s, u, dx)`` of patient-mm points (arrays of one shape)."""
        vy = y - self.centre[0]
        vz = z - self.centre[1]
        ay, az = self.apex_dir
        u = self.radius - np.hypot(vy, vz)
        s = self.s_apex + self.radius * np.arctan2(ay * vz - az * vy, ay * vy + az * vz)
        if self.slip[0] >= 0:
            u = u - self.slip_at(s)
        if self.scoliosis[0] != 0:
            return s, u, x - self.x_mid - self.lateral_at(s)
        return s, u, x - self.x_mid

    # ---- smooth profiles along s
    def depth_at(self, s):
        """Vertebral AP depth (mm) interpolated along s (over the drawn bodies)."""
        d = self.drawn()
        return np.interp(s, d["body_s"], d["body_depth"])

    def canal_width_at(self, s):
        """Normal (unnarrowed) canal AP width (mm) along s."""
        d = self.drawn()
        return np.interp(s, d["body_s"], d["canal_width"])

    def narrowing_at(self, s):
        """Canal narrowing fraction along s: flat over each disc, tapering over 4 mm (scaled) above/below."""
        s = np.asarray(s, dtype=float)
        out = np.zeros_like(s)
        taper = 4.0 * self.scale
        for c, h, n in zip(self.disc_s, self.disc_half, self.disc_narrowing):
            if n > 0:
                out = np.maximum(out, n * smoothstep((h + taper - np.abs(s - c)) / taper))
        return out

    def canal_range(self, s: float) -> tuple[float, float, float, float]:
        """Canal u-limits at ``s`` on the midline: normal (anterior, posterior) and residual CSF (lo, hi)."""
        ant = 0.5 * float(self.depth_at(s)) + self.canal_gap
        w = float(self.canal_width_at(s))
        n = float(self.narrowing_at(s))
        return ant, ant + w, ant + 0.55 * n * w, ant + w - 0.45 * n * w

    # ---- keypoints (patient mm, on the mid-sagittal plane)
    def body_centre(self, name: str) -> np.ndarray:
        """Centre of a vertebral body (e.g. "L3")."""
        k = BODY_NAMES.index(name)
        return self.point(self.body_s[k], 0.0)

    def disc_centre(self, name: str) -> np.ndarray:
        """Centre of a disc (e.g. "L4-L5")."""
        k = DISC_NAMES.index(name)
        return self.point(self.disc_s[k], 0.0)

    def canal_point(self, name: str) -> np.ndarray:
        """Spinal-canal keypoint of a disc level: in the CSF just posterior to the disc at its vertical centre."""
        k = DISC_NAMES.index(name)
        _, _, lo, hi = self.canal_range(self.disc_s[k])
        return self.point(self.disc_s[k], lo + min(4.0 * self.scale, 0.5 * (hi - lo)))

    def keypoints(self) -> dict[str, dict[str, np.ndarray]]:
        """Ground truth in patient mm: ``{"disc": {T12-L1..}, "vertebra": {L1..}, "canal": {L1/L2..}}``."""
        return {
            "disc": {n: self.disc_centre(n) for n in TIANCHI_DISC_LEVELS},
            "vertebra": {n: self.body_centre(n) for n in TIANCHI_VERTEBRA_LEVELS},
            "canal": {lv: self.canal_point(lv.replace("/", "-")) for lv in RSNA_LEVELS},
        }

    def labels(self) -> dict[str, dict[str, str]]:
        """Class names per level: ``{"stenosis": {L1/L2: "Normal/Mild"..}, "disc": {..}, "vertebra": {..}}``."""
        tianchi = ("Normal", "Degenerative")
        return {
            "stenosis": {lv: RSNA_SEVERITIES[c] for lv, c in zip(RSNA_LEVELS, self.stenosis)},
            "disc": {lv: tianchi[c] for lv, c in zip(TIANCHI_DISC_LEVELS, self.disc_labels)},
            "vertebra": {lv: tianchi[c] for lv, c in zip(TIANCHI_VERTEBRA_LEVELS, self.vertebra_labels)},
        }

    # ---- lateral structures (foramina, lateral recesses): spine coordinates, no random draws
    def tangent(self, s: float) -> np.ndarray:
        """Unit vector (3,) along the centreline at ``s``, pointing to the head (the disc-plane normal at a disc)."""
        d = _rotate(self.apex_dir, (float(s) - self.s_apex) / self.radius)
        return np.array([0.0, d[1], -d[0]])  # d/ds of point() is (-d[1], d[0]): towards the feet

    def foramen(self, disc: int) -> tuple[float, float, float, float, float]:
        """Foramen below body ``disc`` (``DISC_NAMES`` index): centre ``(s, u)``, half extents ``(a_s, b_u)``, ``|dx|``.

        The foramen spans the gap between the pedicles of the two bodies (see the renderer's pedicle boxes),
        antero-posteriorly the canal's extent, laterally just outside the dural sac.
        """
        c, h = self.body_s[disc], self.body_half[disc]
        c2, h2 = self.body_s[disc + 1], self.body_half[disc + 1]
        lo = c + 0.1 * h
        hi = c2 - (0.6 if BODY_NAMES[disc + 1] == "S1" else 0.8) * h2
        s = 0.5 * (lo + hi)
        ant = 0.5 * float(self.depth_at(s))
        b = 0.5 * (self.canal_gap + float(self.canal_width_at(s)))
        return float(s), ant + b, 0.5 * (hi - lo), b, self.canal_half_width + 4.0 * self.scale

    def foramen_point(self, level: str, side: str) -> np.ndarray:
        """Patient-mm centre (3,) of the neural foramen of an RSNA ``level`` ("L4/L5") on ``side`` ("left"|"right")."""
        s, u, _, _, lat = self.foramen(DISC_NAMES.index(level.replace("/", "-")))
        return self.point(s, u, lat if side == "left" else -lat)

    def recess(self, disc: int) -> tuple[float, float, float]:
        """Lateral recess at disc ``disc`` (``DISC_NAMES`` index): ``(s, u, |dx|)`` of the label point in the CSF."""
        s = float(self.disc_s[disc])
        ant = 0.5 * float(self.depth_at(s)) + self.canal_gap
        return s, ant + 0.62 * float(self.canal_width_at(s)), 0.7 * self.canal_half_width

    def recess_point(self, level: str, side: str) -> np.ndarray:
        """Patient-mm point (3,) in the lateral recess of an RSNA ``level`` on ``side`` at the disc's centre plane."""
        s, u, lat = self.recess(DISC_NAMES.index(level.replace("/", "-")))
        return self.point(s, u, lat if side == "left" else -lat)


def _layout(body_h: np.ndarray, disc_h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``s`` (mm) of the bodies and discs stacked from the top of T10 at ``s = 0``."""
    nb, nd = len(body_h), len(disc_h)
    body_s = np.empty(nb)
    disc_s = np.empty(nd)
    top = 0.0
    for k in range(nb):
        body_s[k] = top + 0.5 * body_h[k]
        top += body_h[k]
        if k < nd:
            disc_s[k] = top + 0.5 * disc_h[k]
            top += disc_h[k]
    return body_s, disc_s


def _transitional(lumbar: int, body_h, disc_h, depth, half_width) -> None:
    """Transitional anatomy in place (see ``profiles.AnatomyProfile``): 6 lumbar-type vertebrae make T12 and
    the disc above it lumbar-sized (as L1 and T12-L1), 4 make L1 and the disc above it thoracic-sized (as T11
    and T11-T12). Level names stay counted from the sacrum."""
    t11, t12, l1 = (BODY_NAMES.index(n) for n in ("T11", "T12", "L1"))
    if lumbar == 6:
        for arr in (body_h, depth, half_width):
            arr[t12] = 0.98 * arr[l1]
        disc_h[t12 - 1] = disc_h[t12]  # T11-T12 as T12-L1
    elif lumbar == 4:
        for arr in (body_h, depth, half_width):
            arr[l1] = arr[t11]
        disc_h[t12] = disc_h[t11]  # T12-L1 as T11-T12


def _thoracic(top: float, sc: float, f: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Thoracic bodies T7..T9 stacked above ``top`` (T10's cranial endplate, mm): (4, 3) and (2, 3) arrays of
    :class:`Spine` ``thoracic`` / ``thoracic_disc``; ``f`` six height factors (bodies, then discs)."""
    hb = _THORACIC_HEIGHT * sc * np.asarray(f[:3])
    hd = _THORACIC_DISC * sc * np.asarray(f[3:])
    bs, ds = np.empty(3), np.empty(3)
    for k in (2, 1, 0):
        ds[k] = top - 0.5 * hd[k]
        top -= hd[k]
        bs[k] = top - 0.5 * hb[k]
        top -= hb[k]
    return np.stack([bs, 0.5 * hb, _THORACIC_DEPTH * sc, _THORACIC_HALF_WIDTH * sc]), np.stack([ds, 0.5 * hd])


def _degeneration(rng: np.random.Generator, freqs: Mapping[str, Sequence[float]]) -> dict:
    """Labels and their geometry: class indices, degenerative discs / bodies, canal narrowing per disc."""
    nb, nd = len(BODY_NAMES), len(DISC_NAMES)
    stenosis = rng.choice(3, size=len(RSNA_LEVELS), p=freqs["stenosis"])
    disc_deg_lab = rng.choice(2, size=len(TIANCHI_DISC_LEVELS), p=freqs["disc"])
    vert_deg_lab = rng.choice(2, size=len(TIANCHI_VERTEBRA_LEVELS), p=freqs["vertebra"])
    disc_deg = np.zeros(nd, bool)
    for lv, c in zip(TIANCHI_DISC_LEVELS, disc_deg_lab):
        disc_deg[DISC_NAMES.index(lv)] = bool(c)
    body_deg = np.zeros(nb, bool)
    for lv, c in zip(TIANCHI_VERTEBRA_LEVELS, vert_deg_lab):
        body_deg[BODY_NAMES.index(lv)] = bool(c)
    narrowing = np.zeros(nd)
    for lv, c in zip(_STENOSIS_DISCS, stenosis):
        lo, hi = STENOSIS_RESIDUAL[c]
        narrowing[DISC_NAMES.index(lv)] = 1.0 - rng.uniform(lo, hi)
    return dict(
        stenosis=stenosis,
        disc_lab=disc_deg_lab,
        vert_lab=vert_deg_lab,
        disc_deg=disc_deg,
        body_deg=body_deg,
        narrowing=narrowing,
    )


def sample_spine(
    rng: np.random.Generator, freqs: Mapping[str, Sequence[float]], anatomy: Mapping | None = None
) -> Spine:
    """Draw a random spine: size, curvature, tilt, position and per-level degeneration.

    ``freqs`` as returned by :func:`check_class_frequencies`. Labels are drawn independently per level.
    ``anatomy``: the realistic profile's draws (``profiles.sample_anatomy``: transitional anatomy, collapsed
    discs, lordosis, scoliosis, thoracic bodies above T10, spondylolisthesis, habitus), applied on top of the
    same random draws, so the labels never depend on it; None gives the original spine.
    """
    sc = rng.uniform(0.85, 1.15)
    nb, nd = len(BODY_NAMES), len(DISC_NAMES)
    lab = _degeneration(rng, freqs)
    disc_deg = lab["disc_deg"]
    body_h = _BODY_HEIGHT * sc * rng.uniform(0.94, 1.06, nb)
    base_h = _DISC_HEIGHT * sc * rng.uniform(0.9, 1.1, nd)
    deg_f = rng.uniform(0.55, 0.75, nd)
    bulge = np.where(disc_deg, rng.uniform(2.0, 4.0, nd), rng.uniform(0.0, 0.6, nd)) * sc
    bulge[-2:] = 0.0  # rudimentary sacral discs
    if anatomy is not None:  # heights now (they set the layout); depth and width once drawn, below
        _transitional(anatomy["lumbar"], body_h, base_h, np.ones(nb), np.ones(nb))
    disc_h = np.where(disc_deg, base_h * deg_f, base_h)
    if anatomy is not None:
        collapse = np.asarray(anatomy["collapse"], float)
        disc_h = np.where(disc_deg & (collapse > 0), base_h * collapse, disc_h)
    body_s, disc_s = _layout(body_h, disc_h)

    # lordosis: the arc from the T12-L1 disc to the S1 centre turns by 25-50 degrees; the most anterior
    # point (apex) is near L2-L3 so the thoracolumbar part stays near vertical and L5-S1 angles back
    i_t12l1, i_s1 = DISC_NAMES.index("T12-L1"), BODY_NAMES.index("S1")
    lordosis = np.deg2rad(rng.uniform(25.0, 50.0))
    if anatomy is not None:
        lordosis = np.deg2rad(anatomy["lordosis"])
    radius = (body_s[i_s1] - disc_s[i_t12l1]) / lordosis
    s_apex = disc_s[DISC_NAMES.index("L2-L3")] + rng.uniform(-12.0, 12.0) * sc
    tilt = np.deg2rad(rng.uniform(-6.0, 6.0))
    apex_dir = np.array([-np.cos(tilt), -np.sin(tilt)])  # anterior (-y), tilted
    # put the middle of the lumbar spine near a random table position
    s_mid = 0.5 * (disc_s[i_t12l1] + disc_s[DISC_NAMES.index("L5-S1")])
    a = (s_mid - s_apex) / radius
    d_mid = _rotate(apex_dir, a)
    mid_yz = np.array([rng.uniform(-30.0, 30.0), rng.uniform(-60.0, 60.0)])
    centre = mid_yz - radius * d_mid

    canal = rng.uniform(12.6, 15.0)  # normal canal AP width ~12-16 mm at the lumbar levels (not scaled)
    tags = tuple(str(rng.choice(_DEGENERATIVE_DISC_TAGS)) if c else "v1" for c in lab["disc_lab"])
    x_mid = float(rng.uniform(-15.0, 15.0))
    depth = _BODY_DEPTH * sc * rng.uniform(0.95, 1.05, nb)
    half_width = _BODY_HALF_WIDTH * sc
    extra = {}
    if anatomy is not None:
        depth, half_width = depth.copy(), half_width.copy()
        _transitional(anatomy["lumbar"], np.ones(nb), np.ones(nd), depth, half_width)
        extra = _realistic_fields(anatomy, body_s[0] - 0.5 * body_h[0], sc, disc_s)
        extra.update(_endplate_changes(anatomy, tags, disc_deg, depth, sc))
        extra.update(slip=_slip(anatomy, depth), habitus=tuple(float(v) for v in anatomy["habitus"]))
    return Spine(
        scale=float(sc),
        x_mid=x_mid,
        centre=centre,
        radius=float(radius),
        apex_dir=apex_dir,
        s_apex=float(s_apex),
        body_s=body_s,
        body_half=0.5 * body_h,
        body_depth=depth,
        body_half_width=half_width,
        body_marrow=rng.uniform(0.9, 1.1, nb),
        body_degenerate=lab["body_deg"],
        disc_s=disc_s,
        disc_half=0.5 * disc_h,
        disc_bulge=bulge,
        disc_degenerate=disc_deg,
        disc_narrowing=lab["narrowing"],
        canal_width=canal * _CANAL_REL * rng.uniform(0.98, 1.02, nb),
        canal_half_width=float(rng.uniform(10.0, 12.0) * sc),
        canal_gap=float(rng.uniform(1.2, 2.0) * sc),
        conus_s=float(body_s[BODY_NAMES.index("L1")] + rng.uniform(-15.0, 15.0) * sc),
        stenosis=tuple(int(c) for c in lab["stenosis"]),
        disc_labels=tuple(int(c) for c in lab["disc_lab"]),
        vertebra_labels=tuple(int(c) for c in lab["vert_lab"]),
        disc_tags=tags,
        **extra,
    )


def _endplate_changes(anatomy: Mapping, tags: Sequence[str], disc_deg: np.ndarray, depth: np.ndarray, sc) -> dict:
    """:class:`Spine` ``disc_node`` (Schmorl's nodes where the Tianchi tag has v5) and ``disc_spur`` (osteophytes
    at degenerative discs) from the anatomy draws."""
    nd = len(DISC_NAMES)
    node = np.zeros((3, nd))
    for lv, tag in zip(TIANCHI_DISC_LEVELS, tags):
        k = DISC_NAMES.index(lv)
        if "v5" in tag.split(","):
            r, side, u = anatomy["schmorl"][k]
            node[:, k] = (r * sc, side, u * 0.5 * depth[k])
    spur = np.where(disc_deg, np.asarray(anatomy["spur"], float) * sc, 0.0)
    return dict(disc_node=node, disc_spur=spur)


def _slip(anatomy: Mapping, depth: np.ndarray) -> tuple[int, float]:
    """:class:`Spine` ``slip`` from the anatomy draws: (disc index, forward slip mm = fraction x the AP depth of the
    body below the disc), or (-1, 0) without a spondylolisthesis."""
    name, frac = anatomy["listhesis"]
    if not name:
        return -1, 0.0
    k = DISC_NAMES.index(name)
    return k, float(frac * depth[k + 1])


def _realistic_fields(anatomy: Mapping, top: float, sc: float, disc_s: np.ndarray) -> dict:
    """:class:`Spine` fields of the realistic anatomy: lumbar count, scoliosis, thoracic bodies above ``top``."""
    amp, where, width = anatomy["scoliosis"]
    a, b = disc_s[DISC_NAMES.index("T12-L1")], disc_s[DISC_NAMES.index("L5-S1")]
    thoracic, thoracic_disc = _thoracic(top, sc, anatomy["thoracic"])
    return dict(
        lumbar=int(anatomy["lumbar"]),
        scoliosis=(float(amp), float(a + where * (b - a)), float(width * sc)),
        thoracic=thoracic,
        thoracic_disc=thoracic_disc,
    )


@dataclass(frozen=True, eq=False)
class Lateral:
    """Neural foraminal narrowing and subarticular stenosis of one phantom spine, per side and RSNA level.

    Grades are class indices (``RSNA_SEVERITIES``), ``[side][level]`` with sides ``SIDES`` and levels
    ``RSNA_LEVELS``. ``foramen_residual`` scales the foraminal fat ellipse (1 = normal) seen on the axial T2;
    the sagittal T1 shows the outlined foramen (:func:`foramen_outline`) with ``foramen_narrowing`` of it
    filled by intermediate tissue (:func:`foramen_fat_band`), the share ``foramen_front`` from the front;
    ``recess_narrowing`` is the radius of the posterolateral bulge into the recess / canal half-width.
    """

    foraminal: tuple[tuple[int, ...], tuple[int, ...]]
    subarticular: tuple[tuple[int, ...], tuple[int, ...]]
    foramen_residual: np.ndarray  # (2, 5)
    recess_narrowing: np.ndarray  # (2, 5)
    foramen_narrowing: np.ndarray  # (2, 5)
    foramen_front: np.ndarray  # (2, 5)

    def labels(self) -> dict[str, dict[str, dict[str, str]]]:
        """``{"foraminal"|"subarticular": {"left"|"right": {"L1/L2": "Normal/Mild", ..}}}``."""
        out = {}
        for name, grades in (("foraminal", self.foraminal), ("subarticular", self.subarticular)):
            out[name] = {
                side: {lv: RSNA_SEVERITIES[c] for lv, c in zip(RSNA_LEVELS, g)} for side, g in zip(SIDES, grades)
            }
        return out


def sample_lateral(rng: np.random.Generator, freqs: Mapping[str, Sequence[float]]) -> Lateral:
    """Draw the lateral conditions: grades independent per side and level with ``freqs["foraminal"|"subarticular"]``."""
    shape = (len(SIDES), len(RSNA_LEVELS))
    fora = rng.choice(3, size=shape, p=freqs["foraminal"])
    sub = rng.choice(3, size=shape, p=freqs["subarticular"])
    lo, hi = np.array(FORAMEN_RESIDUAL).T
    residual = rng.uniform(lo[fora], hi[fora])
    lo, hi = np.array(RECESS_NARROWING).T
    narrowing = rng.uniform(lo[sub], hi[sub])
    front = rng.uniform(0.3, 0.7, size=shape)  # drawn last: the draws above (and the axial T2) stay as they were
    return Lateral(
        foraminal=tuple(tuple(int(c) for c in row) for row in fora),
        subarticular=tuple(tuple(int(c) for c in row) for row in sub),
        foramen_residual=residual,
        recess_narrowing=narrowing,
        foramen_narrowing=foramen_narrowing_of(fora, residual),
        foramen_front=front,
    )


def foramen_narrowing_of(grades: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Sagittal T1 narrowing (:data:`FORAMEN_NARROWING`) of foramina of ``grades`` with their axial ``residual``.

    The residual's place in its grade's :data:`FORAMEN_RESIDUAL` range gives the narrowing's place (reversed) in
    the grade's narrowing range, so both views order the foramina of one grade alike. Arrays of one shape.
    """
    lo, hi = np.array(FORAMEN_RESIDUAL).T
    place = (residual - lo[grades]) / (hi[grades] - lo[grades])
    n_lo, n_hi = np.array(FORAMEN_NARROWING).T
    return n_hi[grades] - place * (n_hi[grades] - n_lo[grades])
