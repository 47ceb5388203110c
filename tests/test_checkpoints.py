"""Strict checkpoint check of configs/inference.json's network_def (what MONAI Label and bundle runs build)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle import SpineOne
from bundle.checkpoints import checked_network, checkpoint_mismatch, guess_spineone_settings, load_state_dict
from bundle.errors import BundleInputError
from monai.bundle import ConfigParser
from stream_fixtures import streams

ROOT = Path(__file__).resolve().parents[1]


def _net(depth: int = 18, **kwargs) -> SpineOne:
    torch.manual_seed(0)
    return SpineOne(
        kwargs.pop("streams", streams(disc=3)), backbone_depth=depth, in_channels=kwargs.pop("in_channels", 7), **kwargs
    )


def test_matching_or_absent_checkpoint_passes(tmp_path):
    net = _net(18)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    assert checked_network(net, tmp_path / "model.pt") is net
    assert checked_network(net, tmp_path / "absent.pt") is net  # verify_net_in_out: no weights yet
    assert checked_network(net, None) is net
    torch.save({"model": net.state_dict(), "optimizer": {}}, tmp_path / "checkpoint.pt")  # CheckpointLoader's layout
    assert checked_network(net, tmp_path / "checkpoint.pt") is net


def test_mismatch_names_keys_shapes_and_fitting_overrides(tmp_path):
    torch.save(_net(18).state_dict(), tmp_path / "model.pt")
    with pytest.raises(BundleInputError) as info:
        checked_network(_net(50), tmp_path / "model.pt")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'model.pt'}: the weights do not fit")
    assert "network keys missing from the checkpoint (e.g. backbone.layer1.0.conv3.weight" in message
    assert "shape mismatches (e.g. backbone.layer1.0.conv1.weight (64, 64, 3, 3) in the checkpoint" in message
    # only what differs from the configured network: the depth, not the unchanged slices or attention
    assert "overrides that probably fit these weights: --backbone_depth 18 (" in message
    assert "configs/demo.json" in message


def test_guess_reads_depth_slices_attention_and_format():
    tianchi = _net(34, streams=streams(disc=2, vertebra=2), in_channels=5, attention=["cam"])
    assert guess_spineone_settings(tianchi.state_dict()) == {
        "backbone_depth": 34,
        "num_slices": 5,
        "attention": ["cam"],
        "dataset_format": "tianchi",
    }
    with torch.device("meta"):
        deep = SpineOne(streams(disc=3), backbone_depth=101, in_channels=7, attention=None)
    assert guess_spineone_settings(deep.state_dict())["backbone_depth"] == 101
    assert guess_spineone_settings({"conv.weight": torch.zeros(1)}) is None


def test_overrides_for_list_values_and_foreign_weights(tmp_path):
    torch.save(_net(18, attention=None).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(BundleInputError, match=r"fit these weights: --attention None \("):
        checked_network(_net(18), tmp_path / "plain.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(BundleInputError, match="unknown to the network.*not those of any SpineOne configuration"):
        checked_network(_net(18), tmp_path / "other.pt")
    assert checkpoint_mismatch(_net(18), {}) == [
        f"{len(_net(18).state_dict())} network keys missing from the checkpoint (e.g. backbone.conv1.weight, "
        "backbone.bn1.weight)"
    ]


def test_unreadable_checkpoints_are_named(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BundleInputError, match=r"broken\.pt: not a readable PyTorch checkpoint"):
        load_state_dict(tmp_path / "broken.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(BundleInputError, match=r"list\.pt: not a state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_inference_config_checks_its_checkpoint(tmp_path):
    """What MONAI Label does at start-up: parse network_def with bundle_root set; a wrong model.pt stops it."""
    (tmp_path / "models").mkdir()
    torch.save(_net(18).state_dict(), tmp_path / "models" / "model.pt")
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser["bundle_root"] = str(tmp_path)
    with pytest.raises(RuntimeError, match="checked_network") as info:  # MONAI wraps the cause, which is ours
        parser.get_parsed_content("network_def", instantiate=True)
    assert isinstance(info.value.__cause__, BundleInputError) and "--backbone_depth 18" in str(info.value.__cause__)
    parser["backbone_depth"] = 18
    assert isinstance(parser.get_parsed_content("network_def", instantiate=True, lazy=False), SpineOne)


def test_bundle_run_stops_on_wrong_weights_before_inference(tmp_path):
    (tmp_path / "models").mkdir()
    torch.save(_net(18).state_dict(), tmp_path / "models" / "model.pt")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(ROOT / "configs" / "inference.json"),
        "--meta_file",
        str(ROOT / "configs" / "metadata.json"),
        "--ckpt_dir",
        str(tmp_path / "models"),
        "--output_dir",
        str(tmp_path / "out"),
        "--phantom_dir",
        str(tmp_path / "phantoms"),
        "--phantom_studies",
        "1",
        "--phantom_max_size",
        "256",
        "--num_workers",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "the weights do not fit the configured network" in result.stderr
    assert "--backbone_depth 18" in result.stderr
    assert not (tmp_path / "out").exists()  # nothing was inferred or written
