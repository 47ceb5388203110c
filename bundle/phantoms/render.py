"""Slice rendering: evaluates the phantom anatomy analytically at each pixel's patient-mm position.

Every pixel is mapped to spine coordinates ``(s, u, dx)`` (see ``anatomy``); per-level parameters are
looked up in a table sampled along ``s`` (one gather per pixel instead of a loop over structures), and
tissue fractions with a ~1 pixel soft edge (partial volume) are composited. Then a smooth texture, a
multiplicative bias field, a random gain/contrast and Rician noise are applied. Fully vectorised with
numpy; the only Python loop is over slices.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from bundle.phantoms.anatomy import (
    BODY_NAMES,
    DISC_NAMES,
    FORAMEN_ROOT,
    RECESS_NARROWING,
    Lateral,
    Spine,
    foramen_fat_band,
    foramen_frame,
    foramen_narrowing_of,
    foramen_outline,
    smoothstep,
)
from bundle.phantoms.geometry import SeriesGeometry
from bundle.streams import RSNA_LEVELS

__all__ = ["CONTRASTS", "render_realistic", "render_series"]

# relative signal of each tissue: T2 (CSF bright, degenerated disc dark) and T1 (fat bright, CSF dark)
CONTRASTS: dict[str, dict[str, float]] = {
    "T2": dict(
        fat=0.68,
        muscle=0.2,
        abdomen=0.33,
        marrow=0.42,
        cortex=0.07,
        nucleus=0.9,
        annulus=0.3,
        degenerate=0.13,
        csf=1.0,
        cord=0.38,
        ligament=0.08,
        posterior=0.28,
        modic=0.8,
        vessel=0.04,
        foramen=0.6,
    ),
    "T1": dict(
        fat=0.95,
        muscle=0.3,
        abdomen=0.4,
        marrow=0.7,
        cortex=0.07,
        nucleus=0.38,
        annulus=0.32,
        degenerate=0.26,
        csf=0.14,
        cord=0.42,
        ligament=0.12,
        posterior=0.55,
        modic=0.3,
        vessel=0.06,
        foramen=0.9,
    ),
}
_CHUNK_PIXELS = 32768  # pixels rendered per block
_TABLE_STEP = 0.25  # mm between samples of the per-level parameter table along s
_D, _WB, _BS, _BH, _BDEG, _BMAR, _DS, _DH, _DBUL, _DDEG, _CW, _NAR, _PE, _PED, _CORD, _AORTA, _IVC, _XOFF = range(18)
_NODE_R, _NODE_SIDE, _NODE_U, _SPUR = range(18, 22)  # Schmorl's node and osteophytes of the nearest disc
# lateral table: nearest foramen (centre s, u, half extents a, b, fat ellipse scale left/right), recess bulge
# radius / canal half-width (left/right) at the nearest disc, then the nearest foramen's sagittal T1 narrowing and
# its front share (left/right)
_FS, _FU, _FA, _FB, _FL, _FR, _RL, _RR, _NL, _NR, _QL, _QR = range(12)
_OTHER_FORAMEN_RESIDUAL = 0.95  # foramina outside the five RSNA levels
_OTHER_FORAMEN_FRONT = 0.5
_FORAMEN_RIM = 1.5  # mm at scale 1: dark cortex around the outlined foramen on the sagittal T1
_WINDOW_MARGIN = 1.0  # mm added to the bounds of the structure windows in _slice
_MAX_RECESS = max(hi for _, hi in RECESS_NARROWING)  # largest recess bulge radius / canal half-width
_TAIL = 1e-6  # Gaussian operator weights below this are zero (products with float32 denormals are slow)


def _clip(a, lo, hi):
    """np.clip without its overhead (several times faster on float32 arrays in numpy 2.x)."""
    if lo is not None:
        a = np.maximum(a, lo)
    return a if hi is None else np.minimum(a, hi)


def _hypot(a, b):
    """sqrt(a^2 + b^2): np.hypot has no SIMD loop for float32 and is ~10x slower."""
    return np.sqrt(a * a + b * b)


def _box(s: np.ndarray, a: float, b: float, e: float) -> np.ndarray:
    """Smooth indicator of ``a <= s <= b`` with edges ``e`` mm wide."""
    return _clip((s - a) / e + 0.5, 0, 1) * _clip((b - s) / e + 0.5, 0, 1)


def _profile_table(sp: Spine) -> tuple[float, np.ndarray]:
    """Per-s parameters, shape (22, n) float32, sampled every ``_TABLE_STEP`` mm from ``s0`` (returned)."""
    s0 = -300.0
    s = np.arange(s0, sp.body_s[-1] + 300.0, _TABLE_STEP)
    d = sp.drawn()  # the thoracic bodies above T10 (realistic profile), then BODY_NAMES
    body_s, body_half, disc_s, disc_half = d["body_s"], d["body_half"], d["disc_s"], d["disc_half"]
    t = np.zeros((22, s.size))
    t[_D] = sp.depth_at(s)
    t[_WB] = np.interp(s, body_s, d["body_half_width"])
    kb = _clip(np.searchsorted(0.5 * (body_s[1:] + body_s[:-1]), s), 0, len(body_s) - 1)
    kd = _clip(np.searchsorted(0.5 * (disc_s[1:] + disc_s[:-1]), s), 0, len(disc_s) - 1)
    t[_BS], t[_BH], t[_BDEG], t[_BMAR] = body_s[kb], body_half[kb], d["body_degenerate"][kb], d["body_marrow"][kb]
    t[_DS], t[_DH], t[_DBUL], t[_DDEG] = disc_s[kd], disc_half[kd], d["disc_bulge"][kd], d["disc_degenerate"][kd]
    t[_CW] = sp.canal_width_at(s)
    t[_NAR] = sp.narrowing_at(s)
    i_s1 = d["extra"] + BODY_NAMES.index("S1")
    pe = np.zeros_like(s)
    ped = np.zeros_like(s)
    for k in range(i_s1):  # laminae / spinous process and pedicles of the mobile segments
        c, h, dh = body_s[k], body_half[k], disc_half[k]
        pe = np.maximum(pe, _box(s, c - 0.55 * h, c + h + 0.4 * dh, 2.0))
        ped = np.maximum(ped, _box(s, c - 0.8 * h, c + 0.1 * h, 2.0))
    sacrum = _box(s, body_s[i_s1] - 0.6 * body_half[i_s1], 1e6, 2.0)  # fused sacral elements
    t[_PE] = np.maximum(pe, sacrum)
    t[_PED] = np.maximum(ped, sacrum)
    t[_CORD] = 8.0 * sp.scale * _clip((sp.conus_s - s) / (20.0 * sp.scale), 0, 1)
    t[_AORTA] = _clip((sp.body_s[BODY_NAMES.index("L4")] - s) / 5.0, 0, 1)
    t[_IVC] = _clip((sp.body_s[BODY_NAMES.index("L5")] - s) / 5.0, 0, 1)
    t[_XOFF] = sp.lateral_at(s)
    t[_NODE_R], t[_NODE_SIDE], t[_NODE_U] = d["disc_node"][:, kd]
    t[_SPUR] = d["disc_spur"][kd]
    return s0, np.ascontiguousarray(t, dtype=np.float32)


def _lateral_table(sp: Spine, lateral: Lateral) -> np.ndarray:
    """Per-s lateral parameters, shape (12, n) float32, on the grid of :func:`_profile_table`."""
    s = np.arange(-300.0, sp.body_s[-1] + 300.0, _TABLE_STEP)
    n_fora = DISC_NAMES.index("L5-S1") + 1
    fora = np.array([sp.foramen(k)[:4] for k in range(n_fora)])
    rho = np.full((n_fora, 2), _OTHER_FORAMEN_RESIDUAL)
    t1 = np.empty((n_fora, 4))  # sagittal T1 narrowing and front share, left/right
    t1[:, :2] = foramen_narrowing_of(np.zeros((n_fora, 2), int), rho)
    t1[:, 2:] = _OTHER_FORAMEN_FRONT
    narrow = np.zeros((len(DISC_NAMES), 2))
    for j, level in enumerate(RSNA_LEVELS):
        k = DISC_NAMES.index(level.replace("/", "-"))
        rho[k] = lateral.foramen_residual[:, j]
        narrow[k] = lateral.recess_narrowing[:, j]
        t1[k] = np.concatenate([lateral.foramen_narrowing[:, j], lateral.foramen_front[:, j]])
    kf = np.clip(np.searchsorted(0.5 * (fora[1:, 0] + fora[:-1, 0]), s), 0, n_fora - 1)
    kd = np.clip(np.searchsorted(0.5 * (sp.disc_s[1:] + sp.disc_s[:-1]), s), 0, len(sp.disc_s) - 1)
    taper = 4.0 * sp.scale
    w = smoothstep((sp.disc_half[kd] + taper - np.abs(s - sp.disc_s[kd])) / taper)
    t = np.concatenate([fora[kf], rho[kf], narrow[kd] * w[:, None], t1[kf]], axis=1)
    return np.ascontiguousarray(t.T, dtype=np.float32)


def _rounded_box_sdf(da: np.ndarray, db: np.ndarray, ha, hb, r) -> np.ndarray:
    """Signed distance (negative inside) to a rounded rectangle; ``da, db`` absolute offsets from its centre."""
    qa = da - ha + r
    qb = db - hb + r
    return _hypot(np.maximum(qa, 0), np.maximum(qb, 0)) + np.minimum(np.maximum(qa, qb), 0) - r


def _window(cond: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding (rows, columns) slices of the True pixels of ``cond`` (H, W); None where there are none."""
    cols = np.flatnonzero(cond.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(cond.any(axis=1))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _slice(
    sp: Spine, s0: float, tab: np.ndarray, x, y, z, v: dict, edge: float, tex, ltab=None, keyhole: bool = False
) -> np.ndarray:
    """Noise-free signal of one slice; ``x, y, z`` (H, W) patient mm, ``tex`` (H, W) soft-tissue texture.

    ``tab`` (22, n) from :func:`_profile_table`; ``ltab`` (12, n) from :func:`_lateral_table` adds the graded
    foraminal fat loss and lateral recess bulges; with ``keyhole`` (the sagittal T1) the foramina are drawn as
    :func:`_outlined_foramina`, else as a residual fat ellipse. ``v["marrow"]`` may be an (H, W) array. The vessels, the
    posterior structures and the column are evaluated only on the bounding window of the pixels where their
    soft fractions can be non-zero (bounds in spine coordinates with a margin): outside it they would add
    exact zeros, so the result is the same bit for bit, several times cheaper.
    """
    f32 = np.float32
    inv = f32(1.0 / edge)

    def soft(d):  # inside-fraction of a signed distance (mm, negative inside)
        return _clip(0.5 - d * inv, 0, 1)

    # spine coordinates (as Spine.coords, with Python-float constants so arrays stay float32)
    (cy, cz), (ay, az), r = (float(c) for c in sp.centre), (float(c) for c in sp.apex_dir), sp.radius
    vy, vz = y - cy, z - cz
    u = r - _hypot(vy, vz)
    s = sp.s_apex + r * np.arctan2(ay * vz - az * vy, ay * vy + az * vz)
    u_body = u  # the body surface (skin) does not follow a spondylolisthesis
    if sp.slip[0] >= 0:
        u = u - _slip_offset(sp, s)
    idx = _clip(((s - s0) * (1.0 / _TABLE_STEP) + 0.5).astype(np.intp), 0, tab.shape[1] - 1)
    dx = x - sp.x_mid
    if sp.scoliosis[0] != 0:
        dx = dx - tab[_XOFF][idx]  # the centreline's lateral offset at this s
    depth, bulge = tab[_D][idx], tab[_DBUL][idx]  # the other table columns are gathered per window below
    hd = f32(0.5) * depth
    lat = np.abs(dx)
    sc = f32(sp.scale)
    post = hd + f32(sp.canal_gap) + tab[_CW][idx]  # posterior limit of the normal canal

    # background: abdomen anteriorly, paraspinal muscle, subcutaneous fat and air posteriorly
    curve = dx * dx * f32(1.0 / 300.0)  # the back and belly surfaces curve forward/back laterally (axial view)
    muscle, fat, abdomen = sp.habitus  # mm at scale 1 (45, 22, 230 unless the realistic profile drew them)
    u_fat = post + sc * f32(muscle) - curve
    u_skin = u_fat + sc * f32(fat)
    back = (v["muscle"] + (v["fat"] - v["muscle"]) * soft(u_fat - u_body)) * (1 - soft(u_skin - u_body))
    psoas = _hypot((lat - 35 * sc) * f32(1 / 15.0), (u + f32(0.25) * depth) / (f32(20.0) * sc)) - 1
    front = v["abdomen"] + (v["muscle"] - v["abdomen"]) * soft(psoas * f32(12.0))
    img = (front + (back - front) * soft(hd - u)) * tex
    img *= 1 - soft(u_body + hd + float(abdomen) * sc - curve)  # air beyond the anterior abdominal wall

    m = f32(0.5 * edge + _WINDOW_MARGIN)
    spur = bool(sp.disc_spur.any())  # osteophytes reach in front of the bodies (realistic profile)
    reach = f32(max(7.5, _MAX_RECESS * sp.canal_half_width))  # laminae / recess bulge in front of ``post``
    windows = (
        (_vessels, (u < m - hd - sc) & (u > -hd - 21 * sc - m) & (lat < 28 * sc + m)),
        (_posterior, (u > np.minimum(hd, post - reach) - m) & (u < post + 34 * sc + m) & (lat < 26 * sc + m)),
        (_column, _column_support(u, hd, lat, tab[_WB][idx], bulge, m + f32(sp.disc_spur.max()) if spur else m)),
    )
    for part, cond in windows:
        win = _window(cond)
        if win is None:
            continue
        marrow = v["marrow"][win] if np.ndim(v["marrow"]) == 2 else v["marrow"]
        px = dict(s=s[win], u=u[win], dx=dx[win], lat=lat[win], hd=hd[win], post=post[win], marrow=marrow, inv=inv)
        px["keyhole"] = keyhole and ltab is not None
        iw = idx[win]
        part(sp, tab[:, iw], None if ltab is None else ltab[:, iw], px, v, soft, img[win])
    return img


def _slip_offset(sp: Spine, s: np.ndarray) -> np.ndarray:
    """:meth:`Spine.slip_at` in float32 on pixel arc lengths ``s`` (H, W): the centreline's offset along the normal."""
    k, mm = sp.slip
    bottom, height = float(sp.disc_s[k] + sp.disc_half[k]), float(2.0 * sp.disc_half[k])
    return np.float32(-mm) * _clip((np.float32(bottom) - s) * np.float32(1.0 / height), 0, 1)


def _column_support(u, hd, lat, wb, bulge, m) -> np.ndarray:
    """Pixels (H, W) where the bodies or discs of :func:`_column` can be non-zero, with margin ``m`` (mm).

    Lateral to the discs (``lat >= wb + 1``) only a thin line at the posterior body margin ``u = hd`` remains.
    """
    f32 = np.float32
    inside = (lat < wb + 1 + m) & (u > -hd - f32(0.5) - m) & (u < hd + bulge + f32(0.5) + m)
    return inside | (np.abs(u - hd) < f32(0.5) + m)


def _vessels(sp: Spine, p, q, px: dict, v: dict, soft, img: np.ndarray) -> None:
    """Great vessels (flow voids) anterior to the bodies, in place on ``img``: aorta left (+x), IVC right."""
    f32, sc, u, hd, dx = np.float32, np.float32(sp.scale), px["u"], px["hd"], px["dx"]
    for pres, side, rad in ((p[_AORTA], 14.0, 10.0), (p[_IVC], -19.0, 9.0)):
        f = soft(_hypot(u + hd + f32(11.0) * sc, dx - f32(side) * sc) - f32(rad) * sc) * pres
        img += (v["vessel"] - img) * f


def _posterior(sp: Spine, p, q, px: dict, v: dict, soft, img: np.ndarray) -> None:
    """Foramina, posterior elements, lateral recesses and the dural sac (CSF, cord), in place on ``img``."""
    f32, sc, inv = np.float32, np.float32(sp.scale), px["inv"]
    s, u, dx, lat, hd, post = px["s"], px["u"], px["dx"], px["lat"], px["hd"], px["post"]
    # canal limits (normal sac) and residual CSF after stenosis
    w = p[_CW]
    ant = hd + f32(sp.canal_gap)
    cm = ant + f32(0.5) * w
    fc = np.sqrt(_clip(1 - (dx * f32(1.0 / sp.canal_half_width)) ** 2, 0, None))
    half_c = f32(0.5) * w * fc
    sac = soft(np.abs(u - cm) - half_c) * _clip(half_c * inv, 0, 1)
    lo = np.maximum(cm - half_c, ant + f32(0.55) * p[_NAR] * w)
    hi = np.minimum(cm + half_c, post - f32(0.45) * p[_NAR] * w)
    csf = np.minimum(soft(np.abs(u - f32(0.5) * (lo + hi)) - f32(0.5) * (hi - lo)), sac)
    csf *= _clip((hi - lo) * inv, 0, 1)
    cord = soft(np.maximum(np.abs(u - cm), lat) - f32(0.5) * p[_CORD]) * (p[_CORD] > 0)

    # pedicles and neural foramina (fat) lateral to the dural sac
    wc = f32(sp.canal_half_width)
    zone = soft(np.abs(lat - wc - 4 * sc) - 5 * sc)  # lateral extent of the pedicles and foramina
    region = zone * soft(np.maximum(hd - u, u - post))
    if px["keyhole"]:  # pedicles of marrow; the foramina are drawn over the posterior elements below
        img += (v["posterior"] + (px["marrow"] - v["posterior"]) * p[_PED] - img) * region
    else:
        occl = p[_PED] if q is None else np.maximum(p[_PED], 1 - _foramen_fat(q, s, u, dx > 0, soft))
        img += (v["foramen"] + (v["posterior"] - v["foramen"]) * occl - img) * region

    # posterior elements: spinous process at the midline, laminae, facets lateral to the sac
    front_pe = post + 0.5 - f32(8.0) * _clip((lat - wc) * f32(0.25), 0, 1)
    back_pe = post + sc * (f32(10.0) + f32(24.0) * soft(lat - 4 * sc))
    f_pe = p[_PE] * soft(np.maximum(front_pe - u, u - back_pe)) * soft(lat - 26 * sc)
    img += (v["posterior"] - img) * f_pe
    if px["keyhole"]:
        _outlined_foramina(q, (s, u, dx > 0), zone, f32(_FORAMEN_RIM) * sc, v, soft, img)

    if q is not None:  # facet / ligamentum bulge into each lateral recess
        rad = np.where(dx > 0, q[_RL], q[_RR]) * wc
        bulge = soft(_hypot(u - post, lat - wc) - rad) * _clip(rad * inv, 0, 1) * soft(lat - wc)  # inside the canal
        img += (v["ligament"] - img) * bulge
        csf *= 1 - bulge
    # dural sac: dark intruding tissue where stenosed, CSF (with cord above the conus) elsewhere
    img += (v["ligament"] - img) * sac
    img += (v["csf"] + (v["cord"] - v["csf"]) * cord - img) * csf


def _column(sp: Spine, p, q, px: dict, v: dict, soft, img: np.ndarray) -> None:
    """Vertebral bodies (cortex rim, Modic bands) and discs (bulge, nucleus), in place on ``img``."""
    f32, sc = np.float32, np.float32(sp.scale)
    s, u, dx, hd = px["s"], px["u"], px["dx"], px["hd"]
    # vertebral bodies: rounded boxes in (s, u), AP depth shrinking laterally
    fb = np.sqrt(_clip(1 - (dx / p[_WB]) ** 2, 0, None))
    hu = f32(0.5) * p[_D] * fb
    ds_b = np.abs(s - p[_BS])
    sdf = _rounded_box_sdf(ds_b, np.abs(u - (hd - hu)), p[_BH], hu, 2.5 * sc)
    f_body = soft(sdf)
    band = soft((p[_BH] - ds_b) - f32(5.0) * sc) * p[_BDEG]
    marrow = px["marrow"] * p[_BMAR]
    marrow += (v["modic"] - marrow) * band
    i_body = v["cortex"] + (marrow - v["cortex"]) * soft(sdf + f32(1.3))

    # discs: fill the gap between bodies, posterior bulge, bright nucleus unless degenerated
    fd = np.sqrt(_clip(1 - (dx / (p[_WB] + 1)) ** 2, 0, None))
    t = (s - p[_DS]) / p[_DH]
    bul = p[_DBUL] * _clip(1 - t * t, 0, 1) * fd
    d_ant = hd - p[_D] * fd - 0.5
    d_post = hd + 0.5 + bul
    hu_d = f32(0.5) * (d_post - d_ant)
    ud = u - f32(0.5) * (d_post + d_ant)
    f_disc = soft(_rounded_box_sdf(np.abs(s - p[_DS]), np.abs(ud), p[_DH], hu_d, 1.0))
    nuc = _clip((1 - (t * f32(1 / 0.65)) ** 2 - (ud / (f32(0.6) * hu_d + 1e-3)) ** 2) * 2, 0, 1)
    nuc_val = v["nucleus"] + (v["degenerate"] - v["nucleus"]) * p[_DDEG]
    i_disc = v["annulus"] + (nuc_val - v["annulus"]) * nuc

    if sp.disc_node.any() or sp.disc_spur.any():  # realistic profile only (the easy images stay as they were)
        f_body, i_body, f_disc = _endplates(sp, p, (s, u, dx, hd), v, soft, (f_body, i_body, f_disc))
    f_col = f_body + f_disc
    i_col = (i_body * f_body + i_disc * f_disc) / np.maximum(f_col, 1e-6)
    img += (i_col - img) * np.minimum(f_col, 1)


def _endplates(sp: Spine, p, coords: tuple, v: dict, soft, parts: tuple) -> tuple[np.ndarray, ...]:
    """Schmorl's node (disc tissue in a round pit of one endplate) and anterior osteophytes (cortex spurs at both
    endplates) of the nearest disc, within the bodies' width: returns the updated body fraction, body signal and
    disc fraction. ``coords`` = ``(s, u, dx, hd)`` in mm."""
    f_body, i_body, f_disc = parts
    s, u, dx, hd = coords
    f32 = np.float32
    r = p[_NODE_R]
    centre = p[_DS] + p[_NODE_SIDE] * (p[_DH] + f32(0.4) * r)
    node = soft(_hypot(s - centre, u - p[_NODE_U]) - r) * ((r > 0) & (np.abs(dx) < f32(0.6) * p[_WB]))
    f_disc = np.maximum(f_disc, node)
    f_body = f_body * (1 - node)
    reach = p[_SPUR]
    spur = np.zeros_like(f_body)
    for side in (-1.0, 1.0):  # a spur at the anterior corner of each endplate, pointing forward
        ds = (s - (p[_DS] + f32(side) * p[_DH])) * f32(side)
        du = -(u + hd)  # mm anterior of the body's front
        dist = _hypot(du / (reach + f32(1e-3)), ds / (f32(0.45) * reach + f32(1e-3))) - 1
        spur = np.maximum(spur, soft(dist * f32(0.45) * reach))
    spur *= (reach > 0) & (np.abs(dx) < p[_WB])
    i_body = i_body + (v["cortex"] - i_body) * spur
    return np.maximum(f_body, spur), i_body, f_disc


def _outlined_foramina(q: np.ndarray, coords: tuple, zone, rim, v: dict, soft, img: np.ndarray) -> None:
    """The nearest neural foramen as the sagittal T1 shows it, in place on ``img`` (H, W).

    ``coords = (s, u, left)`` (mm, mm, bool) per pixel; ``zone`` (H, W) the lateral extent of the foramina;
    ``rim`` mm. The outline (:func:`foramen_outline`, lowered by the narrowing's height loss) has a dark cortical
    rim; inside, bright fat around the dark exiting root in its upper part, and intermediate tissue (disc or
    facet signal) filling the narrowed share (:func:`foramen_fat_band`).
    """
    s, u, left = coords
    n = np.where(left, q[_NL], q[_NR])
    ts, tu, a = foramen_frame(s, u, (q[_FS], q[_FU]), (q[_FA], q[_FB]), n)
    rho, w = foramen_outline(ts, tu)
    d = (rho - 1) * np.minimum(a, q[_FB] * w)  # about the signed distance to the outline, mm
    lo, hi = foramen_fat_band(ts, w, n, np.where(left, q[_QL], q[_QR]))
    fat = soft((lo - tu) * q[_FB]) * soft((tu - hi) * q[_FB])
    rs, ru, ra, rb = FORAMEN_ROOT
    root = _hypot((ts - rs) * (1 / ra), (tu - ru) * (1 / rb)) - 1
    root = soft(root * np.minimum(ra * a, rb * q[_FB]))
    mid = np.float32(0.5) * (v["annulus"] + v["posterior"])  # intermediate signal (disc, facet, ligament)
    content = mid + (v["foramen"] - mid) * fat
    content += (v["muscle"] - content) * root
    img += (v["cortex"] - img) * (soft(d - rim) - soft(d)) * zone
    img += (content - img) * soft(d) * zone


def _foramen_fat(q: np.ndarray, s, u, left, soft) -> np.ndarray:
    """Fat fraction (H, W) of the nearest foramen: an ellipse in (s, u) scaled by the side's residual."""
    rho = np.where(left, q[_FL], q[_FR])
    ea = rho * q[_FA] + np.float32(1e-3)
    eb = rho * q[_FB] + np.float32(1e-3)
    ds, du = (s - q[_FS]) / ea, (u - q[_FU]) / eb
    return soft((np.sqrt(ds * ds + du * du) - 1) * np.minimum(ea, eb))


def _wave(waves: dict, geom: SeriesGeometry, k: int, amp: float = 0.08) -> np.ndarray:
    """Smooth soft-tissue texture (rows, cols) of slice ``k``: plane waves in patient mm, separable in rows/columns."""
    tex = np.ones((geom.rows, geom.cols), np.float32)
    i = np.arange(geom.rows) * geom.pixel_spacing[0]
    j = np.arange(geom.cols) * geom.pixel_spacing[1]
    n_waves = len(waves["phase"])
    col_dir, row_dir, _ = geom.dirs(k)
    for kv, ph in zip(waves["k"], waves["phase"]):
        a = kv @ geom.positions[k] + ph + i * (kv @ row_dir)
        b = j * (kv @ col_dir)
        tex += (amp / n_waves) * (np.sin(a)[:, None] * np.cos(b)[None] + np.cos(a)[:, None] * np.sin(b)[None]).astype(
            np.float32
        )
    return tex


def render_series(
    spine: Spine, geom: SeriesGeometry, contrast: str, rng: np.random.Generator, lateral: Lateral | None = None
) -> np.ndarray:
    """Render all slices of a series: float32 array (S, rows, cols) in spatial order, non-negative signal.

    ``contrast`` is "T2" or "T1". Randomness (tissue contrast, texture, bias field, noise) comes
    from ``rng`` only, so equal generator states give identical images. ``lateral`` adds the graded
    foraminal narrowing and subarticular stenosis (without it, the foramina and recesses are all normal
    as in sets made before these conditions existed); a T1 series shows the foramina outlined
    (:func:`_outlined_foramina`), a T2 series as a residual fat ellipse.
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {sorted(CONTRASTS)}, got {contrast!r}")
    gamma = rng.uniform(0.8, 1.25)  # random contrast, applied to the tissue signals
    v = {k: np.float32((val * rng.uniform(0.9, 1.1)) ** gamma) for k, val in CONTRASTS[contrast].items()}
    s0, tab = _profile_table(spine)
    ltab = None if lateral is None else _lateral_table(spine, lateral)
    edge = max(0.8, 0.7 * geom.pixel_spacing[0])
    # smooth multiplicative bias field over the field of view (normalised coordinates in [-1, 1])
    yy = np.linspace(-1, 1, geom.rows)[:, None]
    xx = np.linspace(-1, 1, geom.cols)[None, :]
    c = rng.uniform(-0.25, 0.25, 5)
    bias = np.exp(c[0] * yy + c[1] * xx + c[2] * yy * yy + c[3] * xx * xx + c[4] * xx * yy).astype(np.float32)
    waves = {"k": rng.normal(size=(3, 3)), "phase": rng.uniform(0, 2 * np.pi, 3)}
    waves["k"] *= (2 * np.pi / rng.uniform(40.0, 120.0, 3) / np.linalg.norm(waves["k"], axis=1))[:, None]
    sigma = np.float32(rng.uniform(0.015, 0.035))
    out = np.empty((geom.num_slices, geom.rows, geom.cols), np.float32)
    step = max(1, _CHUNK_PIXELS // geom.cols)
    img = np.empty((geom.rows, geom.cols), np.float32)
    for k in range(geom.num_slices):
        x, y, z = (a.astype(np.float32) for a in geom.grid(k))
        tex = _wave(waves, geom, k)
        for r in range(0, geom.rows, step):  # row blocks that stay in cache: ~2.5x faster than whole slices
            sl = slice(r, r + step)
            img[sl] = _slice(spine, s0, tab, x[sl], y[sl], z[sl], v, edge, tex[sl], ltab, contrast == "T1")
        sig = np.maximum(img * bias, 0)
        n1 = rng.standard_normal(sig.shape, dtype=np.float32)
        n2 = rng.standard_normal(sig.shape, dtype=np.float32)
        out[k] = _hypot(sig + sigma * n1, sigma * n2)  # Rician magnitude noise
    return out


def _blur_matrix(n: int, sigma_px: float) -> np.ndarray | None:
    """(n, n) float32 Gaussian blur operator (rows normalised); None (no blur) for ``sigma_px < 0.3``."""
    if sigma_px < 0.3:
        return None
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.exp(-0.5 * (d / sigma_px) ** 2)
    k[k < _TAIL] = 0.0  # beyond ~5.3 sigma: no float32 denormals (they make the product ~4x slower)
    return (k / k.sum(axis=1, keepdims=True)).astype(np.float32)


def _tissues(contrast: str, a: dict) -> dict[str, float]:
    """Tissue signals of a realistic series from its appearance draws ``a`` (see ``profiles``)."""
    base = dict(CONTRASTS[contrast])
    if contrast == "T2":
        base["nucleus"], base["cord"] = a["nucleus"], a["cord"]
        if a["stir"]:  # fat-suppressed: fat, foraminal fat and marrow dark
            base["fat"] = base["foramen"] = a["stir_fat"]
            base["marrow"] *= 0.5
    return {k: float((val * a["factors"][k]) ** a["gamma"]) for k, val in base.items()}


def _noise_operator(n: int, sigma_px: float) -> np.ndarray:
    """(n, m) float32 operator turning m coarse white-noise samples into n smooth ones (Gaussian, sigma in px).

    Coarse samples lie ``step ~ sigma / 1.5`` pixels apart, so smoothing costs ``n * m`` instead of ``n * n``.
    """
    step = max(1, int(sigma_px / 1.5))
    d = np.arange(n)[:, None] - np.arange(-2 * step, n + 2 * step, step)[None, :]
    k = np.exp(-0.5 * (d / max(sigma_px, 0.5)) ** 2)
    k[k < _TAIL] = 0.0  # no float32 denormals
    return k.astype(np.float32)


def _field_operators(geom: SeriesGeometry, a: dict) -> tuple[np.ndarray, ...]:
    """Operators of :func:`_fields`: striation (fine across rows, long along columns), then marrow spots."""
    h, w, ps = geom.rows, geom.cols, geom.pixel_spacing[0]
    spot = a["spot_mm"] / ps
    return (
        _noise_operator(h, 0.8 / ps),
        _noise_operator(w, 4.0 / ps),
        _noise_operator(h, spot),
        _noise_operator(w, spot),
    )


@contextmanager
def _one_thread():
    """torch on one thread inside: its matrix products stall when several processes share a few cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sandwich(left: np.ndarray | None, vol: np.ndarray, right: np.ndarray | None) -> np.ndarray:
    """``left @ vol[k] @ right.T`` for every slice k of ``vol`` (S, m, n): float32; None is the identity."""
    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))
    if left is not None:
        t = torch.matmul(torch.from_numpy(left), t)
    if right is not None:
        t = torch.matmul(t, torch.from_numpy(right).T)
    return t.numpy()


