"""Real-data layouts (issue 10): the weighted constant prediction, CSV quirks of real files."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle import InPlaneSpacingd, LoadSagittalSeriesd
from bundle.errors import BundleInputError
from bundle.handlers import KeypointDetectionMetric
from bundle.options import check_overrides
from bundle.outputs import RSNA_CLASS_FREQUENCIES, RSNA_PRIOR, KeypointsWriter, best_constant, read_rsna_prior
from bundle.phantoms import generate_phantoms
from bundle.rsna_metric import CONDITIONS, LABEL_COLUMNS, SAMPLE_WEIGHTS, weighted_log_loss
from bundle.skipping import SKIPPED_KEY, SkippedStudiesWriter, skip_unusable, skipped_reasons
from bundle.streams import RSNA_STREAMS
from bundle.studies import find_studies
from bundle.workflow import inference_datalist, load_datalist
from ignite.engine import Engine
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose, NormalizeIntensityd, ResizeWithPadOrCropd
from stream_fixtures import streams


def _constant_loss(labels: np.ndarray, p: np.ndarray) -> float:
    """The competition's weighted log loss of one constant prediction ``p`` (3,) for every row."""
    weights = np.asarray(SAMPLE_WEIGHTS)[labels]
    return weighted_log_loss(labels, np.tile(p, (len(labels), 1)), weights)


def test_best_constant_by_hand_and_by_brute_force():
    labels = np.array([0] * 6 + [1] * 3 + [2])  # frequencies 0.6, 0.3, 0.1
    best = np.array(best_constant((0.6, 0.3, 0.1)))
    # by hand: w * f = (0.6, 0.6, 0.4), sum 1.6
    np.testing.assert_allclose(best, [0.375, 0.375, 0.25])
    grid = [np.array([a, b, 100 - a - b]) / 100 for a, b in itertools.product(range(1, 99), repeat=2) if a + b < 100]
    losses = [_constant_loss(labels, p) for p in grid]
    assert _constant_loss(labels, best) <= min(losses) + 1e-12
    np.testing.assert_allclose(grid[int(np.argmin(losses))], best, atol=0.011)
    assert _constant_loss(labels, best) < _constant_loss(labels, np.array([0.6, 0.3, 0.1]))


@pytest.mark.parametrize(
    "group, frequency_loss, weighted_loss",
    [("spinal", 0.888, 0.783), ("foraminal", 1.019, 0.919), ("subarticular", 1.198, 1.051)],
)
def test_builtin_constant_beats_frequencies_and_uniform(group, frequency_loss, weighted_loss):
    """Expected loss under the built-in RSNA frequencies: the issue's measured figures, to their rounding."""
    f = np.asarray(RSNA_CLASS_FREQUENCIES[group]) / np.sum(RSNA_CLASS_FREQUENCIES[group])
    w = np.asarray(SAMPLE_WEIGHTS)

    def expected(p) -> float:
        return float(-(w * f * np.log(p)).sum() / (w * f).sum())

    condition = next(c for c in CONDITIONS if group in c)
    prior = np.asarray(RSNA_PRIOR[condition])
    assert expected(f) == pytest.approx(frequency_loss, abs=0.005)
    assert expected(prior) == pytest.approx(weighted_loss, abs=0.005)
    assert expected(prior) < min(expected(f), expected(np.full(3, 1 / 3)))


def test_prior_from_train_csv_with_crlf_bom_and_spreadsheet_blank_rows(tmp_path):
    header = ",".join(["study_id", *LABEL_COLUMNS])
    rows = [
        "4294967296123," + ",".join(["Severe"] * 5 + ["Moderate"] * 5 + [""] * 15),
        "1," + ",".join(["Normal/Mild"] * 5 + ["Moderate"] * 5 + [""] * 15),
        "," * len(LABEL_COLUMNS),
        "," * len(LABEL_COLUMNS),
    ]
    path = tmp_path / "train.csv"
    path.write_bytes(("\ufeff" + "\r\n".join([header, *rows]) + "\r\n").encode("utf-8"))
    prior = read_rsna_prior(path)
    # spinal counts (5, 0, 5), add-one smoothed (6, 1, 6) / 13, times weights (1, 2, 4): (6, 2, 24) / 32
    assert prior["spinal_canal_stenosis"] == pytest.approx((6 / 32, 2 / 32, 24 / 32))
    # left foraminal counts (0, 10, 0): (1, 11, 1) / 13 -> (1, 22, 4) / 27
    assert prior["left_neural_foraminal_narrowing"] == pytest.approx((1 / 27, 22 / 27, 4 / 27))
    assert prior["left_subarticular_stenosis"] == RSNA_PRIOR["left_subarticular_stenosis"]  # no labels: built-in


