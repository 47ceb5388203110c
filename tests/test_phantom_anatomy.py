"""Anatomy of the realistic phantom profile: seeded draws within their documented ranges, field of view from the
lower thoracic spine (drawn, unlabelled thoracic discs) or cut above L1, transitional anatomy counted from the
sacrum, collapsed discs, lordosis, scoliosis and spondylolisthesis. Parameters are sampled without rendering (fast)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from bundle.phantoms import phantom_study
from bundle.phantoms.anatomy import BODY_NAMES, DISC_NAMES, THORACIC_NAMES, check_class_frequencies, sample_spine
from bundle.phantoms.profiles import ANATOMY, sample_anatomy
from bundle.phantoms.render import _BS, CONTRASTS, _profile_table, _slice
from bundle.phantoms.study import realistic_top_s
from bundle.rsna_labels import LEVELS
from bundle.streams import TIANCHI_DISC_LEVELS, TIANCHI_VERTEBRA_LEVELS


def _find(seed: int, pred, limit: int = 600) -> int:
    """First study index of set ``seed`` whose anatomy draws satisfy ``pred``."""
    return next(i for i in range(limit) if pred(sample_anatomy("realistic", seed, i)))


def _inside(lo_hi: tuple[float, float], value: float) -> bool:
    return lo_hi[0] - 1e-9 <= value <= lo_hi[1] + 1e-9


def test_anatomy_draws_are_seeded_and_easy_has_none():
    assert sample_anatomy("realistic", 3, 7) == sample_anatomy("realistic", 3, 7)
    assert sample_anatomy("realistic", 3, 7) != sample_anatomy("realistic", 4, 7)
    assert sample_anatomy("easy", 3, 7) is None
    a = phantom_study(3, 7, "tianchi", min_size=48, max_size=64, profile="realistic")
    b = phantom_study(3, 7, "tianchi", min_size=48, max_size=64, profile="realistic")
    for group, points in a.keypoints_mm().items():
        assert all(np.array_equal(p, b.keypoints_mm()[group][lv]) for lv, p in points.items())
    e = phantom_study(3, 7, "tianchi", min_size=48, max_size=64).spine
    assert e.lumbar == 5 and e.thoracic.shape == (4, 0) and e.scoliosis[0] == 0


def test_every_anatomy_parameter_within_its_documented_range_over_200_studies():
    p, freqs = ANATOMY, check_class_frequencies(None)
    seen = {"top": set(), "lumbar": set(), "scoliosis": set(), "collapsed": 0, "slipped": set()}
    for i in range(200):
        a = sample_anatomy("realistic", 5, i)
        assert a["fov_top"] in p.fov_tops and _inside(p.fov_cut, a["fov_cut"]) and a["lumbar"] in (4, 5, 6)
        assert _inside(p.lordosis, a["lordosis"]) and _inside(p.scoliosis_width, a["scoliosis"][2])
        amp, where, _ = a["scoliosis"]
        assert (amp == 0 or _inside(p.scoliosis_mm, abs(amp))) and 0 <= where <= 1
        assert len(a["collapse"]) == len(DISC_NAMES) and all(c == 0 or _inside(p.collapse, c) for c in a["collapse"])
        assert all(_inside(p.thoracic_height, f) for f in a["thoracic"]) and len(a["thoracic"]) == 6
        assert all(
            _inside(p.schmorl_mm, r) and side in (-1, 1) and _inside(p.schmorl_u, f) for r, side, f in a["schmorl"]
        )
        assert all(v == 0 or _inside(p.spur_mm, v) for v in a["spur"])
        level, frac = a["listhesis"]
        assert [_inside(r, v) for r, v in zip((p.back_muscle_mm, p.fat_mm, p.abdomen_mm), a["habitus"])] == [True] * 3
        assert (level == "" or level in p.listhesis_levels) and _inside(p.listhesis, frac)
        seen["top"].add(a["fov_top"])
        seen["lumbar"].add(a["lumbar"])
        seen["scoliosis"].add(amp != 0)
        # the spine built from them (sampling only): lordosis and collapse as drawn, same grades as "easy"
        sp = sample_spine(np.random.default_rng([5, i]), freqs, a)
        easy = sample_spine(np.random.default_rng([5, i]), freqs)
        assert (sp.stenosis, sp.disc_labels, sp.vertebra_labels) == (
            easy.stenosis,
            easy.disc_labels,
            easy.vertebra_labels,
        )
        turn = (sp.body_s[BODY_NAMES.index("S1")] - sp.disc_s[DISC_NAMES.index("T12-L1")]) / sp.radius
        assert np.rad2deg(turn) == pytest.approx(a["lordosis"], rel=1e-9)
        for k, c in enumerate(a["collapse"]):
            if c > 0 and sp.disc_degenerate[k] and sp.lumbar == 5:  # collapsed: below any ordinary degenerate disc
                seen["collapsed"] += 1
                ratio = sp.disc_half[k] / easy.disc_half[k]  # collapse fraction / ordinary factor 0.55..0.75
                assert p.collapse[0] / 0.75 - 1e-9 <= ratio <= p.collapse[1] / 0.55 + 1e-9
        assert np.all(np.diff(sp.drawn()["body_s"]) > 0) and np.all(np.diff(sp.drawn()["disc_s"]) > 0)
        # Schmorl's nodes exactly at the discs tagged v5, osteophytes only at degenerative discs
        v5 = {lv for lv, tag in zip(TIANCHI_DISC_LEVELS, sp.disc_tags) if "v5" in tag.split(",")}
        assert {DISC_NAMES[k] for k in np.flatnonzero(sp.disc_node[0])} == v5
        assert not np.any(sp.disc_spur[~sp.disc_degenerate])
        assert sp.habitus == a["habitus"] and easy.habitus == (45.0, 22.0, 230.0)
        # spondylolisthesis: the drawn level, slipped by the drawn fraction of the body below (a few mm .. 25%)
        k, mm = sp.slip
        assert (k == -1 and mm == 0) if not level else (DISC_NAMES[k] == level)
        if level:
            seen["slipped"].add(level)
            assert mm == pytest.approx(frac * sp.body_depth[k + 1]) and 2.0 < mm <= 0.25 * sp.body_depth[k + 1]
    assert seen["top"] == set(p.fov_tops) and seen["lumbar"] == {4, 5, 6} and seen["scoliosis"] == {True, False}
    assert seen["collapsed"] > 0 and seen["slipped"] >= {"L4-L5", "L5-S1"}


def _on_disc(sp, name: str, mm: np.ndarray, tol: float) -> bool:
    """Patient-mm point ``mm`` lies within disc ``name`` (arc length) on the spine's centre (AP)."""
    s, u, _ = sp.coords(*(np.array([v]) for v in mm))
    k = DISC_NAMES.index(name)
    return abs(s[0] - sp.disc_s[k]) <= sp.disc_half[k] + tol and abs(u[0]) <= 0.5 * sp.depth_at(sp.disc_s[k])


