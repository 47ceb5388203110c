"""Workflow glue and configs: streams per format, data-set preparation, datalists, study discovery,
config conventions, and a tiny `monai.bundle run` training that resumes after an interruption."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bundle.errors import BundleInputError
from bundle.phantoms import generate_phantoms
from bundle.streams import TIANCHI_STREAMS, class_counts
from bundle.studies import find_studies
from bundle.workflow import default_streams, load_datalist, prepare_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_default_streams_per_format():
    rsna = default_streams("rsna")
    assert list(rsna) == ["disc"] and rsna["disc"]["classes"] == ["Normal/Mild", "Moderate", "Severe"]
    tianchi = default_streams("tianchi")
    assert list(tianchi) == ["disc", "vertebra"] and len(tianchi["disc"]["levels"]) == 6
    assert class_counts(tianchi) == {"disc": 2, "vertebra": 2}
    with pytest.raises(ValueError, match="dataset_format"):
        default_streams("kaggle")


def test_prepare_dataset_never_invents_real_data(tmp_path):
    with pytest.raises(BundleInputError, match="does not exist"):
        prepare_dataset(tmp_path / "typo", "rsna", phantom_dir=tmp_path / "phantoms")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleInputError, match="not a folder"):
        prepare_dataset(tmp_path / "file", "rsna")


@pytest.fixture(scope="module")
def rsna_phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    return Path(prepare_dataset(root / "ph", "rsna", phantom_dir=root / "ph", phantom_studies=5, phantom_max_size=256))


@pytest.fixture(scope="module")
def tianchi_phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("tianchi") / "ph"
    return generate_phantoms(root, layout="tianchi", studies=2, seed=3, max_size=256)


def test_phantom_dataset_generated_on_first_use_and_split(rsna_phantoms):
    assert (rsna_phantoms / "train.csv").is_file()
    training = load_datalist(rsna_phantoms, "rsna", "training", folds=5, fold=0)
    validation = load_datalist(rsna_phantoms, "rsna", "validation", folds=5, fold=0)
    everything = load_datalist(rsna_phantoms, "rsna", "all")
    assert len(training) + len(validation) == len(everything) == 5
    assert not {i["study_id"] for i in training} & {i["study_id"] for i in validation}


def test_explicit_datalist_file(tmp_path, rsna_phantoms):
    items = load_datalist(rsna_phantoms, "rsna", "all")
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items[:3], "validation": items[3:]}))
    assert load_datalist("unused", "rsna", "validation", datalist=path) == items[3:]
    assert len(load_datalist("unused", "rsna", "all", datalist=path)) == 5
    with pytest.raises(BundleInputError, match="datalist"):
        load_datalist("unused", "rsna", "training", datalist=tmp_path / "missing.json")


def test_find_studies_rsna_layout_picks_sagittal_t2(rsna_phantoms):
    items = find_studies(rsna_phantoms)
    descriptions = {}
    with open(rsna_phantoms / "train_series_descriptions.csv") as f:
        next(f)
        for line in f:
            study, series, desc = line.strip().split(",", 2)
            descriptions[(study, series)] = desc
    assert len(items) == 5
    for item in items:
        assert descriptions[(item["study_id"], item["series_id"])] == "Sagittal T2/STIR"
        assert all(Path(f).parent.name == item["series_id"] for f in item["image"])


def test_find_studies_tianchi_and_single_folder(tianchi_phantoms):
    annotation = json.loads((tianchi_phantoms / "lumbar_train_annotation.json").read_text())
    series_uids = {s["data"][0]["seriesUid"] for s in annotation}
    items = find_studies(tianchi_phantoms)
    assert sorted(i["study_id"] for i in items) == ["study0", "study1"]
    assert {i["series_id"] for i in items} == series_uids
    single = find_studies(tianchi_phantoms / "lumbar_train" / "study1")
    assert len(single) == 1 and single[0]["series_id"] in series_uids


def test_find_studies_errors(tmp_path):
    with pytest.raises(BundleInputError, match="not an existing folder"):
        find_studies(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleInputError, match="no DICOM"):
        find_studies(tmp_path / "empty")


def _json_keys(name: str) -> set[str]:
    return set(json.loads((CONFIGS / name).read_text()))


def test_configs_are_indented_json_with_standard_properties():
    for path in CONFIGS.glob("*.json"):
        text = path.read_text()
        assert text == json.dumps(json.loads(text), indent=4) + "\n", f"{path.name} is not indented by 4"
    train = _json_keys("train.json")
    assert {"bundle_root", "device", "dataset_dir", "output_dir", "network_def", "training", "run"} <= train
    assert {"bundle_root", "device", "dataset_dir", "dataset", "evaluator", "network_def", "inferer"} <= _json_keys(
        "inference.json"
    )


def test_demo_overrides_only_top_level_keys_and_the_codec_of_every_workflow():
    demo = _json_keys("demo.json")
    train = _json_keys("train.json")
    assert {key.split("#")[0] for key in demo} <= train
    assert all(key.startswith("codec#") for key in demo if "#" in key)  # the codec is declared in every workflow
    shared = {key for key in demo if key.split("#")[0] in _json_keys("inference.json")}
    assert {"ckpt_dir", "backbone_depth", "pixdim", "input_size", "codec#radius", "batch_size"} <= shared
    from monai.bundle import ConfigParser

    for files in (
        ["train.json", "demo.json"],
        ["train.json", "evaluate.json", "demo.json"],
        ["inference.json", "demo.json"],
    ):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        assert parser.get_parsed_content("backbone_depth") == 18
        assert parser["ckpt_dir"].endswith("/models/demo'")
        assert parser["codec"]["radius"] == 4.0 and parser["codec"]["target_stride"] == 1


# an input size as prose states it: "224 input", "224 x 224 input", "256 px", "256 pixels"
_STATED_SIZE = re.compile(
    r"(?<![\d.])(\d+)(?:\s*x\s*(\d+))?\s*(?:px|pixels?)?\s+input\b|(?<![\d.])(\d+)\s*(?:px|pixels)\b"
)


def _blocks_naming(text: str, name: str) -> list[str]:
    """Paragraphs (blank-line separated; each table row on its own) of a Markdown ``text`` that contain ``name``."""
    blocks = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        blocks += [line for line in lines if line.lstrip().startswith("|")]
        blocks.append("\n".join(line for line in lines if not line.lstrip().startswith("|")))
    return [b for b in blocks if name in b]


def test_docs_state_the_demo_input_size_of_demo_json():
    """configs/demo.json is the one source of the demo's settings: models/README.md refers to it, and where a
    README's paragraph or table row naming it states an input size, that size is demo.json's."""
    size = json.loads((CONFIGS / "demo.json").read_text())["input_size"]
    assert "configs/demo.json" in (ROOT / "models" / "README.md").read_text()
    assert _blocks_naming("a\n\n| `x` | 9 px |\n| `y` | 8 px |", "`y`") == ["| `y` | 8 px |"]
    assert [m.group(0) for m in _STATED_SIZE.finditer("1.3125 mm pixels, 256 px, 224 x 224 input")] == [
        "256 px",
        "224 x 224 input",
    ]
    stated = {}
    for doc in (ROOT / "models" / "README.md", ROOT / "docs" / "README.md", ROOT / "README.md"):
        for block in _blocks_naming(doc.read_text(), "configs/demo.json"):
            for match in _STATED_SIZE.finditer(block):
                numbers = {int(n) for n in match.groups() if n is not None}
                stated[f"{doc.relative_to(ROOT)}: {match.group(0)!r}"] = numbers
    wrong = [where for where, numbers in stated.items() if numbers != {size}]
    assert not wrong, f"configs/demo.json has input_size {size}; these say otherwise: {wrong}"


def test_metadata_verifies_against_offline_schema(meta_schema):
    local = meta_schema
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(CONFIGS / "metadata.json"),
            "--filepath",
            str(local),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


TINY = [
    "--backbone_depth",
    "18",
    "--pixdim",
    "4.375",
    "--input_size",
    "64",
    "--batch_size",
    "2",
    "--num_workers",
    "0",
    "--phantom_studies",
    "5",
    "--phantom_max_size",
    "256",
    "--codec#radius",
    "2.0",
    "--learning_rate",
    "0.0005",
]


def _bundle_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args, "--bundle_root", str(tmp_path), *TINY],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


def test_tiny_training_resumes_from_last_full_state(tmp_path):
    train = [
        "training",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/train.json",
        "--logging_file",
        "configs/logging.conf",
    ]
    first = _bundle_run(tmp_path, *train, "--max_epochs", "1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = tmp_path / "models" / "checkpoint.pt"
    assert state.is_file() and (tmp_path / "models" / "model.pt").is_file()
    import torch

    saved = torch.load(state, weights_only=True)
    trainer = saved["trainer"]  # ignite keeps iteration and epoch_length; epochs done = their ratio
    assert trainer["iteration"] == trainer["epoch_length"] and {"model", "optimizer", "lr_scheduler"} <= set(saved)
    # "interrupted" after epoch 1 of 2: the same command continues with epoch 2 only
    second = _bundle_run(tmp_path, *train, "--max_epochs", "2")
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "resumed from" in log and "at epoch 1" in log
    assert "Epoch: 1/2" not in log and "Epoch: 2/2" in log
    trainer = torch.load(state, weights_only=True)["trainer"]
    assert trainer["iteration"] == 2 * trainer["epoch_length"]


def test_tiny_tianchi_train_evaluate_infer(tmp_path):
    """The Tianchi reader, two streams (disc, vertebra) and every workflow, on 5 phantom studies."""
    fmt = ["--dataset_format", "tianchi"]
    train = _bundle_run(tmp_path, "training", "--config_file", "configs/train.json", "--max_epochs", "1", *fmt)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    evaluate = _bundle_run(
        tmp_path,
        "run",
        "--config_file",
        "['configs/train.json','configs/evaluate.json']",
        "--output_dir",
        str(tmp_path / "ev"),
        *fmt,
    )
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["streams"]) == {"disc", "vertebra"}
    assert metrics["streams"]["vertebra"]["class_names"] == ["Normal", "Degenerative"]
    assert "rsna" not in metrics and not (tmp_path / "ev" / "predictions" / "submission.csv").exists()
    infer = _bundle_run(
        tmp_path,
        "run",
        "--config_file",
        "configs/inference.json",
        "--output_dir",
        str(tmp_path / "inf"),
        "--dataset_dir",
        str(tmp_path / "data" / "phantoms_tianchi"),
        *fmt,
    )
    assert infer.returncode == 0, infer.stdout[-3000:] + infer.stderr[-3000:]
    content = json.loads((tmp_path / "inf" / "study0" / "keypoints.json").read_text())
    levels = [(k["stream"], k["level"]) for k in content["keypoints"]]
    named = {("disc", lv) for lv in TIANCHI_STREAMS[0].levels} | {("vertebra", lv) for lv in TIANCHI_STREAMS[1].levels}
    # one entry per level found (a 1-epoch model finds some); a level not found is absent, none is repeated
    assert levels and set(levels) <= named and len(set(levels)) == len(levels)
    assert all(0.0 <= k["level_confidence"] <= 1.0 for k in content["keypoints"])


def test_persistent_cache_config_reuses_decoded_series(tmp_path):
    """configs/persistent_cache.json swaps the in-memory CacheDataset for an on-disk PersistentDataset."""
    args = ["training", "--config_file", "['configs/train.json','configs/persistent_cache.json']", "--max_epochs"]
    first = _bundle_run(tmp_path, *args, "1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    cached = sorted((tmp_path / "eval" / "cache" / "train").glob("*.pt"))
    assert len(cached) == 4 and len(list((tmp_path / "eval" / "cache" / "validate").glob("*.pt"))) == 1
    stamps = [p.stat().st_mtime_ns for p in cached]
    second = _bundle_run(tmp_path, *args, "2")  # resumes; the second epoch reads the cache, writes nothing new
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_demo_training_crop_keeps_the_field_of_view_and_shifts_it_vertically():
    """The demo's random training crop (configs/demo.json) holds the whole resampled input, placed at a random
    row over ``vertical_shift_px`` rows: the level map cannot read a level off the image row, and no crop cuts
    off the sacrum. The pad and crop are the configured transforms themselves, on a constant image."""
    import torch
    from monai.bundle import ConfigParser
    from monai.data import MetaTensor

    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "demo.json")])
    size, shift = parser.get_parsed_content("input_size"), parser.get_parsed_content("vertical_shift_px")
    crop = parser.get_parsed_content("crop_size")
    assert shift > 0 and crop[0] == size + shift and crop[1] <= size
    transforms = parser.get_parsed_content("train#random_transforms")
    pad_crop = [t for t in transforms if type(t).__name__ in ("SpatialPadd", "RandSpatialCropd")]
    assert [type(t).__name__ for t in pad_crop] == ["SpatialPadd", "RandSpatialCropd"]
    tops = set()
    for seed in range(30):
        data = {"image": MetaTensor(torch.ones(1, size, size))}
        for t in pad_crop:
            if hasattr(t, "set_random_state"):
                t.set_random_state(seed)
            data = t(data)
        rows = data["image"][0].sum(dim=1).nonzero()[:, 0]
        assert tuple(data["image"].shape[1:]) == tuple(crop)
        assert len(rows) == size and int(rows[-1] - rows[0]) == size - 1  # every input row, none cut
        tops.add(int(rows[0]))
    assert len(tops) > 10 and min(tops) >= 0 and max(tops) <= shift
    base = ConfigParser()
    base.read_config(str(CONFIGS / "train.json"))
    assert base.get_parsed_content("vertical_shift_px") == 0  # the default adds nothing