# ---------------------------------------------------------------------------------------------------------------
# batch runs skip unusable studies (bundle.skipping)


def _no_sagittal_t2(root: Path, study_id: str) -> None:
    """Make ``study_id`` look like the real RSNA study that has no Sagittal T2/STIR series (its T2 is 'T1')."""
    path = root / "train_series_descriptions.csv"
    lines = path.read_text().splitlines()
    lines = [ln.replace("Sagittal T2/STIR", "Sagittal T1") if ln.startswith(f"{study_id},") else ln for ln in lines]
    path.write_text("\n".join(lines) + "\n")


def _truncate_series(folder: Path) -> None:
    """Cut every file of a series short inside its pixel data (headers stay readable)."""
    for path in folder.glob("*.dcm"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 200])


@pytest.fixture(scope="module")
def broken_rsna(tmp_path_factory) -> tuple[Path, str, str, str]:
    """Three small RSNA phantom studies: one fine, one without sagittal T2, one with truncated T2 files."""
    root = tmp_path_factory.mktemp("broken") / "rsna"
    generate_phantoms(root, layout="rsna", studies=3, seed=11, min_size=64, max_size=96)
    items = load_datalist(root, "rsna", "all")
    good, no_t2, truncated = (it["study_id"] for it in items)
    _no_sagittal_t2(root, no_t2)
    _truncate_series(Path(items[2]["image"]))
    return root, good, no_t2, truncated


def test_find_studies_skips_a_study_without_sagittal_t2(broken_rsna):
    root, good, no_t2, truncated = broken_rsna
    with pytest.raises(BundleInputError, match="no sagittal T2 series found"):
        find_studies(root)
    items = {it["study_id"]: it for it in find_studies(root, on_error="skip")}
    assert set(items) == {good, no_t2, truncated}
    assert "no sagittal T2 series found" in items[no_t2][SKIPPED_KEY] and items[no_t2]["image"] == []
    assert SKIPPED_KEY not in items[good] and SKIPPED_KEY not in items[truncated]  # its headers are fine


def test_rsna_evaluation_datalist_keeps_unusable_studies_as_skipped(broken_rsna):
    root, good, no_t2, truncated = broken_rsna
    assert no_t2 not in [it["study_id"] for it in load_datalist(root, "rsna", "all")]  # training drops it
    items = {it["study_id"]: it for it in load_datalist(root, "rsna", "all", skip_unusable=True)}
    assert "no Sagittal T2/STIR series" in items[no_t2][SKIPPED_KEY]
    assert items[no_t2]["keypoints"]["disc"]["mm"] == [None] * 5
    assert len(items[no_t2]["keypoints"]["disc"]["label"]) == 5
    assert SKIPPED_KEY not in items[truncated]


def _batch_preprocessing(num_slices: int = 3) -> Compose:
    return skip_unusable(
        Compose(
            [
                LoadSagittalSeriesd(keys="image", num_slices=num_slices),
                InPlaneSpacingd(keys="image", pixdim=(2.0, 2.0)),
                ResizeWithPadOrCropd(keys="image", spatial_size=(48, 48)),
                NormalizeIntensityd(keys="image"),
            ]
        )
    )


