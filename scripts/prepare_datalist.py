#!/usr/bin/env python
"""Write a datalist JSON for the RSNA 2024 or the Tianchi layout.

Examples:
    python scripts/prepare_datalist.py --format rsna --root /data/rsna --out /data/rsna_fold0.json
    python scripts/prepare_datalist.py --format tianchi --root /data/lumbar_train150 \
        --annotation /data/lumbar_train150_annotation.json --out /data/tianchi_fold0.json --fold 0
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.errors import BundleInputError  # noqa: E402
from bundle.io import (  # noqa: E402
    build_rsna_datalist,
    build_tianchi_datalist,
    check_series,
    split_folds,
    write_datalist,
)
from bundle.streams import RSNA_STREAMS, TIANCHI_STREAMS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=["rsna", "tianchi"])
    parser.add_argument("--root", required=True, help="RSNA data folder, or the Tianchi image folder")
    parser.add_argument("--annotation", help="Tianchi annotation JSON (required for --format tianchi)")
    parser.add_argument("--image-dir", default=None, help="RSNA image folder under --root (default train_images)")
    parser.add_argument("--out", required=True, help="datalist JSON to write")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--fold", type=int, default=0, help="validation fold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--check-series", action="store_true", help="read every series' headers and drop those the loader would reject"
    )
    args = parser.parse_args(argv)
    if args.format == "tianchi" and not args.annotation:
        parser.error("--annotation is required with --format tianchi")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        if args.format == "rsna":
            items, streams = build_rsna_datalist(args.root, image_dir=args.image_dir), RSNA_STREAMS
        else:
            items, streams = build_tianchi_datalist(args.root, args.annotation), TIANCHI_STREAMS
        if args.check_series:
            items, dropped = check_series(items)
            if dropped:
                print(f"dropped {len(dropped)} series that the loader would reject (see warnings)", file=sys.stderr)
        if not items:
            raise BundleInputError(f"{args.root}: no usable study found")
        training, validation = split_folds(items, folds=args.folds, fold=args.fold, seed=args.seed)
        write_datalist(out, training, validation, format=args.format, streams=streams, overwrite=args.overwrite)
    except (BundleInputError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {len(training)} training and {len(validation)} validation items")
    return 0


if __name__ == "__main__":
    sys.exit(main())
