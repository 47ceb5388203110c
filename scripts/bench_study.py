#!/usr/bin/env python
"""Time full-study inference against spinal-only inference on one phantom study (issue 13's speed criterion).

Both runs go through the bundle's own evaluators: ``configs/inference.json`` (sagittal T2 only) and
``['configs/inference.json', 'configs/inference_study.json']`` (the three series models), with untrained
checkpoints of the configured networks (the reference sizes and ResNet-50 unless ``--set`` says otherwise).
Per run the time of the one study is taken from the batch fetch (``GET_BATCH_STARTED``, so series reading and
preprocessing count) to the end of its iteration (writers included); checkpoint loading and BatchNorm folding
at the run's start are outside. The two kinds of run alternate; the best of ``--repeats`` each is reported.

Example:
    python scripts/bench_study.py --repeats 3 > study_bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SPINAL = ["configs/inference.json"]
STUDY = ["configs/inference.json", "configs/inference_study.json"]
SERIES = {
    "sagittal_t1": ["configs/train.json", "configs/sagittal_t1.json"],
    "axial_t2": ["configs/train.json", "configs/axial_t2.json"],
}


def _parser(configs: list[str], overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in configs])
    parser.update({"bundle_root": str(ROOT), **overrides})
    parser.get_parsed_content("imports")
    return parser


def untrained_checkpoints(models: Path, overrides: dict[str, Any]) -> None:
    """``models/model.pt`` (sagittal T2) and ``models/{sagittal_t1,axial_t2}/model.pt``, randomly initialised."""
    torch.manual_seed(0)
    for configs, path in ((SPINAL, models / "model.pt"), *((c, models / k / "model.pt") for k, c in SERIES.items())):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(_parser(configs, overrides).get_parsed_content("network_def").state_dict(), path)


def study_seconds(configs: list[str], overrides: dict[str, Any]) -> float:
    """Seconds of the single study's iteration of one evaluator run (batch fetch to the writers' end)."""
    from ignite.engine import Events

    evaluator = _parser(configs, overrides).get_parsed_content("evaluator")
    marks: dict[str, float] = {}
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, lambda e: marks.setdefault("start", time.perf_counter()))
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: marks.setdefault("end", time.perf_counter()))
    evaluator.run()
    return marks["end"] - marks["start"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bundle.phantoms import generate_phantoms

    sizes = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_phantoms(
            Path(tmp) / "rsna",
            "rsna",
            studies=1,
            seed=args.seed,
            min_size=min(256, args.max_size),
            max_size=args.max_size,
        )
        extra = Path(tmp) / "sizes.json"
        extra.write_text(json.dumps(sizes))
        untrained_checkpoints(Path(tmp) / "models", sizes)
        common = {"dataset_dir": str(data), "ckpt_dir": str(Path(tmp) / "models"), "num_workers": 0}
        common.update(precision=args.precision, series_extra_configs=[str(extra)], **sizes)
        seconds: dict[str, list[float]] = {"spinal": [], "study": []}
        for _ in range(args.repeats):
            seconds["spinal"].append(study_seconds(SPINAL, {**common, "output_dir": str(Path(tmp) / "o")}))
            seconds["study"].append(study_seconds(STUDY, {**common, "output_dir": str(Path(tmp) / "s")}))
    best = {k: min(v) for k, v in seconds.items()}
    return {"seconds": seconds, "best": best, "study_over_spinal": best["study"] / best["spinal"], "sizes": sizes}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each kind, alternating (best taken)")
    p.add_argument("--precision", default="auto", help="the configs' precision option")
    p.add_argument("--max-size", type=int, default=512, help="largest phantom image side, pixels")
    p.add_argument("--seed", type=int, default=3, help="phantom seed (3: one Sagittal T1 and one Axial T2 series)")
    p.add_argument("--set", action="append", default=[], help="config value for all three models, KEY=JSON")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT))
    json.dump(run(parse_args(argv)), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