@pytest.mark.parametrize("top", ANATOMY.fov_tops)
def test_field_of_view_top_and_thoracic_discs_drawn_but_unlabelled(top):
    i = _find(2, lambda a: a["fov_top"] == top and a["lumbar"] == 5)
    st = phantom_study(2, i, "tianchi", min_size=96, max_size=128, profile="realistic")
    ser, sp = st.sagittal_t2, st.spine
    g, m = ser.geometry, ser.middle
    top_s = realistic_top_s(sp, st.anatomy)
    if top == "cut":  # inside T12, above the T12-L1 disc
        t12 = BODY_NAMES.index("T12")
        assert sp.body_s[t12] - sp.body_half[t12] < top_s < sp.body_s[t12] + sp.body_half[t12]
    else:
        k = THORACIC_NAMES.index(top) if top in THORACIC_NAMES else None
        expected = sp.thoracic[0, k] - sp.thoracic[1, k] if k is not None else None
        if expected is None:
            expected = sp.body_s[BODY_NAMES.index(top)] - sp.body_half[BODY_NAMES.index(top)]
        assert top_s == pytest.approx(expected)
    # the top edge of the image passes through the centreline at top_s (half a pixel above row 0)
    assert g.to_pixel(sp.point(top_s), m)[1] == pytest.approx(-0.5, abs=1.0)
    # every label inside the image, on the disc or body it names; only the data set's levels are labelled
    pts = st.tianchi_points()
    assert sorted(p["identification"] for p in pts) == sorted(TIANCHI_DISC_LEVELS + TIANCHI_VERTEBRA_LEVELS)
    tol = g.pixel_spacing[0]
    for p in pts:
        x, y = p["coord"]
        assert 0 <= x < g.cols and 0 <= y < g.rows, p
        if p["structure"] == "disc":
            assert _on_disc(sp, p["identification"], p["mm"], tol), p
    assert [p["level"] for p in st.rsna_points()] == list(LEVELS)
    # thoracic discs above T12-L1: in view (drawn) from a T8..T10 top, never labelled
    row = {d: g.to_pixel(sp.disc_centre(d), m)[1] for d in ("T10-T11", "T11-T12")}
    if top in ("T8", "T9", "T10"):
        assert all(0 <= r < g.rows for r in row.values())
    if top == "cut":
        assert row["T11-T12"] < 0
    labelled = {p["identification"] for p in pts}
    assert not labelled & {"T10-T11", "T11-T12", *THORACIC_NAMES}
    # the bodies above T10 are drawn: the renderer's table holds T7..T9 where they lie
    s0, tab = _profile_table(sp)
    for k in range(len(THORACIC_NAMES)):
        j = int(round((sp.thoracic[0, k] - s0) / 0.25))
        assert tab[_BS, j] == pytest.approx(sp.thoracic[0, k], abs=1e-3)


