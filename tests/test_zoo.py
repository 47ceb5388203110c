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
from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from stream_fixtures import streams

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


def test_verify_net_in_out_one_tensor_with_metadata_channels(tmp_path):
    kwargs = {
        "net_id": "network_def",
        "meta_file": str(ROOT / "configs" / "metadata.json"),
        "config_file": str(ROOT / "configs" / "inference.json"),
        "device": "cpu",
        "backbone_depth": 18,
        "ckpt_dir": str(tmp_path),  # no weights: the repository's own models/model.pt may be any model
        "_meta_#network_data_format#inputs#image#spatial_shape": [128, 128],
    }
    verify_net_in_out(**kwargs)
    with pytest.raises(ValueError, match="channel number"):  # Tianchi's two streams give 20 channels, not 10
        verify_net_in_out(**kwargs, dataset_format="tianchi")


def test_ckpt_export_torchscript_matches_eager(tmp_path):
    torch.manual_seed(0)
    net = bundle.SpineOne(streams(disc=3), backbone_depth=18, in_channels=7, attention=["pam", "cam"], pam_impl="fused")
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
        "--ckpt_dir",
        str(tmp_path),  # network_def checks the exported weights, not the repository's models/model.pt
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=_env(), timeout=120)
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    net.eval()
    x = torch.randn(1, 7, 96, 128)
    with torch.no_grad():
        eager, exported = net(x), scripted(x)
    assert exported.shape == eager.shape == (1, 10, 24, 32)
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
    app = src / "scripts" / "monailabel_app"
    for runtime in ("bin", "lib", "logs", "model"):  # what a MONAI Label server run makes beside its main.py
        (app / runtime).mkdir(exist_ok=True)
    (app / "logs" / "app.log").write_text("Infer Request: {'image': 'a_study_id'}\n")
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
        "scripts/monailabel_app/main.py",
    ):
        assert required in files, required
    assert not any(f.startswith("scripts/monailabel_app/") for f in set(files) - {"scripts/monailabel_app/main.py"})
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

    none = packager.package(src, tmp_path / "none", no_weights=True)  # code and configs only, even over 25 MB
    assert "models/model.pt" not in none and "large_files.yml" not in none and "configs/inference.json" in none
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
    with pytest.raises(SystemExit, match="choose one of"):
        packager.package(src, tmp_path / "two", demo=True, no_weights=True)
    result = _run_packager("--src", str(src), "--out", str(tmp_path / "cli-none"), "--no-weights")
    assert result.returncode == 0 and not (tmp_path / "cli-none" / "models" / "model.pt").exists(), result.stderr


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
    _packager().package(ROOT, src, no_weights=True)  # whatever weights the repository's models/ holds
    torch.manual_seed(0)
    demo = json.loads((ROOT / "configs" / "demo.json").read_text())
    net = bundle.SpineOne(
        streams(disc=3), backbone_depth=demo["backbone_depth"], in_channels=7, attention=["pam", "cam"]
    )
    (src / "models" / "demo").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), src / "models" / "demo" / "model.pt")
    out = tmp_path / "served"
    _packager().package(src, out, demo=True)
    served = json.loads((out / "configs" / "inference.json").read_text())
    for key in ("backbone_depth", "pixdim", "input_size"):
        assert served[key] == demo[key], key
    assert served["codec"]["radius"] == demo["codec#radius"]
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
    packager = [sys.executable, str(ROOT / "scripts" / "package_bundle.py"), "--out", str(pkg), "--no-weights"]
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


ZOO_NAME = "spineone_lumbar_mri_keypoints"  # the bundle's folder name under the zoo's models/
ZOO_UNIT_TEST = ROOT / "tests" / "zoo_ci" / f"test_{ZOO_NAME}.py"


def _zoo_checkout(tmp_path: Path, *package_args: str, src: Path = ROOT) -> Path:
    """A zoo-shaped folder: the packaged bundle at models/<name>/ and the zoo-layout unit test in ci/unit_tests/."""
    zoo = tmp_path / "zoo"
    package_args = package_args or ("--no-weights",)  # not the repository's own (maybe large) models/model.pt
    result = _run_packager("--src", str(src), "--out", str(zoo / "models" / ZOO_NAME), *package_args)
    assert result.returncode == 0, result.stderr
    (zoo / "ci" / "unit_tests").mkdir(parents=True)
    shutil.copy(ZOO_UNIT_TEST, zoo / "ci" / "unit_tests" / ZOO_UNIT_TEST.name)
    return zoo