def _smooth_noise(br: np.ndarray, bc: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` smooth Gaussian noise images (n, rows, cols), each with zero mean and unit standard deviation."""
    f = _sandwich(br, rng.standard_normal((n, br.shape[1], bc.shape[1]), dtype=np.float32), bc)
    return (f - f.mean(axis=(1, 2), keepdims=True)) / (f.std(axis=(1, 2), keepdims=True) + 1e-6)


def _fields(ops: tuple[np.ndarray, ...], a: dict, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Soft-tissue texture (relative amplitude ``a["texture"]``) and marrow heterogeneity, each (n, rows, cols)."""
    br, bc, bs, bt = ops
    tex = 1 + a["texture"] * _smooth_noise(br, bc, rng, n)
    blob = _smooth_noise(bs, bt, rng, n)
    spots = 1 + a["spots"] * (_clip(blob - 1.5, 0, 1) - 0.5 * _clip(-blob - 2.0, 0, 1))  # fatty foci, dark spots
    return np.maximum(tex, 0.2).astype(np.float32), spots.astype(np.float32)


def _artefacts(img: np.ndarray, a: dict) -> np.ndarray:
    """Motion ghosts and wrap-around along the phase (column, last) direction of slices (..., rows, cols)."""
    w = img.shape[-1]
    if a["ghost"] > 0:
        shift = max(1, int(a["ghost_shift"] * w))
        img = img + a["ghost"] * 0.5 * (np.roll(img, shift, axis=-1) + np.roll(img, -shift, axis=-1))
    if a["wrap"] > 0:
        band = max(1, int(a["wrap"] * w))
        img = img.copy()
        img[..., :band] += img[..., -band:][..., ::-1] * 0.6
    return img


def _thick_slice(spine: Spine, geom: SeriesGeometry, k: int, tables: tuple, v: dict, edge: float, tex, spots):
    """Noise-free signal (rows, cols) of slice ``k``: two sub-slices at +-thickness/4 (partial volume).

    ``tables = (s0, tab, ltab, keyhole)`` as the arguments of :func:`_slice`."""
    s0, tab, ltab, keyhole = tables
    normal = geom.dirs(k)[2]
    grid = geom.grid(k)
    img = np.zeros((geom.rows, geom.cols), np.float32)
    step = max(1, _CHUNK_PIXELS // geom.cols)
    for off in (-0.25, 0.25):
        x, y, z = ((g + off * geom.slice_thickness * n).astype(np.float32) for g, n in zip(grid, normal))
        for r in range(0, geom.rows, step):
            sl = slice(r, r + step)
            vb = dict(v, marrow=v["marrow"] * spots[sl])
            img[sl] += 0.5 * _slice(spine, s0, tab, x[sl], y[sl], z[sl], vb, edge, tex[sl], ltab, keyhole)
    return img


def render_realistic(
    spine: Spine, geom: SeriesGeometry, contrast: str, a: dict, lateral: Lateral | None = None
) -> np.ndarray:
    """Render a series with the "realistic" appearance draws ``a``: float32 (S, rows, cols), non-negative.

    Partial volume averages two sub-slices at +-thickness/4; then bias field, anisotropic blur,
    artefacts and Rician noise with sigma = disc signal / ``a["snr"]``. Texture, marrow spots, blur and
    noise are batched over the slices (matrix products with truncated Gaussian operators).
    """
    rng = np.random.default_rng(a["texture_seed"])
    v = _tissues(contrast, a)
    s0, tab = _profile_table(spine)
    tables = (s0, tab, None if lateral is None else _lateral_table(spine, lateral), contrast == "T1")
    edge = max(0.8, 0.7 * geom.pixel_spacing[0])
    yy = np.linspace(-1, 1, geom.rows)[:, None]
    xx = np.linspace(-1, 1, geom.cols)[None, :]
    c = a["bias"]
    bias = np.exp(c[0] * yy + c[1] * xx + c[2] * yy * yy + c[3] * xx * xx + c[4] * xx * yy).astype(np.float32)
    br = _blur_matrix(geom.rows, a["blur_mm"][0] / geom.pixel_spacing[0])
    bc = _blur_matrix(geom.cols, a["blur_mm"][1] / geom.pixel_spacing[1])
    sigma = np.float32(max(v["nucleus"], v["annulus"]) / a["snr"])
    n = geom.num_slices
    with _one_thread():
        tex, spots = _fields(_field_operators(geom, a), a, rng, n)
        img = np.stack([_thick_slice(spine, geom, k, tables, v, edge, tex[k], spots[k]) for k in range(n)])
        img = _sandwich(br, img * bias, bc)
    sig = np.maximum(_artefacts(img, a), 0)
    noise = rng.standard_normal((2, *sig.shape), dtype=np.float32)
    return _hypot(sig + sigma * noise[0], sigma * noise[1])