@pytest.mark.parametrize("lumbar", (4, 6))
def test_transitional_anatomy_is_labelled_counting_from_the_sacrum(lumbar):
    i = _find(1, lambda a: a["lumbar"] == lumbar)
    st = phantom_study(1, i, "rsna", min_size=96, max_size=128, profile="realistic")
    easy = phantom_study(1, i, "rsna", min_size=96, max_size=128)
    sp = st.spine
    assert sp.lumbar == lumbar and st.grades() == easy.grades()
    t11, t12, l1 = (BODY_NAMES.index(n) for n in ("T11", "T12", "L1"))
    if lumbar == 6:  # the unlabelled vertebra above L1 is lumbar-sized
        for arr in (sp.body_half, sp.body_depth, sp.body_half_width):
            assert arr[t12] == pytest.approx(0.98 * arr[l1])
    else:  # the vertebra labelled L1 is thoracic-sized, as T11
        for arr in (sp.body_half, sp.body_depth, sp.body_half_width):
            assert arr[l1] == pytest.approx(arr[t11])
    # the five labelled RSNA discs are the five lowest above the sacrum, in order, each on the disc it names
    lowest = DISC_NAMES[BODY_NAMES.index("S1") - 5 : BODY_NAMES.index("S1")]
    points = st.rsna_points()
    assert [p["level"] for p in points] == list(LEVELS)
    for p, name in zip(points, lowest):
        assert name == p["level"].replace("/", "-")
        s, _, _ = sp.coords(*(np.array([v]) for v in st.keypoints_mm()["canal"][p["level"]]))
        k = DISC_NAMES.index(name)
        assert abs(s[0] - sp.disc_s[k]) < 1e-6
        ser = st.series_of("sag_t2")[0] if st.has_sagittal_t2 else st.series_of("sag_t1")[0]
        assert 0 <= p["x"] < ser.geometry.cols and 0 <= p["y"] < ser.geometry.rows


def test_scoliosis_moves_the_canal_off_the_middle_slice():
    i = _find(4, lambda a: abs(a["scoliosis"][0]) > 12 and a["lumbar"] == 5)
    st = phantom_study(4, i, "tianchi", min_size=64, max_size=96, profile="realistic")
    sp = st.spine
    amp, centre, _ = sp.scoliosis
    apex = sp.point(centre)
    assert apex[0] - sp.x_mid == pytest.approx(amp)  # the centreline deviates laterally at the apex
    s, u, dx = sp.coords(*(np.array([v]) for v in sp.point(centre, 3.0, 2.0)))
    assert (s[0], u[0], dx[0]) == pytest.approx((centre, 3.0, 2.0), abs=1e-6)  # coords inverts point
    g = st.sagittal_t2.geometry
    _, _, off = g.to_pixel(apex, st.sagittal_t2.middle)
    assert abs(off) > 5.0  # the middle slice misses the canal's centre there


