#!/usr/bin/env python
"""Write the embedded phantom data set (synthetic lumbar spine MRI as DICOM) in the RSNA or Tianchi layout.

Example (from the repository root):
    python scripts/make_phantoms.py --layout rsna --out data/phantom_rsna --studies 40 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: make `bundle` importable

from bundle.errors import BundleInputError  # noqa: E402
from bundle.phantoms import DEFAULT_CLASS_FREQUENCIES, generate_phantoms  # noqa: E402


def _frequencies(normal: float | None) -> dict | None:
    """Class frequencies with the given normal fraction; abnormal mass split as in the defaults."""
    if normal is None:
        return None
    if not 0.0 <= normal <= 1.0:
        raise SystemExit(f"--normal-fraction must be in [0, 1], got {normal}")
    out = {}
    for key, freqs in DEFAULT_CLASS_FREQUENCIES.items():
        rest = sum(freqs[1:])
        out[key] = [normal] + [(1.0 - normal) * f / rest for f in freqs[1:]]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layout", choices=("rsna", "tianchi"), required=True)
    ap.add_argument("--out", required=True, help="output folder (missing, empty, or a previous phantom set)")
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--size-range",
        type=int,
        nargs=2,
        default=(256, 512),
        metavar=("MIN", "MAX"),
        help="range of Rows/Columns in pixels",
    )
    ap.add_argument(
        "--normal-fraction",
        type=float,
        default=None,
        help="fraction of normal levels for every condition (default: per condition, ~0.65-0.8)",
    )
    ap.add_argument(
        "--profile", choices=("easy", "realistic"), default="easy", help="appearance (bundle.phantoms.profiles)"
    )
    ap.add_argument("--workers", type=int, default=1, help="processes rendering studies in parallel")
    args = ap.parse_args(argv)
    try:
        out = generate_phantoms(
            args.out,
            args.layout,
            args.studies,
            args.seed,
            min_size=args.size_range[0],
            max_size=args.size_range[1],
            class_frequencies=_frequencies(args.normal_fraction),
            workers=args.workers,
            profile=args.profile,
        )
    except (BundleInputError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.studies} {args.layout} {args.profile} phantom studies to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
