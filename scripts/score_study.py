"""Per condition group scores of a full-study inference run on a labelled RSNA-layout folder.

Reads ``OUT/submission.csv`` and ``OUT/{study}/keypoints.json`` (configs/inference_study.json) and the folder's
``train.csv`` / ``train_label_coordinates.csv``; writes the JSON of :func:`bundle.study_scores.score_study_run`
(PCK and F1 per group in in-plane mm, the RSNA terms beside the weighted constant's) atomically.

Usage::

    python scripts/score_study.py --outputs OUT --dataset_dir /data/rsna-2024 --out OUT/study_scores.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bundle.atomic import atomic_write_text  # noqa: E402
from bundle.errors import BundleInputError  # noqa: E402
from bundle.study_scores import score_study_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", required=True, help="output_dir of the full-study inference")
    parser.add_argument("--dataset_dir", required=True, help="the labelled RSNA-layout folder it ran on")
    parser.add_argument("--prior_csv", default=None, help="train.csv of the constant (default: the folder's own)")
    parser.add_argument("--hit_mm", type=float, default=6.0)
    parser.add_argument("--out", default=None, help="JSON file (default: OUTPUTS/study_scores.json)")
    args = parser.parse_args(argv)
    try:
        result = score_study_run(args.outputs, args.dataset_dir, args.prior_csv, args.hit_mm)
    except BundleInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.outputs) / "study_scores.json")
    atomic_write_text(out, json.dumps(result, indent=2))
    for group, scores in result["keypoints"].items():
        print(f"{group}: PCK-6 {scores['pck']['6']:.3f}, macro F1 {scores['macro_f1']:.3f}")
    print(
        "RSNA terms (over the constant's): "
        + ", ".join(
            f"{k} {v:.4f} ({result['rsna_over_constant'].get(k, float('nan')):.2f})" for k, v in result["rsna"].items()
        )
    )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
