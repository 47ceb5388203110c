#!/usr/bin/env python
"""Training loss of the demo's first epochs in fp32 and in bf16 (and fp32 at another seed, for the noise).

Each run builds the demo's training workflow (configs/train.json + configs/demo.json) with
``train_precision`` set, the same phantom data, seed and schedule (24 epochs as configured; the run stops
after ``--epochs``), no validation, and records every iteration's loss parts and each epoch's time. The JSON
(``--out``) holds per run ``iteration_total`` and per epoch the mean of every loss part, and per bf16 run its
largest per-epoch difference from the fp32 run at the same seed beside the fp32 seed-to-seed difference.

Example (from the repository root; ~1-2 minutes an epoch on a 2-core CPU):
    python scripts/loss_curves.py --out /tmp/loss_curves.json --epochs 4 --bundle_root /tmp/curves
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: make `bundle` importable

import torch  # noqa: E402
from bundle.atomic import atomic_write_text  # noqa: E402


def train_curve(
    bundle_root: Path, precision: str, seed: int, epochs: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Loss parts of every iteration and seconds of every epoch for the demo's first ``epochs`` epochs
    (``overrides``: further config keys, e.g. a smaller phantom set in tests)."""
    from ignite.engine import Events
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / name) for name in ("train.json", "demo.json")])
    parser["bundle_root"] = str(bundle_root)  # phantoms generated there once, shared by the runs
    parser["ckpt_dir"] = str(bundle_root / f"models_{precision}_{seed}")
    parser["output_dir"] = str(bundle_root / f"eval_{precision}_{seed}")
    parser["train_precision"] = precision
    parser["resume"] = False
    parser["val_interval"] = 10**6  # no validation: the curve is the training loss alone
    for key, value in (overrides or {}).items():
        parser[key] = value
    set_determinism(seed=seed)
    trainer = parser.get_parsed_content("train#trainer")
    loss = parser.get_parsed_content("loss")  # the trainer's loss function: its parts of the last iteration
    losses: list[dict[str, float]] = []
    epoch_seconds: list[float] = []
    started = [time.perf_counter()]

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine) -> None:
        losses.append(loss.logged_parts())

    @trainer.on(Events.EPOCH_COMPLETED)
    def stop(engine) -> None:
        epoch_seconds.append(time.perf_counter() - started[0])
        started[0] = time.perf_counter()
        if engine.state.epoch >= epochs:
            engine.terminate()

    trainer.run()
    per_epoch = len(losses) // max(1, len(epoch_seconds))
    means = {
        key: [sum(it[key] for it in losses[e * per_epoch : (e + 1) * per_epoch]) / per_epoch for e in range(epochs)]
        for key in losses[0]
    }
    return {
        "precision": precision,
        "seed": seed,
        "iterations_per_epoch": per_epoch,
        "iteration_total": [it["total"] for it in losses],
        "epoch_mean": means,
        "epoch_seconds": epoch_seconds,
    }


def max_epoch_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference of the per-epoch mean total loss of two runs."""
    return max(abs(x - y) for x, y in zip(a["epoch_mean"]["total"], b["epoch_mean"]["total"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--bundle_root", required=True, help="scratch folder: phantoms, checkpoints, logs")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (default 4 of the demo's 24)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--no-noise-run", action="store_true", help="skip the fp32 run at seed 1")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.bundle_root)
    plan = [("fp32", 0), ("bf16", 0)] + ([] if args.no_noise_run else [("fp32", 1)])
    start = time.perf_counter()
    runs = [train_curve(root, precision, seed, args.epochs) for precision, seed in plan]
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "torch_threads": args.threads,
        "load_average_end": list(os.getloadavg()),
        "seconds": time.perf_counter() - start,
        "runs": runs,
        "max_epoch_mean_difference_bf16_vs_fp32": max_epoch_difference(runs[0], runs[1]),
    }
    if len(runs) > 2:
        result["max_epoch_mean_difference_fp32_seed0_vs_seed1"] = max_epoch_difference(runs[0], runs[2])
    atomic_write_text(Path(args.out), json.dumps(result, indent=4) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