def test_skip_wrapper_gives_a_placeholder_that_collates_with_real_series(broken_rsna):
    root, good, no_t2, truncated = broken_rsna
    items = {it["study_id"]: it for it in find_studies(root, on_error="skip")}
    transform = _batch_preprocessing()
    outputs = [transform(items[s]) for s in (good, no_t2, truncated)]
    assert [o[SKIPPED_KEY] == "" for o in outputs] == [True, False, False]
    assert "cannot decode pixel data" in outputs[2][SKIPPED_KEY] or "readable" in outputs[2][SKIPPED_KEY]
    batch = list_data_collate(outputs)
    assert tuple(batch["image"].shape) == (3, 3, 48, 48)
    assert skipped_reasons(batch, 3) == [o[SKIPPED_KEY] for o in outputs]
    assert batch["study_id"] == [good, no_t2, truncated]
    with pytest.raises(BundleInputError):  # the strict pipeline (MONAI Label's) still stops with the error
        transform.transforms[0].transform(items[truncated])


def _run_writer(tmp_path: Path, batches: list[dict]) -> tuple[SkippedStudiesWriter, Engine]:
    writer = SkippedStudiesWriter(tmp_path)
    engine = Engine(lambda e, b: None)
    writer.attach(engine)
    engine.run(batches, max_epochs=1)
    return writer, engine


def test_skipped_studies_writer_lists_logs_and_summarises(tmp_path, caplog):
    batches = [
        {"study_id": ["1", "9007199254740993"], SKIPPED_KEY: ["", "no sagittal T2 series found"]},
        {"study_id": ["3"], SKIPPED_KEY: ["x.dcm: cannot decode pixel data"]},
        {"study_id": ["4"], SKIPPED_KEY: [""]},
    ]
    with caplog.at_level(logging.INFO):
        writer, engine = _run_writer(tmp_path, batches)
    with open(tmp_path / "skipped.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["study_id", "reason"],
        ["9007199254740993", "no sagittal T2 series found"],  # ids above 2**53 stay exact
        ["3", "x.dcm: cannot decode pixel data"],
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "study 9007199254740993 skipped: no sagittal T2 series found",
        "study 3 skipped: x.dcm: cannot decode pixel data",
    ]
    assert "studies: 2 done, 2 skipped" in caplog.text
    assert engine.state.extra_metrics["skipped_studies"] == 2


def test_skipped_studies_writer_fails_when_nothing_could_be_processed(tmp_path):
    with pytest.raises(BundleInputError, match="no study could be processed: all 1 were skipped"):
        _run_writer(tmp_path, [{"study_id": ["1"], SKIPPED_KEY: ["no sagittal T2 series found"]}])
    assert (tmp_path / "skipped.csv").read_text() == "study_id,reason\n1,no sagittal T2 series found\n"


def test_keypoint_metric_counts_a_skipped_study_as_all_missed():
    spec = RSNA_STREAMS[0]
    gt = np.array([[10.0 * i, 20.0, 0.0] for i in range(5)])
    labels = np.array([0, 1, 2, 0, 1])
    perfect = [{"level_index": i, "mm": gt[i], "label": int(labels[i])} for i in range(5)]
    image = MetaTensor(torch.zeros(3, 8, 8), affine=torch.eye(4, dtype=torch.float64))
    unlocated = gt.copy()
    unlocated[3:] = np.nan  # skipped before these levels' points could be located (labels known)
    output = [  # decollated evaluator output; the skipped study's keypoints are junk
        {
            "image": image,
            "keypoints": {"disc": perfect},
            "label": {
                "disc_points": torch.as_tensor(points),
                "disc_labels": torch.as_tensor(labels),
                SKIPPED_KEY: reason,
            },
        }
        for points, reason in ((gt, ""), (unlocated, "x.dcm: cannot decode pixel data"))
    ]
    metric = KeypointDetectionMetric(RSNA_STREAMS)
    metric.reset()
    metric.update(output)
    metric.compute()
    result = metric.results["disc"]
    assert result["pck"]["6"] == pytest.approx(0.5)
    assert sum(result["counts"][c]["fn"] for c in spec.classes) == 5
    assert sum(result["counts"][c]["tp"] for c in spec.classes) == 5


