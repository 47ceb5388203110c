"""Model-zoo format: metadata schema, network in/out check, TorchScript export, packaging, runs from a copy."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import bundle
import pytest
import torch
import yaml
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

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


def _fake_bundle(root: Path, weights: bytes | None = None, demo_weights: bytes | None = None) -> Path:
    """A minimal bundle root: metadata, an inference config, the demo override and optional weights."""
    (root / "configs").mkdir(parents=True)
    (root / "models" / "demo").mkdir(parents=True)
    (root / "configs" / "metadata.json").write_text("{}\n")
    (root / "configs" / "inference.json").write_text(json.dumps({"backbone_depth": 50, "input_size": 640}) + "\n")
    demo = {"ckpt_dir": "$@bundle_root + '/models/demo'", "backbone_depth": 18, "input_size": 224, "max_epochs": 24}
    (root / "configs" / "demo.json").write_text(json.dumps(demo) + "\n")
    if weights is not None:
        (root / "models" / "model.pt").write_bytes(weights)
    if demo_weights is not None:
        (root / "models" / "demo" / "model.pt").write_bytes(demo_weights)
    return root


def _run_packager(*args: str) -> subprocess.CompletedProcess:
    script = str(ROOT / "scripts" / "package_bundle.py")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=120)


def test_package_contents_without_weights(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "models", "data", "eval", ".venv*", "outputs"))
    result = _run_packager("--src", str(src), "--out", str(tmp_path / "pkg"))
    assert result.returncode == 0, result.stderr
    assert "the copy has no weights" in result.stderr
    files = [str(p.relative_to(tmp_path / "pkg")) for p in (tmp_path / "pkg").rglob("*") if p.is_file()]
    for required in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "LICENSE",
        "README.md",
        "docs/README.md",
        "requirements.txt",
        "bundle/__init__.py",
        "scripts/package_bundle.py",
    ):
        assert required in files, required
    assert "large_files.yml" not in files and "models/model.pt" not in files  # never a placeholder entry
    assert not any(f.startswith(("tests/", "data/", "eval/", "outputs/", ".venv", ".git", "docs/dev/")) for f in files)
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert not {"setup.cfg", "pyproject.toml", ".ci/run"} & set(files)  # the zoo's own settings apply there
    result = _run_packager("--out", str(tmp_path / "pkg"))
    assert result.returncode != 0 and "not an empty folder" in result.stderr


def test_package_weights_small_large_published_or_local(tmp_path, monkeypatch):
    packager = _packager()
    src = _fake_bundle(tmp_path / "src", weights=b"0123456789")
    small = packager.package(src, tmp_path / "small")
    assert "models/model.pt" in small and "large_files.yml" not in small

    monkeypatch.setattr(packager, "MAX_SHIPPED_BYTES", 5)
    with pytest.raises(SystemExit, match=r"over the zoo's .* needs a real download URL and hash.*--weights-url URL"):
        packager.package(src, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    with pytest.raises(SystemExit, match="placeholder host"):
        packager.package(src, tmp_path / "placeholder", "https://example.invalid/spineone/model.pt")
    with pytest.raises(SystemExit, match="not an http"):
        packager.package(src, tmp_path / "nourl", "model.pt")

    large = packager.package(src, tmp_path / "large", weights_url="https://host.org/model.pt")
    assert "models/model.pt" not in large
    entry = yaml.safe_load((tmp_path / "large" / "large_files.yml").read_text())["large_files"][0]
    assert entry == {
        "path": "models/model.pt",
        "url": "https://host.org/model.pt",
        "hash_val": "781e5e245d69b566979b86e28d23f2c7",  # md5sum of b"0123456789"
        "hash_type": "md5",
    }
    packager.package(src, tmp_path / "sha", "https://host.org/model.pt", hash_type="sha256")
    entry = yaml.safe_load((tmp_path / "sha" / "large_files.yml").read_text())["large_files"][0]
    assert entry["hash_val"] == "84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882"
    with pytest.raises(SystemExit, match="differs from the md5"):
        packager.package(src, tmp_path / "wrong", "https://host.org/model.pt", weights_hash="0" * 32)

    local = packager.package(src, tmp_path / "local", local_weights=True)  # any size, for verify_bundle.py
    assert "models/model.pt" in local and "large_files.yml" not in local
    assert (tmp_path / "local" / "models" / "model.pt").read_bytes() == b"0123456789"

    bare = _fake_bundle(tmp_path / "bare")  # weights published elsewhere, not here
    with pytest.raises(SystemExit, match="pass --weights-hash"):
        packager.package(bare, tmp_path / "nohash", "https://host.org/model.pt")
    packager.package(bare, tmp_path / "hashed", "https://host.org/model.pt", weights_hash="AB" * 16)
    entry = yaml.safe_load((tmp_path / "hashed" / "large_files.yml").read_text())["large_files"][0]
    assert entry["hash_val"] == "ab" * 16
    with pytest.raises(SystemExit, match="not a md5 hex digest"):
        packager.package(bare, tmp_path / "badhash", "https://host.org/model.pt", weights_hash="xyz")
    with pytest.raises(SystemExit, match="--local-weights needs"):
        packager.package(bare, tmp_path / "nolocal", local_weights=True)
    result = _run_packager("--src", str(bare), "--out", str(tmp_path / "both"), "--demo", "--local-weights")
    assert result.returncode != 0 and "not allowed with argument" in result.stderr


def test_package_demo_writes_weights_and_overrides(tmp_path):
    src = _fake_bundle(tmp_path / "src", weights=b"trained", demo_weights=b"demo")
    result = _run_packager("--src", str(src), "--out", str(tmp_path / "pkg"), "--demo")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "pkg" / "models" / "model.pt").read_bytes() == b"demo"
    config = json.loads((tmp_path / "pkg" / "configs" / "inference.json").read_text())
    assert config == {"backbone_depth": 18, "input_size": 224}  # demo keys inference has, not ckpt_dir
    assert (tmp_path / "pkg" / "configs" / "inference.json").read_text().endswith("}\n")
    nodemo = _fake_bundle(tmp_path / "nodemo")
    result = _run_packager("--src", str(nodemo), "--out", str(tmp_path / "pkg2"), "--demo")
    assert result.returncode != 0 and "--demo needs" in result.stderr and "models/demo/model.pt" in result.stderr


def test_packaged_demo_copy_serves_as_it_is(tmp_path):
    """The real configs: a demo-shaped random model.pt in a bundle copy, packaged with --demo, passes the strict
    check and runs inference.json alone (no overrides but the data) on a phantom study."""
    src = tmp_path / "src"
    _packager().package(ROOT, src)
    torch.manual_seed(0)
    demo = json.loads((ROOT / "configs" / "demo.json").read_text())
    net = bundle.SpineOne({"disc": 3}, backbone_depth=demo["backbone_depth"], in_channels=7, attention=["pam", "cam"])
    (src / "models" / "demo").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), src / "models" / "demo" / "model.pt")
    out = tmp_path / "served"
    _packager().package(src, out, demo=True)
    served = json.loads((out / "configs" / "inference.json").read_text())
    for key in ("backbone_depth", "pixdim", "input_size", "radius"):
        assert served[key] == demo[key], key
    workflow = ConfigWorkflow(
        workflow_type="infer",
        config_file=str(out / "configs" / "inference.json"),
        meta_file=str(out / "configs" / "metadata.json"),
        logging_file=str(out / "configs" / "logging.conf"),
        bundle_root=str(out),
        phantom_studies=1,
        phantom_max_size=256,
        num_workers=0,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    studies = [p for p in (out / "outputs").iterdir() if p.is_dir()]
    points = json.loads((studies[0] / "keypoints.json").read_text())
    assert len(studies) == 1 and "keypoints" in points


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
