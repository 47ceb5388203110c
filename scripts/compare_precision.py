#!/usr/bin/env python
"""Compare two evaluation outputs of the same model (e.g. ``--precision fp32`` against ``--precision bf16``).

Each folder is an ``--output_dir`` of ``configs/evaluate.json``: ``metrics.json`` and
``predictions/{study}/keypoints.json``. Reported: the fraction of keypoints (stream, level) found in both
with the same class, the largest and mean position difference in mm, the keypoints found in only one, and the
differences of PCK-6, macro F1 and the RSNA score, against issue 14's criterion (>= 99% same level and class,
positions within 0.5 mm, metrics within 0.005).

Example:
    python scripts/compare_precision.py OUT_fp32 OUT_bf16 --out /tmp/compare.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _keypoints(folder: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """``{(study, stream, level): keypoint record}`` of every ``predictions/*/keypoints.json`` in ``folder``."""
    out = {}
    for path in sorted((folder / "predictions").glob("*/keypoints.json")):
        content = json.loads(path.read_text())
        for point in content["keypoints"]:
            out[(content["study_id"], point["stream"], point["level"])] = point
    if not out:
        raise SystemExit(f"no keypoints under {folder / 'predictions'}: is it an evaluate.json --output_dir?")
    return out


def _metrics(folder: Path) -> dict[str, float]:
    content = json.loads((folder / "metrics.json").read_text())
    out = {}
    for stream, result in content["streams"].items():
        out[f"{stream}_pck_6"] = float(result["pck"]["6"])
        out[f"{stream}_macro_f1"] = float(result["macro_f1"])
    if "rsna" in content:
        out["rsna_score"] = float(content["rsna"]["score"])
    return out


def compare(a: Path, b: Path) -> dict[str, Any]:
    """The comparison of output folders ``a`` and ``b`` (see the module docstring)."""
    ka, kb = _keypoints(a), _keypoints(b)
    common = sorted(set(ka) & set(kb))
    same = [k for k in common if ka[k]["label_index"] == kb[k]["label_index"]]
    dist = [float(np.linalg.norm(np.subtract(ka[k]["position_mm"], kb[k]["position_mm"]))) for k in common]
    ma, mb = _metrics(a), _metrics(b)
    union = len(set(ka) | set(kb))
    result = {
        "keypoints_a": len(ka),
        "keypoints_b": len(kb),
        "only_in_one": union - len(common),
        "same_level_and_class_fraction": len(same) / union,
        "max_position_difference_mm": max(dist) if dist else 0.0,
        "mean_position_difference_mm": float(np.mean(dist)) if dist else 0.0,
        "metrics_a": ma,
        "metrics_b": mb,
        "metric_differences": {k: abs(ma[k] - mb[k]) for k in ma if k in mb},
    }
    result["criterion_met"] = {
        "same_level_and_class_ge_0.99": result["same_level_and_class_fraction"] >= 0.99,
        "positions_within_0.5_mm": result["max_position_difference_mm"] <= 0.5,
        "metrics_within_0.005": all(v <= 0.005 for v in result["metric_differences"].values()),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="first evaluation output folder (e.g. fp32)")
    p.add_argument("b", type=Path, help="second evaluation output folder (e.g. bf16)")
    p.add_argument("--out", type=Path, help="also write the comparison as JSON here")
    args = p.parse_args(argv)
    result = compare(args.a, args.b)
    text = json.dumps(result, indent=4) + "\n"
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
