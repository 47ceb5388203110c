"""The README's main job, end to end on a fresh bundle root: train the CPU demo model on phantoms,
evaluate it on a held-out phantom set (another seed), run inference, and check every output.

This is the suite's one slow test (about 10 minutes on 2 cores). Acceptance figures: PCK-6 >= 0.95 and
macro F1 >= 0.85 for the RSNA-layout stream on the held-out set.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundle.phantoms import PHI_MARKER

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TRAIN = (
    "python -m monai.bundle run training --meta_file configs/metadata.json"
    " --config_file \"['configs/train.json','configs/demo.json']\" --logging_file configs/logging.conf"
)
INFER = (
    "python -m monai.bundle run --meta_file configs/metadata.json"
    " --config_file \"['configs/inference.json','configs/demo.json']\" --logging_file configs/logging.conf"
)


def _run(args: list[str], root: Path, log: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    text = result.stdout + result.stderr
    log.write_text(text)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{text[-4000:]}"
    return text


def _bundle(args: str) -> list[str]:
    """A README command as an argument list, run with this interpreter."""
    import shlex

    words = shlex.split(args)
    assert words[:3] == ["python", "-m", "monai.bundle"]
    return [sys.executable, *words[1:]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    assert TRAIN in README and INFER in README, "the README's main-job commands changed: update this test"
    root = tmp_path_factory.mktemp("bundle_root")
    logs = {"train": _run(_bundle(TRAIN) + ["--bundle_root", str(root)], root, root / "train.log")}
    heldout = root / "heldout"
    _run(
        [
            sys.executable,
            "scripts/make_phantoms.py",
            "--layout",
            "rsna",
            "--out",
            str(heldout),
            "--studies",
            "20",
            "--seed",
            "7",
        ],
        root,
        root / "phantoms.log",
    )
    evaluate = (
        "python -m monai.bundle run --config_file \"['configs/train.json','configs/evaluate.json',"
        "'configs/demo.json']\" --logging_file configs/logging.conf"
    )
    logs["evaluate"] = _run(
        _bundle(evaluate)
        + ["--bundle_root", str(root), "--dataset_dir", str(heldout), "--output_dir", str(root / "eval_heldout")],
        root,
        root / "evaluate.log",
    )
    logs["infer"] = _run(_bundle(INFER) + ["--bundle_root", str(root)], root, root / "infer.log")
    return root, logs


def test_demo_model_reaches_acceptance_on_heldout_phantoms(demo):
    root, _ = demo
    metrics = json.loads((root / "eval_heldout" / "metrics.json").read_text())
    disc = metrics["streams"]["disc"]
    print(
        json.dumps(
            {
                "pck": disc["pck"],
                "macro_f1": disc["macro_f1"],
                "micro_precision": disc["micro_precision"],
                "rsna": metrics.get("rsna"),
            },
            indent=1,
        )
    )
    assert disc["pck"]["6"] >= 0.95
    assert disc["macro_f1"] >= 0.85
    assert set(disc["confusion_matrix"][0]) and len(disc["confusion_matrix"]) == 3
    assert {"spinal", "any_severe_spinal", "score"} <= set(metrics["rsna"])
    for name in ("pck_curve.png", "confusion_disc.png"):
        assert (root / "eval_heldout" / name).stat().st_size > 1000


def test_training_wrote_models_and_logs(demo):
    root, logs = demo
    assert (root / "models" / "demo" / "model.pt").is_file()
    assert (root / "models" / "demo" / "checkpoint.pt").is_file()
    assert "objective association on" in logs["train"]
    assert "disc_heatmap" in logs["train"] and "disc_offset" in logs["train"]
    assert list((root / "eval" / "runs").iterdir()), "no TensorBoard event file"


def test_inference_outputs_exist_and_validate(demo):
    root, _ = demo
    outputs = root / "outputs"
    studies = sorted(p for p in outputs.iterdir() if p.is_dir())
    assert len(studies) == 2
    for study in studies:
        content = json.loads((study / "keypoints.json").read_text())
        assert content["study_id"] == study.name
        assert {"series_id", "instance_number", "keypoints"} <= set(content)
        levels = [k["level"] for k in content["keypoints"]]
        assert levels == ["L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]
        for point in content["keypoints"]:
            assert point["stream"] == "disc" and point["label"] in point["probabilities"]
            assert sum(point["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
            assert len(point["position_mm"]) == 3 and point["x"] > 0 and point["y"] > 0
        assert (study / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(outputs / "submission.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 25 * len(studies)
    assert all(abs(sum(float(r[k]) for k in ("normal_mild", "moderate", "severe")) - 1) < 1e-3 for r in rows)


def test_no_patient_identifier_in_any_output_or_log(demo):
    root, logs = demo
    for name, text in logs.items():
        assert PHI_MARKER not in text, f"{name} log carries a patient identifier"
    for folder in ("outputs", "eval_heldout", "eval", "models"):
        for path in (root / folder).rglob("*"):
            if path.is_file():
                assert PHI_MARKER.encode() not in path.read_bytes(), f"{path} carries a patient identifier"
