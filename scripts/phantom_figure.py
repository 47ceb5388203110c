#!/usr/bin/env python
"""Write a PNG grid of middle sagittal T2 slices: 12 "realistic" phantoms beside 4 "easy" ones.

Example (from the repository root):
    python scripts/phantom_figure.py --out docs/phantom_profiles.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: make `bundle` importable

import numpy as np  # noqa: E402
from bundle.phantoms import phantom_study  # noqa: E402
from PIL import Image  # noqa: E402

_TILE = 160  # pixels per tile side


def _tile(seed: int, index: int, profile: str, max_size: int) -> np.ndarray:
    """Middle slice of the sagittal T2 (or first series) as uint8 (_TILE, _TILE), windowed at 1..99.5 %."""
    st = phantom_study(seed, index, "tianchi", min_size=max_size // 2, max_size=max_size, profile=profile)
    ser = st.sagittal_t2
    img = st.pixels(ser)[ser.middle].astype(np.float32)
    if ser.photometric == "MONOCHROME1":  # display as MONOCHROME2
        img = img.max() - img
    lo, hi = np.percentile(img, (1, 99.5))
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    im = Image.fromarray((img * 255).astype(np.uint8)).resize((_TILE, _TILE), Image.BILINEAR)
    return np.asarray(im)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/phantom_profiles.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-size", type=int, default=256, help="largest Rows/Columns of the rendered studies")
    args = ap.parse_args(argv)
    idx = np.random.default_rng(args.seed).choice(1000, 16, replace=False)
    real = [_tile(args.seed, int(i), "realistic", args.max_size) for i in idx[:12]]
    easy = [_tile(args.seed, int(i), "easy", args.max_size) for i in idx[12:]]
    gap = np.full((_TILE, 8), 255, np.uint8)
    rows = []
    for r in range(4):  # 3 realistic tiles, a gap, 1 easy tile per row
        rows.append(np.concatenate([*real[3 * r : 3 * r + 3], gap, gap, easy[r]], axis=1))
    grid = np.concatenate(rows, axis=0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out, optimize=True)
    print(f"wrote {args.out}: columns 1-3 realistic (12 studies), column 4 easy (4 studies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
