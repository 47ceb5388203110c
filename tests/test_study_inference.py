"""Study-level inference (issue 13): full-study items, the study engine and its outputs on small phantoms.

Five RSNA phantom studies, edited so that one lacks its Sagittal T1, one its Axial T2, one its sagittal T2
(that study then lists two "Sagittal T1" series) and one has a truncated Sagittal T1 (the last has two Axial
T2 series). The three series models are randomly initialised
ResNet-18s at 96 pixels; the sagittal T2 stage runs, but the spinal points handed to the T1 and axial stages are
the phantom's true ones (:class:`TruthSpinalEvaluator`), so which axial slices and T1 slabs are read is known.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle.errors import BundleInputError
from bundle.io.axial import LoadAxialSlicesd, nearest_axial_slices, read_axial_stacks
from bundle.io.dicom_series import list_dicom_files, patient_to_pixel, read_slice_headers
from bundle.options import check_overrides
from bundle.outputs import read_rsna_prior
from bundle.phantoms import generate_phantoms
from bundle.rsna_labels import CONDITIONS, LEVELS, snake
from bundle.studies import STUDY_SERIES_KEY, find_full_studies
from bundle.study_engine import StudyEvaluator, load_series_model, nearest_slice
from bundle.workflow import load_datalist
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"backbone_depth": 18, "pixdim": 2.6, "input_size": 96}
T1_CONFIGS = ["configs/train.json", "configs/sagittal_t1.json"]
AXIAL_CONFIGS = ["configs/train.json", "configs/axial_t2.json"]
PRED = ("normal_mild", "moderate", "severe")


def _describe(root: Path, study: str, old: str, new: str) -> None:
    """Give ``study``'s series described ``old`` the description ``new`` in train_series_descriptions.csv."""
    path = root / "train_series_descriptions.csv"
    lines = path.read_text().splitlines()
    lines = [ln.replace(f",{old}", f",{new}") if ln.startswith(f"{study},") else ln for ln in lines]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict:
    root = generate_phantoms(
        tmp_path_factory.mktemp("full") / "rsna", "rsna", studies=5, seed=3, min_size=64, max_size=96
    )
    truth = {it["study_id"]: it["keypoints"]["disc"]["mm"] for it in load_datalist(root, "rsna", "all")}
    full, no_t1, no_axial, no_t2, bad_t1 = list(truth)
    _describe(root, no_t1, "Sagittal T1", "Scout")
    _describe(root, no_axial, "Axial T2", "Scout")
    _describe(root, no_t2, "Sagittal T2/STIR", "Sagittal T1")
    for sid in _series_ids(root, bad_t1, "Sagittal T1"):  # pixel data cut short, headers readable
        for path in (root / "train_images" / bad_t1 / sid).glob("*.dcm"):
            path.write_bytes(path.read_bytes()[:-200])
    ids = {"full": full, "no_t1": no_t1, "no_axial": no_axial, "no_t2": no_t2, "bad_t1": bad_t1}
    return {"root": root, "truth": truth, **ids}


def _series_ids(root: Path, study: str, description: str) -> list[str]:
    with open(root / "train_series_descriptions.csv", newline="") as f:
        return [
            r["series_id"]
            for r in csv.DictReader(f)
            if r["study_id"] == study and r["series_description"] == description
        ]


