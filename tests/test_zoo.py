"""Model-zoo format: metadata schema, network in/out check, TorchScript export, packaging, runs from a copy."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import bundle
import pytest
import torch
import yaml
from monai.bundle import verify_metadata, verify_net_in_out

ROOT = Path(__file__).resolve().parents[1]
TINY = [
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
    "--phantom_studies",
    "6",
    "--phantom_max_size",
    "256",
    "--cache_rate",
    "0",
]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", **extra}


def test_metadata_passes_schema_and_zoo_rules(tmp_path, meta_schema):
    schema = meta_schema
    verify_metadata(meta_file=str(ROOT / "configs" / "metadata.json"), filepath=str(schema))
    meta = json.loads((ROOT / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"] and meta["version"] == bundle.__version__
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert len(pred["channel_def"]) == pred["num_channels"]
    broken = dict(meta)
    del broken["network_data_format"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="'network_data_format' is a required property"):  # the check is real
        verify_metadata(meta_file=str(tmp_path / "broken.json"), filepath=str(schema))


def test_verify_net_in_out_one_tensor_with_metadata_channels():
    kwargs = {
        "net_id": "network_def",
        "meta_file": str(ROOT / "configs" / "metadata.json"),
        "config_file": str(ROOT / "configs" / "inference.json"),
        "device": "cpu",
        "backbone_depth": 18,
        "_meta_#network_data_format#inputs#image#spatial_shape": [128, 128],
    }
    verify_net_in_out(**kwargs)
    with pytest.raises(ValueError, match="channel number"):  # Tianchi's two streams give 18 channels, not 9
        verify_net_in_out(**kwargs, dataset_format="tianchi")


def test_ckpt_export_torchscript_matches_eager(tmp_path):
    torch.manual_seed(0)
    net = bundle.SpineOne({"disc": 3}, backbone_depth=18, in_channels=7, attention=["pam", "cam"], pam_impl="fused")
    torch.save(net.state_dict(), tmp_path / "model.pt")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "--net_id",
        "network_def",
        "--filepath",
        str(tmp_path / "model.ts"),
        "--ckpt_file",
        str(tmp_path / "model.pt"),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--backbone_depth",
        "18",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=_env(), timeout=120)
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    net.eval()
    x = torch.randn(1, 7, 96, 128)
    with torch.no_grad():
        eager, exported = net(x), scripted(x)
    assert exported.shape == eager.shape == (1, 9, 24, 32)
    torch.testing.assert_close(exported, eager, atol=1e-4, rtol=0)


def _packager():
    spec = importlib.util.spec_from_file_location("package_bundle", ROOT / "scripts" / "package_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_package_contents_and_large_files(tmp_path, monkeypatch):
    packager = _packager()
    out = tmp_path / "pkg"
    files = packager.package(ROOT, out)
    for required in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "LICENSE",
        "README.md",
        "docs/README.md",
        "models/README.md",
        "requirements.txt",
        "bundle/__init__.py",
        "scripts/package_bundle.py",
        "large_files.yml",
    ):
        assert required in files, required
    assert not any(f.startswith(("tests/", "data/", "eval/", "outputs/", ".venv", ".git", "docs/dev/")) for f in files)
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    if not (ROOT / "models" / "model.pt").is_file():
        entry = yaml.safe_load((out / "large_files.yml").read_text())["large_files"][0]
        assert entry["path"] == "models/model.pt" and entry["url"] and entry["hash_type"] == "md5"
    # refuses a non-empty folder
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "package_bundle.py"), "--out", str(out)], capture_output=True, text=True
    )
    assert result.returncode != 0 and "not an empty folder" in result.stderr

    # a small model.pt is shipped, a large one is listed with its hash
    src = tmp_path / "src"
    (src / "configs").mkdir(parents=True)
    (src / "models").mkdir()
    (src / "configs" / "metadata.json").write_text("{}")
    (src / "models" / "model.pt").write_bytes(b"0123456789")
    small = packager.package(src, tmp_path / "small")
    assert "models/model.pt" in small and "large_files.yml" not in small
    monkeypatch.setattr(packager, "MAX_SHIPPED_BYTES", 5)
    large = packager.package(src, tmp_path / "large", weights_url="https://host/model.pt")
    assert "models/model.pt" not in large
    entry = yaml.safe_load((tmp_path / "large" / "large_files.yml").read_text())["large_files"][0]
    assert entry == {
        "path": "models/model.pt",
        "url": "https://host/model.pt",
        "hash_val": "781e5e245d69b566979b86e28d23f2c7",
        "hash_type": "md5",
    }


def test_packaged_copy_trains_from_another_directory(tmp_path):
    pkg = tmp_path / "spineone"
    packager = [sys.executable, str(ROOT / "scripts" / "package_bundle.py"), "--out", str(pkg)]
    subprocess.run(packager, check=True, timeout=60)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    configs = f"['{pkg}/configs/train.json','{pkg}/configs/demo.json']"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--meta_file",
        f"{pkg}/configs/metadata.json",
        "--config_file",
        configs,
        "--logging_file",
        f"{pkg}/configs/logging.conf",
        "--bundle_root",
        str(pkg),
        *TINY,
    ]
    env = _env(PYTHONPATH=str(pkg))
    result = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # every path derives from bundle_root: phantoms, checkpoints and logs land in the copy, nothing in the cwd
    assert (pkg / "data" / "phantoms_rsna" / "train.csv").is_file()
    assert (pkg / "models" / "demo" / "checkpoint.pt").is_file() and (pkg / "models" / "demo" / "model.pt").is_file()
    assert any((pkg / "eval" / "runs").iterdir())
    assert list(elsewhere.iterdir()) == []
    state = torch.load(pkg / "models" / "demo" / "model.pt", map_location="cpu", weights_only=True)
    assert "backbone.conv1.weight" in state