def test_zoo_layout_unit_test_trains_then_infers(tmp_path):
    """The zoo's way: from the zoo root, PYTHONPATH the zoo root, ConfigWorkflow train then inference."""
    zoo = _zoo_checkout(tmp_path)
    bundle_dir = zoo / "models" / ZOO_NAME

    def listing() -> set[str]:
        return {str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*") if "__pycache__" not in p.parts}

    before = listing()
    cmd = [sys.executable, str(Path("ci") / "unit_tests" / ZOO_UNIT_TEST.name)]
    result = subprocess.run(cmd, cwd=zoo, env=_env(PYTHONPATH=str(zoo)), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ran 2 tests" in result.stderr and result.stderr.rstrip().endswith("OK")
    assert listing() == before  # phantoms, weights and outputs went to a temporary folder, not into the bundle


def _verify_offline(bundle_root: Path, schema: Path) -> None:
    """What the zoo's ``verify_bundle.py`` checks, without its download step: required and preferred files,
    ``large_files.yml`` complete, version in the changelog, metadata against the schema, the network's input
    and output against the metadata, and the TorchScript export of models/model.pt."""
    packager = _packager()
    for name in ("configs/metadata.json", "LICENSE", "configs/inference.json"):
        assert (bundle_root / name).is_file(), name
    large = bundle_root / "large_files.yml"
    if large.exists():
        entries = yaml.safe_load(large.read_text())["large_files"]
        assert [e["path"] for e in entries] == ["models/model.pt"]
        for entry in entries:
            packager.check_weights_url(entry["url"])
            assert entry["hash_type"] in packager.HASH_TYPES and len(entry["hash_val"]) >= 32
    else:
        assert (bundle_root / "models" / "model.pt").is_file()
    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    verify_metadata(meta_file=str(bundle_root / "configs" / "metadata.json"), filepath=str(schema))
    common = {
        "net_id": "network_def",
        "meta_file": str(bundle_root / "configs" / "metadata.json"),
        "config_file": str(bundle_root / "configs" / "inference.json"),
        "bundle_root": str(bundle_root),
    }
    verify_net_in_out(**common, device="cpu", **{"_meta_#network_data_format#inputs#image#spatial_shape": [128, 128]})
    if not large.exists():
        ts = bundle_root / "models" / "verify_model.ts"
        ckpt_export(**common, filepath=str(ts), ckpt_file=str(bundle_root / "models" / "model.pt"))
        assert torch.jit.load(str(ts))(torch.randn(1, 7, 64, 64)).shape == (1, 10, 16, 16)


def test_packaged_copy_passes_verify_bundle_checks_offline(tmp_path, meta_schema, monkeypatch):
    import monai.apps.utils

    def no_download(*args, **kwargs):
        raise AssertionError(f"downloads nothing: {args} {kwargs}")

    monkeypatch.setattr(monai.apps.utils, "download_url", no_download)
    src = tmp_path / "src"
    _packager().package(ROOT, src, no_weights=True)  # whatever weights the repository's models/ holds
    config = json.loads((src / "configs" / "inference.json").read_text())
    config["backbone_depth"] = 18  # a small network, as a copy for a demo-sized model would configure it
    (src / "configs" / "inference.json").write_text(json.dumps(config, indent=4) + "\n")
    torch.manual_seed(0)
    net = bundle.SpineOne(streams(disc=3), backbone_depth=18, in_channels=7, attention=["pam", "cam"])
    (src / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), src / "models" / "model.pt")

    local = _zoo_checkout(tmp_path / "local", "--local-weights", src=src) / "models" / ZOO_NAME
    _verify_offline(local, meta_schema)
    published = _zoo_checkout(tmp_path / "url", "--weights-url", "https://host.org/v0.1.0/model.pt", src=src)
    _verify_offline(published / "models" / ZOO_NAME, meta_schema)
    assert not (published / "models" / ZOO_NAME / "models" / "model.pt").exists()


def _zoo_settings(zoo: Path) -> None:
    """The zoo root's format settings: this repository's (which copy the zoo's), without the hint that makes
    ``bundle`` third-party here; from the zoo root isort must find that on its own."""
    cfg = (ROOT / "setup.cfg").read_text()
    assert "known_third_party = bundle\n" in cfg
    (zoo / "setup.cfg").write_text(cfg.replace("known_third_party = bundle\n", ""))
    shutil.copy(ROOT / "pyproject.toml", zoo / "pyproject.toml")


def _is_text(path: Path) -> bool:
    """Text as pre-commit's file classification decides it: no NUL byte in the first 8 kB."""
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("black", "isort", "flake8", "pre_commit_hooks")),
    reason="the format tools of requirements-dev.txt are not installed",
)
def test_packaged_copy_passes_zoo_format_checks(tmp_path):
    zoo = _zoo_checkout(tmp_path)
    _zoo_settings(zoo)
    bundle_dir = zoo / "models" / ZOO_NAME
    for tool in (["isort", "--check", "--diff"], ["black", "--skip-magic-trailing-comma", "--check"], ["flake8"]):
        result = subprocess.run([sys.executable, "-m", *tool, str(zoo)], cwd=zoo, capture_output=True, text=True)
        assert result.returncode == 0, (tool, result.stdout[-3000:], result.stderr[-3000:])
    files = [p for p in bundle_dir.rglob("*") if p.is_file()]
    text = [str(p) for p in files if _is_text(p)]  # pre-commit runs the text hooks on text files only
    assert len(text) < len(files)  # the docs figure (PNG) is packaged and left to the size check
    hooks = {
        "pretty_format_json": ["--no-sort-keys", "--indent=4", *[str(p) for p in files if p.suffix == ".json"]],
        "end_of_file_fixer": text,
        "trailing_whitespace_fixer": text,
        "mixed_line_ending": ["--fix=no", *text],
        "check_yaml": [str(p) for p in files if p.suffix in (".yml", ".yaml")],
        "check_docstring_first": [str(p) for p in files if p.suffix == ".py"],
        "check_executables_have_shebangs": [str(p) for p in files if os.access(p, os.X_OK)],
    }
    for hook, args in hooks.items():
        if not args or args[-1].startswith("--"):
            continue
        result = subprocess.run(
            [sys.executable, "-m", f"pre_commit_hooks.{hook}", *args], capture_output=True, text=True
        )
        assert result.returncode == 0, (hook, result.stdout[-3000:])
    assert max(p.stat().st_size for p in files) <= 1024 * 1024  # the zoo's check-added-large-files limit


