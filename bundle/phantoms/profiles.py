"""Phantom profiles: "easy" (the original look and anatomy) and "realistic" (domain-randomised, after SynthSeg).

The realistic profile is one :class:`AppearanceProfile` (per series) and one :class:`AnatomyProfile` (per
study) of documented ranges and rates. :func:`sample_appearance` draws the per-series parameters from a
generator seeded by ``(seed, study index, 21, series position)``, :func:`sample_anatomy` the per-study anatomy
from ``(seed, study index, 22)``: streams of their own, so the grades and the "easy" studies never depend
on the profile (the realistic keypoints do: they follow its anatomy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "ANATOMY",
    "PROFILES",
    "REALISTIC",
    "AnatomyProfile",
    "AppearanceProfile",
    "check_profile",
    "sample_anatomy",
    "sample_appearance",
]

PROFILES = ("easy", "realistic")
_APPEARANCE_STREAM = 21  # random stream of the appearance draws, next to the study's streams in study.py
_ANATOMY_STREAM = 22  # random stream of the anatomy draws


@dataclass(frozen=True)
class AppearanceProfile:
    """Ranges ``(low, high)`` of the per-series appearance draws (uniform unless said otherwise).

    Intensities are relative signals (see ``render.CONTRASTS``); lengths in mm.
    """

    tissue_factor: tuple[float, float] = (0.6, 1.6)  # per-tissue multiplier of the weighting's signal (log-uniform)
    gamma: tuple[float, float] = (0.6, 1.6)  # contrast exponent on all tissue signals
    nucleus: tuple[float, float] = (0.35, 1.1)  # healthy nucleus signal on T2 (bright .. dehydrated-looking)
    cord: tuple[float, float] = (0.2, 0.7)  # cord signal on T2 (CSF is 1): variable CSF-to-cord contrast
    stir_rate: float = 0.3  # probability that a T2 series is STIR-like (fat and marrow suppressed)
    stir_fat: tuple[float, float] = (0.08, 0.3)  # fat signal of a STIR-like series
    marrow_spots: tuple[float, float] = (0.0, 0.6)  # contrast of fatty foci / haemangioma-like spots in marrow
    marrow_spot_mm: tuple[float, float] = (1.5, 5.0)  # size of those spots
    texture: tuple[float, float] = (0.05, 0.3)  # amplitude of soft-tissue texture (striation, fat septa)
    snr: tuple[float, float] = (5.0, 40.0)  # nucleus-or-disc signal over the Rician noise sigma
    bias: tuple[float, float] = (0.2, 0.8)  # amplitude of the log bias-field coefficients
    pixel_spacing: tuple[float, float] = (0.3, 1.2)  # in-plane spacing (bounded below by FOV / max_size)
    slice_thickness: tuple[float, float] = (3.0, 6.0)  # partial volume: two sub-slices across it
    blur_mm: tuple[float, float] = (0.0, 1.5)  # anisotropic blur sigma, drawn per image axis
    ghost_rate: float = 0.08  # motion ghosts along the phase (column) direction
    ghost_amp: tuple[float, float] = (0.05, 0.25)
    wrap_rate: float = 0.05  # wrap-around of a band of the image along the phase direction
    bits12_rate: float = 0.4  # 12-bit stored values (BitsStored 12) instead of 16
    missing_slice_rate: float = 0.03  # per series: one slice not on disk (a gap in the positions)
    duplicate_slice_rate: float = 0.03  # per series: one slice on disk twice (a second instance, same place)


REALISTIC = AppearanceProfile()


@dataclass(frozen=True)
class AnatomyProfile:
    """Rates and ranges ``(low, high)`` of the per-study anatomy draws of the realistic profile (uniform).

    Field of view: the top edge of the sagittal series lies at the cranial endplate of one of ``fov_tops``
    (T8..T11: the lower thoracic spine and its discs are drawn, and never labelled) or, for "cut", inside
    T12 at ``fov_cut`` of its height above its caudal endplate (cut just above L1; the T12-L1 disc stays in
    view). Labelled discs are those of the data set (RSNA L1/L2..L5/S1; Tianchi T12-L1..L5-S1 and L1..L5).

    Transitional anatomy (``lstv_rate``, half of it each way): level names are counted from the sacrum, as
    RSNA readers label, so the labels stay on the five lowest mobile discs L1/L2..L5/S1 and only the look
    changes: with 6 lumbar-type vertebrae the unlabelled vertebra above L1 (T12) is lumbar-sized with a
    lumbar-height disc above it; with 4, the vertebra labelled L1 is thoracic-sized with a thoracic disc
    above it (T12-L1).

    Spondylolisthesis (``listhesis_rate`` of studies): the body above the slipped disc, and the whole spine
    above it with its canal and posterior elements, is shifted forward over the body below by ``listhesis``
    of that body's depth (Meyerding grade I); the disc between them is sheared, so its centre (the label)
    lies halfway between the displaced endplates. Grades do not change (the canal keeps its graded width).

    Lengths in mm at spine scale 1, angles in degrees.
    """

    fov_tops: tuple[str, ...] = ("T8", "T9", "T10", "T11", "cut")
    fov_top_p: tuple[float, ...] = (0.15, 0.2, 0.25, 0.25, 0.15)
    fov_cut: tuple[float, float] = (0.15, 0.6)  # fraction of T12's height above its caudal endplate
    lstv_rate: float = 0.06  # lumbosacral transitional anatomy: 4 or 6 lumbar-type vertebrae (equally likely)
    lordosis: tuple[float, float] = (10.0, 65.0)  # turn of the arc T12-L1 .. S1 (easy: 25..50)
    scoliosis_rate: float = 0.35  # a lateral (coronal) curve of the centreline
    scoliosis_mm: tuple[float, float] = (4.0, 20.0)  # its lateral deviation at the apex (sign random)
    scoliosis_width: tuple[float, float] = (40.0, 90.0)  # its Gaussian half-width along the spine
    collapse_rate: float = 0.3  # per degenerative disc: collapsed to a fraction of its normal height
    collapse: tuple[float, float] = (0.2, 0.4)  # that fraction (other degenerative discs: 0.55..0.75)
    thoracic_height: tuple[float, float] = (0.94, 1.06)  # jitter of the drawn T7..T9 bodies and discs
    schmorl_mm: tuple[float, float] = (1.5, 4.0)  # radius of the Schmorl's node of every disc tagged v5
    schmorl_u: tuple[float, float] = (-0.5, 0.5)  # its AP position, fraction of the body's half depth
    spur_rate: float = 0.5  # per degenerative disc: anterior osteophytes on both adjacent endplates
    spur_mm: tuple[float, float] = (2.0, 6.0)  # their anterior reach
    listhesis_rate: float = 0.05  # per study: spondylolisthesis (anterolisthesis) at one disc level
    listhesis_levels: tuple[str, ...] = ("L3-L4", "L4-L5", "L5-S1")  # the slipped level (body above it slips)
    listhesis_level_p: tuple[float, ...] = (0.1, 0.6, 0.3)
    listhesis: tuple[float, float] = (0.08, 0.25)  # forward slip, fraction of the caudal body's AP depth
    # patient size beyond the spine's own scale (0.85..1.15 in both profiles): body habitus, thin to obese
    back_muscle_mm: tuple[float, float] = (40.0, 60.0)  # paraspinal muscle behind the canal (easy: 45)
    fat_mm: tuple[float, float] = (5.0, 60.0)  # posterior subcutaneous fat (easy: 22)
    abdomen_mm: tuple[float, float] = (120.0, 300.0)  # vertebral front to the anterior abdominal wall (easy: 230)


ANATOMY = AnatomyProfile()


def check_profile(profile: str) -> str:
    """Return ``profile`` if it is one of ``PROFILES``, else raise ValueError naming them."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return profile