def test_full_study_items_record_each_missing_series(studies):
    root = studies["root"]
    items = {it["study_id"]: it for it in find_full_studies(root)}
    assert set(items) == set(studies["truth"])
    full = items[studies["full"]][STUDY_SERIES_KEY]
    assert full["missing"] == {}
    assert [full["sagittal_t1_id"]] == _series_ids(root, studies["full"], "Sagittal T1")
    assert full["axial_t2_ids"] == _series_ids(root, studies["full"], "Axial T2")
    assert set(items[studies["no_t1"]][STUDY_SERIES_KEY]["missing"]) == {"sagittal_t1"}
    assert items[studies["no_t1"]][STUDY_SERIES_KEY]["sagittal_t1"] == ""
    assert set(items[studies["no_axial"]][STUDY_SERIES_KEY]["missing"]) == {"axial_t2"}
    no_t2 = items[studies["no_t2"]]
    assert "no sagittal T2 series found" in no_t2["skipped"] and set(no_t2[STUDY_SERIES_KEY]["missing"]) == {
        "sagittal_t2"
    }
    # two series described Sagittal T1: the one with the most files is taken
    two = _series_ids(root, studies["no_t2"], "Sagittal T1")
    counts = {sid: len(list((root / "train_images" / studies["no_t2"] / sid).iterdir())) for sid in two}
    assert len(two) == 2 and no_t2[STUDY_SERIES_KEY]["sagittal_t1_id"] == max(two, key=lambda s: counts[s])


def test_without_the_descriptions_csv_series_types_come_from_the_headers(studies, tmp_path):
    copy = tmp_path / "rsna"
    shutil.copytree(studies["root"] / "train_images" / studies["full"], copy / "test_images" / studies["full"])
    item = find_full_studies(copy)[0]
    series = item[STUDY_SERIES_KEY]
    assert series["missing"] == {}
    assert item["series_id"] == _series_ids(studies["root"], studies["full"], "Sagittal T2/STIR")[0]
    assert [series["sagittal_t1_id"]] == _series_ids(studies["root"], studies["full"], "Sagittal T1")
    assert series["axial_t2_ids"] == _series_ids(studies["root"], studies["full"], "Axial T2")


def test_a_missing_series_checkpoint_is_named(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(BundleInputError, match=r"sagittal_t1 model: checkpoint .*nope/model.pt not found"):
        load_series_model("sagittal_t1", T1_CONFIGS, missing)


class TruthSpinalEvaluator(StudyEvaluator):
    """The study engine with the phantoms' true spinal points handed to the T1 and axial stages."""

    truth: dict = {}

    def _spinal(self, study_id, image, pred, series, result):
        super()._spinal(study_id, image, pred, series, result)  # the sagittal T2 records stay the model's
        return {lv: p for lv, p in zip(LEVELS, self.truth[study_id]) if p is not None}


def _random_checkpoint(configs: list[str], path: Path) -> None:
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in configs])
    parser.update({"bundle_root": str(ROOT), **SMALL})
    parser.get_parsed_content("imports")
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)


@pytest.fixture(scope="module")
def inferred(studies, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("infer")
    (tmp / "small.json").write_text(json.dumps(SMALL))
    models = tmp / "models"
    _random_checkpoint(["configs/inference.json"], models / "model.pt")
    _random_checkpoint(T1_CONFIGS, models / "sagittal_t1" / "model.pt")
    _random_checkpoint(AXIAL_CONFIGS, models / "axial_t2" / "model.pt")
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "inference.json"), str(ROOT / "configs" / "inference_study.json")])
    overrides = {"dataset_dir": str(studies["root"]), "output_dir": str(tmp / "out"), "ckpt_dir": str(models)}
    overrides.update(bundle_root=str(ROOT), series_extra_configs=[str(tmp / "small.json")], num_workers=0, **SMALL)
    parser.update({**overrides, "precision": "fp32", "evaluator#_target_": TruthSpinalEvaluator})
    TruthSpinalEvaluator.truth = studies["truth"]
    parser.get_parsed_content("imports")
    parser.get_parsed_content("evaluator").run()
    return tmp / "out"


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _keypoints(out: Path, study: str) -> dict:
    return json.loads((out / study / "keypoints.json").read_text())