def test_keypoints_writer_gives_a_skipped_study_the_constant_rows(tmp_path):
    writer = KeypointsWriter(tmp_path, RSNA_STREAMS, dataset_format="rsna", overlay=False)
    engine = Engine(lambda e, b: None)
    image = MetaTensor(torch.zeros(3, 8, 8))
    # the evaluator's decollated batch and output
    engine.state.batch = [{"image": image, "study_id": "4294967296123", SKIPPED_KEY: "no sagittal T2 series found"}]
    engine.state.output = [{"keypoints": {"disc": []}}]
    writer.write_iteration(engine)
    writer.write_submission(engine)
    with open(tmp_path / "submission.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 25 and not (tmp_path / "4294967296123").exists()
    for row in rows:
        study, _, column = row["row_id"].partition("_")
        condition = next(c for c in CONDITIONS if column.startswith(c))
        assert study == "4294967296123"
        probs = [float(row[k]) for k in ("normal_mild", "moderate", "severe")]
        assert probs == pytest.approx(RSNA_PRIOR[condition], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# command-line options (bundle.options) and the README's commands on real folder names

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "--backbone_depth": "18",
    "--pixdim": "4.375",
    "--input_size": "64",
    "--batch_size": "2",
    "--num_workers": "0",
    "--codec#radius": "2.0",
}


def test_check_overrides_names_the_unknown_option_and_the_closest_one():
    train = ["run", "training", "--config_file", "configs/train.json"]
    check_overrides([*train, "--tianchi_images", "a", "--train#dataloader#num_workers", "0", "--meta_file", "m"])
    check_overrides(["run", "--config_file", "['configs/train.json','configs/evaluate.json']", "--fold=2", "--resume"])
    with pytest.raises(BundleInputError, match=r"unknown option --tianchi_image: .*did you mean --tianchi_images\?"):
        check_overrides([*train, "--tianchi_image", "lumbar_train150"])
    with pytest.raises(BundleInputError, match=r"--train#dataloader#num_worker: .*train#dataloader#num_workers\?"):
        check_overrides([*train, "--train#dataloader#num_worker=0"])
    with pytest.raises(BundleInputError, match=r"--datset_dir: .*did you mean --dataset_dir\?"):
        check_overrides(["run", "--config_file", "configs/inference.json", "--datset_dir", "/data"])


def test_check_overrides_warns_about_a_key_only_other_configs_read(caplog):
    with caplog.at_level(logging.WARNING):
        check_overrides(["run", "--config_file", "configs/inference.json", "--learning_rate", "0.1"])
    assert "--learning_rate is not read by this run (only by demo.json, train.json)" in caplog.text


def _readme_tianchi_commands() -> list[list[str]]:
    """The README's Tianchi commands as written (continuation lines joined), split into arguments."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("Tianchi SDID-TC (study folders") :]
    block = block[block.index("```bash") + len("```bash") : block.index("```", block.index("```bash") + 7)]
    lines = block.replace("\\\n", " ").strip().splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.strip().startswith("#")]


def _run(args: list[str], bundle_root: Path, **overrides: str) -> subprocess.CompletedProcess:
    assert args[:3] == ["python", "-m", "monai.bundle"]
    extra = [item for pair in {**TINY, "--bundle_root": str(bundle_root), **overrides}.items() for item in pair]
    return subprocess.run(
        [sys.executable, *args[1:], *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _real_tianchi_folders(root: Path) -> None:
    """Phantoms under the real Tianchi names: lumbar_train150/, lumbar_train51/train/, lumbar_testA50/."""
    sets = {
        ("lumbar_train150", "lumbar_train150_annotation.json"): (5, 21),
        ("lumbar_train51/train", "lumbar_train51_annotation.json"): (2, 22),
    }
    for (images, annotation), (studies, seed) in sets.items():
        generated = generate_phantoms(
            root / f"gen{seed}", layout="tianchi", studies=studies, seed=seed, min_size=96, max_size=128
        )
        (root / images).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(generated / "lumbar_train", root / images)
        shutil.move(generated / "lumbar_train_annotation.json", root / annotation)
    test = generate_phantoms(root / "gen23", layout="tianchi", studies=2, seed=23, min_size=96, max_size=128)
    shutil.move(test / "lumbar_train", root / "lumbar_testA50")  # the test set: study folders, no annotation
    for seed in (21, 22, 23):
        shutil.rmtree(root / f"gen{seed}")


def test_readme_tianchi_commands_run_as_written_on_real_folder_names(tmp_path):
    data, out = tmp_path / "tianchi", tmp_path / "OUT"
    _real_tianchi_folders(data)
    train, infer = _readme_tianchi_commands()
    assert "--tianchi_images" in train and "lumbar_train150" in train

    def real(args: list[str]) -> list[str]:
        return [
            a.replace("/data/tianchi", str(data)) if a.startswith("/data/tianchi") else str(out) if a == "OUT" else a
            for a in args
        ]

    trained = _run(real(train), tmp_path, **{"--max_epochs": "1"})
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    # evaluation of the second set, whose images sit one level deeper (lumbar_train51/train)
    evaluate = [
        "python", "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/evaluate.json']",
        "--dataset_format", "tianchi", "--dataset_dir", str(data), "--tianchi_images", "lumbar_train51/train",
        "--tianchi_annotation", "lumbar_train51_annotation.json", "--output_dir", str(tmp_path / "ev"),
    ]  # fmt: skip
    evaluated = _run(evaluate, tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["streams"]["disc"]["num_studies"] == 2 and metrics["skipped_studies"] == 0
    inferred = _run(real(infer), tmp_path)
    assert inferred.returncode == 0, inferred.stdout[-3000:] + inferred.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["study0", "study1"]
    assert (out / "skipped.csv").read_text() == "study_id,reason\n"
    # a misspelled option of the README's command stops before any work, naming the closest option
    typo = [a.replace("--tianchi_images", "--tianchi_image") for a in real(train)]
    failed = _run(typo, tmp_path / "typo")
    assert failed.returncode != 0 and "did you mean --tianchi_images?" in failed.stderr
    assert not (tmp_path / "typo").exists()


def _random_rsna_model(path: Path) -> None:
    """An untrained ResNet-18 SpineOne checkpoint: the skipping does not depend on what the model predicts."""
    from bundle.networks import SpineOne

    torch.manual_seed(0)
    net = SpineOne(streams(disc=3), backbone_depth=18, in_channels=7, attention=["pam", "cam"], pretrained=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rsna_batch_runs_skip_unusable_studies_and_stay_complete(broken_rsna, tmp_path):
    root, good, no_t2, truncated = broken_rsna
    _random_rsna_model(tmp_path / "models" / "model.pt")
    out = tmp_path / "OUT"
    infer = ["python", "-m", "monai.bundle", "run", "--meta_file", "configs/metadata.json"]
    infer += ["--config_file", "configs/inference.json", "--dataset_dir", str(root), "--output_dir", str(out)]
    inferred = _run(infer, tmp_path)
    log = inferred.stdout + inferred.stderr
    assert inferred.returncode == 0, log[-3000:]
    rows = _csv_rows(out / "submission.csv")
    assert len(rows) == 75 and {r["row_id"].split("_")[0] for r in rows} == {good, no_t2, truncated}
    prior = read_rsna_prior(root / "train.csv")
    for row in rows:
        study, _, column = row["row_id"].partition("_")
        if study in (no_t2, truncated):
            condition = next(c for c in CONDITIONS if column.startswith(c))
            assert [float(row[k]) for k in ("normal_mild", "moderate", "severe")] == pytest.approx(
                prior[condition], abs=1e-6
            )
    skipped = {r["study_id"]: r["reason"] for r in _csv_rows(out / "skipped.csv")}
    assert set(skipped) == {no_t2, truncated} and "no sagittal T2 series found" in skipped[no_t2]
    assert log.count(f"study {no_t2} skipped: ") == 1 and log.count(f"study {truncated} skipped: ") == 1
    assert "Divide by zero" not in log  # the placeholder of a skipped study raises no misleading warning
    assert "studies: 1 done, 2 skipped" in log
    assert (out / good / "keypoints.json").is_file() and not (out / no_t2).exists() and not (out / truncated).exists()

    evaluate = [
        "python",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/evaluate.json']",
    ]
    evaluate += ["--dataset_dir", str(root), "--output_dir", str(tmp_path / "ev")]
    evaluated = _run(evaluate, tmp_path)
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-3000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    disc = metrics["streams"]["disc"]
    assert metrics["skipped_studies"] == 2 and disc["num_studies"] == 3
    # every labelled level of the three studies is scored, the two skipped studies' ten all as missed
    assert disc["num_gt"] == 15 and sum(row[-1] for row in disc["confusion_matrix"]) >= 10
    assert "rsna" in metrics  # the skipped studies' constant rows are scored too
    assert len(_csv_rows(tmp_path / "ev" / "predictions" / "submission.csv")) == 75
    assert {r["study_id"] for r in _csv_rows(tmp_path / "ev" / "skipped.csv")} == {no_t2, truncated}


def test_800_pixel_series_load_with_their_labels(tmp_path):
    """Real sagittal series reach about 800 x 800 pixels: read, labelled and loaded at full size."""
    root = generate_phantoms(tmp_path / "big", layout="rsna", studies=1, seed=5, min_size=800, max_size=800)
    (item,) = load_datalist(root, "rsna", "all")
    image = LoadSagittalSeriesd(keys="image", num_slices=7)(item)["image"]
    assert tuple(image.shape) == (7, 800, 800)
    points = [p for p in item["keypoints"]["disc"]["mm"] if p is not None]
    ijk = [np.linalg.solve(image.affine.numpy(), [*p, 1.0])[:2] for p in points]
    assert len(points) == 5 and all(0 <= v < 800 for rc in ijk for v in rc)


def test_inference_datalist_reads_the_tianchi_options(tmp_path, caplog):
    root = generate_phantoms(tmp_path / "t", layout="tianchi", studies=2, seed=4, min_size=64, max_size=96)
    annotation = json.loads((root / "lumbar_train_annotation.json").read_text())
    annotated = {s["studyUid"]: s["data"][0]["seriesUid"] for s in annotation}
    searched = inference_datalist(root, "tianchi", "lumbar_train")
    assert sorted(it["study_id"] for it in searched) == ["study0", "study1"]
    named = inference_datalist(root, "tianchi", "lumbar_train", "lumbar_train_annotation.json")
    assert {it["study_id"]: it["series_id"] for it in named} == annotated
    assert all("keypoints" not in it and it["image"] for it in named)
    with pytest.raises(BundleInputError, match="tianchi_annotation needs tianchi_images"):
        inference_datalist(root, "tianchi", None, "lumbar_train_annotation.json")
    with pytest.raises(BundleInputError, match="must pair up one to one"):
        inference_datalist(root, "tianchi", ["lumbar_train", "x"], "lumbar_train_annotation.json")
    with caplog.at_level(logging.WARNING):
        inference_datalist(root / "lumbar_train", "rsna", "lumbar_train")
    assert "unused with dataset_format rsna" in caplog.text


def _documented_run_commands() -> list[list[str]]:
    """Every ``monai.bundle run`` command of README.md and docs/README.md's bash blocks, as argv after the module."""
    commands = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "README.md"):
        parts = doc.read_text().split("```")
        for block in parts[1::2]:
            if not block.startswith("bash"):
                continue
            for line in block[4:].replace("\\\n", " ").replace("$B", str(ROOT)).splitlines():  # $B: bundle root
                for command in line.split("&&"):
                    tokens = shlex.split(command, comments=True)
                    if "monai.bundle" in tokens and tokens[tokens.index("monai.bundle") + 1 :][:1] == ["run"]:
                        commands.append(tokens[tokens.index("monai.bundle") + 1 :])
    return commands


def test_every_documented_run_command_passes_the_option_check():
    commands = _documented_run_commands()
    assert len(commands) >= 6 and any("--tianchi_annotation" in c for c in commands)
    for argv in commands:
        check_overrides(argv)  # raises on an option no config of that command reads