def _u(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(*r))


def sample_anatomy(profile: str, seed: int, index: int) -> dict | None:
    """Anatomy draws of study ``(seed, index)``; None for "easy" (the original anatomy).

    Keys: ``fov_top`` (one of ``ANATOMY.fov_tops``), ``fov_cut`` (fraction, used when "cut"), ``lumbar``
    (5, or 4 / 6 lumbar-type vertebrae), ``lordosis`` (degrees), ``scoliosis`` (deviation mm, 0 = none;
    centre as a fraction 0..1 of T12-L1 .. L5-S1; half-width mm), ``collapse`` (per disc of
    ``anatomy.DISC_NAMES``: height fraction, 0 = not collapsed; applies to degenerative discs only),
    ``thoracic`` (3 body and 3 disc height factors of T7..T9 and T7-T8..T9-T10, cranial first),
    ``schmorl`` (per disc: node radius mm, endplate side -1 cranial / +1 caudal, AP position fraction;
    drawn for every disc, shown only where the disc's Tianchi tag has v5), ``spur`` (per disc: osteophyte
    reach mm, 0 = none; shown only at degenerative discs), ``listhesis`` (slipped disc name of
    ``ANATOMY.listhesis_levels``, "" = none; forward slip as a fraction of the caudal body's AP depth),
    ``habitus`` (back muscle, subcutaneous fat, abdomen depth in mm at spine scale 1).
    """
    if check_profile(profile) == "easy":
        return None
    from bundle.phantoms.anatomy import DISC_NAMES  # anatomy imports nothing from here

    p = ANATOMY
    rng = np.random.default_rng([seed, index, _ANATOMY_STREAM])
    draw = dict(fov_top=str(rng.choice(p.fov_tops, p=p.fov_top_p)), fov_cut=_u(rng, p.fov_cut))
    u = rng.random(2)
    draw.update(lumbar=5 if u[0] >= p.lstv_rate else 4 if u[1] < 0.5 else 6, lordosis=_u(rng, p.lordosis))
    amp = _u(rng, p.scoliosis_mm) * (1 if rng.random() < 0.5 else -1)
    draw.update(
        scoliosis=(amp if rng.random() < p.scoliosis_rate else 0.0, float(rng.random()), _u(rng, p.scoliosis_width))
    )
    col = rng.uniform(*p.collapse, len(DISC_NAMES))
    draw.update(
        collapse=tuple(float(c) if r < p.collapse_rate else 0.0 for c, r in zip(col, rng.random(len(DISC_NAMES))))
    )
    draw.update(thoracic=tuple(float(v) for v in rng.uniform(*p.thoracic_height, 6)))
    nd = len(DISC_NAMES)
    r, side, u = (
        rng.uniform(*p.schmorl_mm, nd),
        np.where(rng.random(nd) < 0.5, -1.0, 1.0),
        rng.uniform(*p.schmorl_u, nd),
    )
    draw.update(schmorl=tuple((float(a), float(b), float(c)) for a, b, c in zip(r, side, u)))
    spur = rng.uniform(*p.spur_mm, nd)
    draw.update(spur=tuple(float(v) if w < p.spur_rate else 0.0 for v, w in zip(spur, rng.random(nd))))
    level, frac = str(rng.choice(p.listhesis_levels, p=p.listhesis_level_p)), _u(rng, p.listhesis)
    draw.update(listhesis=(level if rng.random() < p.listhesis_rate else "", frac))  # after: earlier draws stay
    draw.update(habitus=(_u(rng, p.back_muscle_mm), _u(rng, p.fat_mm), _u(rng, p.abdomen_mm)))
    return draw