ZOO_README_SECTIONS = (
    "## Model Overview",
    "## Data",
    "## Training configuration",
    "## Performance",
    "## MONAI Bundle Commands",
    "## System Configuration",
    "## Limitations",
    "## References",
    "## License",
)


def test_docs_readme_follows_the_zoo_template_sections_in_order():
    headers = [
        line.strip() for line in (ROOT / "docs" / "README.md").read_text().splitlines() if line.startswith("## ")
    ]
    positions = [headers.index(section) for section in ZOO_README_SECTIONS if section in headers]
    missing = [section for section in ZOO_README_SECTIONS if section not in headers]
    assert not missing, f"docs/README.md lacks the zoo template section(s) {missing}"
    assert positions == sorted(positions), f"docs/README.md sections out of the template's order: {headers}"


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        requirement = line.split("#")[0].strip()
        if "==" in requirement:
            name, version = requirement.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_metadata_pins_match_requirements_and_state_the_python_version():
    metadata = json.loads((ROOT / "configs" / "metadata.json").read_text())
    pinned = _pins((ROOT / "requirements.txt").read_text().splitlines())
    declared = {name.lower(): version for name, version in metadata["required_packages_version"].items()}
    declared.update(torch=metadata["pytorch_version"], numpy=metadata["numpy_version"], monai=metadata["monai_version"])
    differing = {
        name: (version, pinned[name]) for name, version in declared.items() if pinned.get(name, version) != version
    }
    assert not differing, f"metadata.json and requirements.txt pin different versions: {differing}"
    assert "Python 3.11 or newer" in metadata["description"]
