"""Phantom appearance profiles: "easy" (the original look) and "realistic" (domain-randomised, after SynthSeg).

A profile is one :class:`AppearanceProfile` of documented ranges. :func:`sample_appearance` draws the
per-series parameters from a generator seeded by ``(seed, study index, series position)`` on a stream of
its own, so the anatomy, labels and the "easy" images never depend on the profile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PROFILES", "REALISTIC", "AppearanceProfile", "check_profile", "sample_appearance"]

PROFILES = ("easy", "realistic")
_APPEARANCE_STREAM = 21  # random stream of the appearance draws, next to the study's streams in study.py


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


REALISTIC = AppearanceProfile()


def check_profile(profile: str) -> str:
    """Return ``profile`` if it is one of ``PROFILES``, else raise ValueError naming them."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    return profile


def _u(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(*r))


def sample_appearance(profile: str, seed: int, index: int, j: int, contrast: str) -> dict | None:
    """Appearance draws of series ``j`` of study ``(seed, index)``; None for "easy" (the original look).

    Keys: ``factors`` (per tissue), ``gamma``, ``nucleus``, ``cord``, ``stir``, ``stir_fat``, ``spots``,
    ``spot_mm``, ``texture``, ``snr``, ``bias`` (5 coefficients), ``pixel_spacing``, ``slice_thickness``,
    ``blur_mm`` (row, col), ``ghost`` (amplitude, 0 = none), ``ghost_shift`` (fraction of the width),
    ``wrap`` (fraction of the width folded, 0 = none), ``bits`` (12 or 16), ``texture_seed``.
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
    return draw