def sample_appearance(profile: str, seed: int, index: int, j: int, contrast: str) -> dict | None:
    """Appearance draws of series ``j`` of study ``(seed, index)``; None for "easy" (the original look).

    Keys: ``factors`` (per tissue), ``gamma``, ``nucleus``, ``cord``, ``stir``, ``stir_fat``, ``spots``,
    ``spot_mm``, ``texture``, ``snr``, ``bias`` (5 coefficients), ``pixel_spacing``, ``slice_thickness``,
    ``blur_mm`` (row, col), ``ghost`` (amplitude, 0 = none), ``ghost_shift`` (fraction of the width),
    ``wrap`` (fraction of the width folded, 0 = none), ``bits`` (12 or 16), ``texture_seed``, ``slice_artefact``
    ("missing", "duplicate" or "" = none; sagittal and axial series) and ``slice_pick`` (0..1: which of the
    series' eligible slices, see ``study.phantom_study``).
    """
    if check_profile(profile) == "easy":
        return None
    from bundle.phantoms.render import CONTRASTS  # render imports nothing from here

    p = REALISTIC
    rng = np.random.default_rng([seed, index, _APPEARANCE_STREAM, j])
    lo, hi = np.log(p.tissue_factor)
    tissues = sorted(CONTRASTS[contrast])
    draw = dict(factors=dict(zip(tissues, np.exp(rng.uniform(lo, hi, len(tissues))).tolist())))
    draw.update(gamma=_u(rng, p.gamma), nucleus=_u(rng, p.nucleus), cord=_u(rng, p.cord))
    draw.update(stir=bool(contrast == "T2" and rng.random() < p.stir_rate), stir_fat=_u(rng, p.stir_fat))
    draw.update(spots=_u(rng, p.marrow_spots), spot_mm=_u(rng, p.marrow_spot_mm), texture=_u(rng, p.texture))
    draw.update(snr=_u(rng, p.snr), bias=(rng.uniform(-1, 1, 5) * _u(rng, p.bias)).tolist())
    draw.update(pixel_spacing=_u(rng, p.pixel_spacing), slice_thickness=_u(rng, p.slice_thickness))
    draw.update(blur_mm=tuple(float(v) for v in rng.uniform(*p.blur_mm, 2)))
    draw.update(ghost=_u(rng, p.ghost_amp) if rng.random() < p.ghost_rate else 0.0, ghost_shift=_u(rng, (0.1, 0.4)))
    draw.update(wrap=_u(rng, (0.05, 0.15)) if rng.random() < p.wrap_rate else 0.0)
    draw.update(bits=12 if rng.random() < p.bits12_rate else 16, texture_seed=int(rng.integers(0, 2**31)))
    u = rng.random(2)  # last: the draws above stay as they were before slice artefacts existed
    artefact = "missing" if u[0] < p.missing_slice_rate else ""
    artefact = "duplicate" if p.missing_slice_rate <= u[0] < p.missing_slice_rate + p.duplicate_slice_rate else artefact
    draw.update(slice_artefact=artefact, slice_pick=float(u[1]))
    return draw
