"""Experiment tracking: TensorBoard by default; MLflow (local SQLite store) with MONAI's ``--tracking mlflow``
or with configs/mlflow_tracking.json, which logs every loss part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]


def test_tensorboard_is_the_default():
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    targets = [h["_target_"] for h in parser["train#handlers"]] + [h["_target_"] for h in parser["validate#handlers"]]
    assert targets.count("TensorBoardStatsHandler") == 2
    assert "MLFlowHandler" not in targets


def test_mlflow_tracking_settings_log_every_loss_part():
    settings = json.loads((ROOT / "configs" / "mlflow_tracking.json").read_text())
    trainer = settings["configs"]["trainer"]
    assert trainer["_target_"] == "MLFlowHandler"
    assert trainer["output_transform"] == "$@loss.logged_parts"  # every part of SpineOneLoss and the total
    assert settings["handlers_id"]["trainer"] == {"id": "train#trainer", "handlers": "train#handlers"}
    assert "sqlite" in settings["configs"]["tracking_uri"]  # MLflow 3.13+ refuses the plain file store


@pytest.mark.parametrize(
    "tracking, experiment, logged",
    [
        ("mlflow", "monai_experiment", {"train_loss", "val_score"}),
        ("configs/mlflow_tracking.json", "spineone", {"total", "disc_heatmap", "disc_offset", "val_score"}),
    ],
)
def test_mlflow_run_writes_local_store(tmp_path, tracking, experiment, logged):
    from mlflow.tracking import MlflowClient

    tracking = tracking if tracking == "mlflow" else str(ROOT / tracking)
    out = tmp_path / "out"
    configs = f"['{ROOT}/configs/train.json','{ROOT}/configs/demo.json']"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--meta_file",
        f"{ROOT}/configs/metadata.json",
        "--config_file",
        configs,
        "--bundle_root",
        str(ROOT),
        "--ckpt_dir",
        str(out / "models"),
        "--output_dir",
        str(out / "eval"),
        "--phantom_dir",
        str(tmp_path / "phantoms"),
        "--phantom_studies",
        "6",
        "--phantom_max_size",
        "256",
        "--backbone_depth",
        "18",
        "--input_size",
        "64",
        "--pixdim",
        "4.375",
        "--max_epochs",
        "1",
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--cache_rate",
        "0",
        "--tracking",
        tracking,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "2",
        "PYTHONPATH": str(ROOT),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    store = out / "eval" / "mlruns.db"
    assert store.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert logged <= set(metrics)
    assert all(value == value for value in metrics.values())  # no NaN
    # TensorBoard keeps logging beside it, and nothing is written outside the given folders
    assert any((out / "eval" / "runs").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "phantoms"]