def test_keypoints_name_existing_instances_of_each_series(studies, inferred):
    content = _keypoints(inferred, studies["full"])
    assert all(entry["used"] for entry in content["series"].values())
    groups = {r["series"] for r in content["keypoints"]}
    assert groups == {"sagittal_t2", "sagittal_t1", "axial_t2"}
    assert {r["condition"] for r in content["keypoints"]} <= set(CONDITIONS)
    study_dir = studies["root"] / "train_images" / studies["full"]
    for r in content["keypoints"]:
        assert r["level"] in LEVELS
        path = study_dir / r["series_id"] / f"{r['instance_number']}.dcm"
        header = read_slice_headers([path])[0]
        assert 0 <= r["x"] <= header.cols - 1 and 0 <= r["y"] <= header.rows - 1
        x, y, _ = patient_to_pixel(header, r["position_mm"])
        assert (x, y) == pytest.approx((r["x"], r["y"]), abs=1e-3)
        if r["series"] != "axial_t2":  # sagittal: the series' slice nearest the point
            headers = read_slice_headers(list_dicom_files(path.parent))
            assert nearest_slice(headers, r["position_mm"]).instance_number == r["instance_number"]
    for kind in groups:
        assert (inferred / studies["full"] / f"overlay_{kind}.png").is_file()


def test_axial_points_lie_on_the_slice_nearest_the_disc(studies, inferred):
    content = _keypoints(inferred, studies["full"])
    folders = [
        studies["root"] / "train_images" / studies["full"] / s for s in content["series"]["axial_t2"]["series_ids"]
    ]
    stacks = read_axial_stacks(folders)
    axial = [r for r in content["keypoints"] if r["series"] == "axial_t2"]
    assert axial
    for r in axial:
        disc = studies["truth"][studies["full"]][LEVELS.index(r["level"])]
        choice = nearest_axial_slices(stacks, disc, 3)
        assert (r["series_id"], r["instance_number"]) == (choice.centre.path.parent.name, choice.centre.instance_number)
        assert abs(patient_to_pixel(choice.centre, r["position_mm"])[2]) < 1e-3


def test_foramen_points_lie_on_their_side(studies, inferred):
    content = _keypoints(inferred, studies["full"])
    canal_x = np.mean([p[0] for p in studies["truth"][studies["full"]] if p is not None])
    t1 = [r for r in content["keypoints"] if r["series"] == "sagittal_t1"]
    assert {r["stream"] for r in t1} == {"left_foramen", "right_foramen"}
    for r in t1:  # LPS: patient left is +x
        assert (r["position_mm"][0] > canal_x) == (r["stream"] == "left_foramen")


def test_submission_has_25_rows_per_study_and_the_prior_only_where_nothing_was_seen(studies, inferred):
    rows = _csv(inferred / "submission.csv")
    ids = [r["row_id"] for r in rows]
    assert len(rows) == 125 and len(set(ids)) == 125
    prior = read_rsna_prior(studies["root"] / "train.csv")
    skipped = _csv(inferred / "skipped.csv")
    for study in studies["truth"]:
        mine = {
            r["row_id"][len(study) + 1 :]: tuple(float(r[k]) for k in PRED)
            for r in rows
            if r["row_id"].startswith(f"{study}_")
        }
        assert len(mine) == 25
        reasons = " ".join(s["reason"] for s in skipped if s["study_id"] == study)
        records = [] if study == studies["no_t2"] else _keypoints(inferred, study)["keypoints"]
        seen = {f"{r['condition']}_{snake(r['level'])}": tuple(r["probabilities"].values()) for r in records}
        for row, probs in mine.items():
            condition = next(c for c in CONDITIONS if row.startswith(c))
            if row in seen:
                assert probs == pytest.approx(seen[row], abs=1e-4)
            else:
                assert probs == pytest.approx(prior[condition], abs=1e-6)
                assert study == studies["no_t2"] or row in reasons  # each constant row has its reason
    by_study = {s["study_id"]: s["reason"] for s in skipped}
    assert "no sagittal T2 series found" in by_study[studies["no_t2"]]
    assert not (inferred / studies["no_t2"]).exists()


