"""configs/multi_gpu_train.json on CPU: two gloo processes train one short epoch in sync; rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
RANK0_ONLY_TRAIN = {
    3: "ValidationHandler",
    4: "StatsHandler",
    5: "TensorBoardStatsHandler",
    6: "ignite.handlers.ProgressBar",
}
RANK0_ONLY_VALIDATE = {1: "TensorBoardStatsHandler", 2: "CheckpointSaver"}

# test-only overrides: per-rank file names reveal which rank wrote what; finalize dumps each rank's state
PROBE = {
    "train#handlers#0#save_path": "$@ckpt_dir + f'/checkpoint_rank{dist.get_rank()}.pt'",
    "train#handlers#5#log_dir": "$@output_dir + f'/runs_rank{dist.get_rank()}'",
    "finalize": [
        "$torch.save({'iteration': @train#trainer.state.iteration, 'indices': list(iter(@train#sampler)),"
        " 'state': @network.module.state_dict()}, @ckpt_dir + f'/probe_rank{dist.get_rank()}.pt')",
        "$dist.is_initialized() and dist.destroy_process_group()",
    ],
}


def test_rank0_only_overrides_point_at_the_intended_handlers():
    """multi_gpu_train.json disables handlers by list index: the indices must still name these handlers."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "train.json"), str(ROOT / "configs" / "multi_gpu_train.json")])
    for section, expected in (("train", RANK0_ONLY_TRAIN), ("validate", RANK0_ONLY_VALIDATE)):
        handlers = parser[f"{section}#handlers"]
        for index, target in expected.items():
            assert handlers[index]["_target_"] == target
            assert handlers[index]["_disabled_"] == "$not @is_rank0"
    assert parser["train#dataloader#sampler"] == "@train#sampler" and parser["train#dataloader#shuffle"] is False
    assert parser["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert any("destroy_process_group" in line for line in parser["finalize"])


def test_two_gloo_ranks_train_in_sync(tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps(PROBE))
    configs = f"['{ROOT}/configs/train.json','{ROOT}/configs/multi_gpu_train.json','{probe}']"
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
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
        str(out / "phantoms"),
        "--phantom_studies",
        "8",
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
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    models = out / "models"
    rank0 = torch.load(models / "probe_rank0.pt", weights_only=True)
    rank1 = torch.load(models / "probe_rank1.pt", weights_only=True)
    # both ranks trained, on disjoint halves of the training set (DistributedSampler)
    assert rank0["iteration"] >= 1 and rank1["iteration"] == rank0["iteration"]
    assert set(rank0["indices"]).isdisjoint(rank1["indices"])
    # gradients were averaged: learnable parameters are identical after the epoch
    for name, value in rank0["state"].items():
        if "running_" in name or "num_batches_tracked" in name:
            continue  # BatchNorm statistics are local to each rank (rank 0's are broadcast at each forward)
        assert torch.equal(value, rank1["state"][name]), name

    # rank 0 alone writes the resumable state, the best model and the TensorBoard logs
    assert (models / "checkpoint_rank0.pt").is_file() and not (models / "checkpoint_rank1.pt").exists()
    assert (out / "eval" / "runs_rank0").is_dir() and not (out / "eval" / "runs_rank1").exists()
    saved = torch.load(models / "checkpoint_rank0.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in saved["model"])  # unwrapped from DDP
    best = torch.load(models / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in best)
    torch.testing.assert_close(best["backbone.conv1.weight"], rank0["state"]["backbone.conv1.weight"])