def test_spondylolisthesis_rate_over_200_studies_and_none_in_easy():
    p = ANATOMY
    levels = [sample_anatomy("realistic", 9, i)["listhesis"][0] for i in range(200)]
    n = sum(bool(lv) for lv in levels)
    # binomial(200, rate): mean 10 at 5%; these bounds lie beyond 2.5 standard deviations
    assert 200 * p.listhesis_rate * 0.25 <= n <= 200 * p.listhesis_rate * 2.0, n
    assert levels.count("L4-L5") >= max(levels.count("L3-L4"), levels.count("L5-S1"))  # the commonest level
    assert phantom_study(9, next(i for i, lv in enumerate(levels) if lv), "rsna", min_size=48).spine.slip == (-1, 0.0)


def _fraction(sp, points: list[np.ndarray], tissues: set[str]) -> np.ndarray:
    """Noise-free fraction (n,) of ``tissues`` at patient-mm ``points``, evaluated by the renderer's slice function
    with those tissues at signal 1 and every other one at 0."""
    v = {k: np.float32(k in tissues) for k in CONTRASTS["T2"]}
    x, y, z = (np.array([[p[i] for p in points]], np.float32) for i in range(3))
    s0, tab = _profile_table(sp)
    return _slice(sp, s0, tab, x, y, z, v, 0.8, np.ones_like(x))[0]


def test_spondylolisthesis_shifts_the_body_above_and_the_disc_label_follows():
    def slipped(a):
        return a["listhesis"][0] and a["listhesis"][1] > 0.15 and a["lumbar"] == 5 and a["scoliosis"][0] == 0

    i = _find(2, slipped)
    st = phantom_study(2, i, "tianchi", min_size=96, max_size=128, profile="realistic")
    sp, (k, mm) = st.spine, st.spine.slip
    flat = replace(sp, slip=(-1, 0.0))  # the same spine without the slip
    name, body = DISC_NAMES[k], ("marrow", "cortex", "modic")
    # the labelled disc point (pixel label mapped back to mm) lies inside the rendered, sheared disc, half the
    # slip forward of the unslipped disc centre: between the displaced endplates
    label = next(p for p in st.tianchi_points() if p["identification"] == name)
    assert _fraction(sp, [label["mm"]], {"nucleus", "annulus", "degenerate"})[0] > 0.9
    assert np.linalg.norm(sp.disc_centre(name) - flat.disc_centre(name)) == pytest.approx(0.5 * mm)
    # 1 mm in front of / behind the unslipped body margins: the body above has moved forward by the slip, the
    # body below has not
    for j, moved in ((k, True), (k + 1, False)):
        half = 0.5 * sp.body_depth[j]
        front, back = flat.point(sp.body_s[j], -half - 1.0), flat.point(sp.body_s[j], half - 1.0)
        assert list(_fraction(flat, [front, back], set(body)) > 0.5) == [False, True]
        assert list(_fraction(sp, [front, back], set(body)) > 0.5) == ([True, False] if moved else [False, True])
    assert st.grades() == phantom_study(2, i, "tianchi", min_size=96, max_size=128).grades()


def test_habitus_sets_the_rendered_fat_and_abdomen_depths():
    i = _find(6, lambda a: not a["listhesis"][0] and a["scoliosis"][0] == 0 and a["habitus"][1] > 30)
    sp = phantom_study(6, i, "tianchi", min_size=48, max_size=64, profile="realistic").spine
    muscle, fat, abdomen = sp.habitus
    s = sp.body_s[BODY_NAMES.index("L3")]
    step = 0.1
    # along the posterior normal at L3 on the midline: the subcutaneous fat layer is fat * scale thick
    u = np.arange(0.0, 250.0, step)
    fat_frac = _fraction(sp, [sp.point(s, v) for v in u], {"fat"})
    assert np.count_nonzero(fat_frac > 0.5) * step == pytest.approx(fat * sp.scale, abs=1.0)
    start = u[np.argmax(fat_frac > 0.5)]  # behind the canal by the back muscle's depth
    post = 0.5 * sp.depth_at(s) + sp.canal_gap + sp.canal_width_at(s)
    assert start == pytest.approx(post + muscle * sp.scale, abs=1.0)
    # anteriorly: abdomen from the vertebral front to the abdominal wall, air beyond
    front = -np.arange(0.0, 400.0, step)
    abd = _fraction(sp, [sp.point(s, v) for v in front], {"abdomen"})
    wall = -front[np.flatnonzero(abd > 0.5).max()]
    assert wall == pytest.approx(0.5 * sp.depth_at(s) + abdomen * sp.scale, abs=1.0)