def test_a_study_without_t1_or_axial_keeps_its_other_rows_from_images(studies, inferred):
    skipped = _csv(inferred / "skipped.csv")
    for study, kind, other in (
        (studies["no_t1"], "sagittal_t1", "axial_t2"),
        (studies["no_axial"], "axial_t2", "sagittal_t1"),
    ):
        content = _keypoints(inferred, study)
        assert not content["series"][kind]["used"] and content["series"][kind]["reason"]
        assert content["series"][other]["used"] and content["series"]["sagittal_t2"]["used"]
        assert {r["series"] for r in content["keypoints"]} == {"sagittal_t2", other}
        reason = next(
            s["reason"] for s in skipped if s["study_id"] == study and s["reason"].startswith(f"{kind} not used")
        )
        expected = [c for c in CONDITIONS if ("foraminal" in c) == (kind == "sagittal_t1") and c != CONDITIONS[0]]
        assert all(f"{c}_{snake(lv)}" in reason for c in expected for lv in LEVELS)
        assert not (inferred / study / f"overlay_{kind}.png").exists()


def test_study_options_pass_the_option_check_and_a_typo_is_named():
    base = [
        "run",
        "--config_file",
        str([str(ROOT / "configs" / f) for f in ("inference.json", "inference_study.json")]),
    ]
    check_overrides(base + ["--sagittal_t1_ckpt", "a.pt", "--axial_ckpt", "b.pt", "--series_extra_configs", "[]"])
    with pytest.raises(BundleInputError, match="did you mean --axial_ckpt"):
        check_overrides(base + ["--axial_ckp", "b.pt"])


def test_axial_loader_takes_the_headers_read_once(studies):
    study = studies["full"]
    folders = [
        str(studies["root"] / "train_images" / study / s) for s in _series_ids(studies["root"], study, "Axial T2")
    ]
    disc = studies["truth"][study][2]
    item = {"image": folders, "disc_mm": disc, "level": LEVELS[2], "study_id": study}
    load = LoadAxialSlicesd(keys="image", num_slices=3)
    fresh = load(dict(item))
    reused = load({**item, "axial_stacks": read_axial_stacks(folders)})
    assert "axial_stacks" not in reused
    assert torch.equal(fresh["image"], reused["image"])
    assert fresh["image"].meta["instance_numbers"] == reused["image"].meta["instance_numbers"]


def test_an_unreadable_series_gives_its_rows_the_prior_and_the_study_goes_on(studies, inferred):
    study = studies["bad_t1"]
    content = _keypoints(inferred, study)
    assert not content["series"]["sagittal_t1"]["used"] and ".dcm" in content["series"]["sagittal_t1"]["reason"]
    assert len(content["series"]["axial_t2"]["series_ids"]) == 2 and content["series"]["axial_t2"]["used"]
    assert {r["series"] for r in content["keypoints"]} == {"sagittal_t2", "axial_t2"}
    reasons = [s["reason"] for s in _csv(inferred / "skipped.csv") if s["study_id"] == study]
    assert any(r.startswith("sagittal_t1 not used") and "left_neural_foraminal_narrowing_l1_l2" in r for r in reasons)


def test_study_benchmark_times_both_kinds_of_run():
    spec = importlib.util.spec_from_file_location("bench_study", ROOT / "scripts" / "bench_study.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sizes = [f"{k}={json.dumps(v)}" for k, v in SMALL.items()]
    report = bench.run(
        bench.parse_args(
            ["--repeats", "1", "--max-size", "96", "--precision", "fp32", *sum((["--set", s] for s in sizes), [])]
        )
    )
    assert report["sizes"] == SMALL
    assert all(len(v) == 1 and v[0] > 0 for v in report["seconds"].values())
    assert report["study_over_spinal"] == pytest.approx(report["best"]["study"] / report["best"]["spinal"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeats", "0"])
