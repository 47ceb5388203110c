"""RSNA and Tianchi datalist builders, folds, datalist files and the prepare_datalist CLI."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle.errors import BundleInputError  # noqa: E402
from bundle.io import (  # noqa: E402
    build_rsna_datalist,
    build_tianchi_datalist,
    check_series,
    load_sagittal_series,
    read_datalist,
    split_folds,
    write_datalist,
)
from bundle.streams import RSNA_STREAMS, TIANCHI_STREAMS  # noqa: E402
from dicom_fixtures import AXIAL_IOP, SAGITTAL_IOP, normal_of, write_series  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEVELS = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
CONDITIONS = [
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
]
BIG_ID = "4294967296123"  # above int32 and int64-safe only as a string in JSON consumers
ORIGIN = np.array([-10.0, -60.0, 40.0])


def expected_mm(k: int, x: float, y: float, iop=SAGITTAL_IOP, gap=4.0, ps=(0.8, 0.7)) -> np.ndarray:
    """Independent pixel -> patient mm for slice k of a write_series fixture."""
    iop = np.asarray(iop)
    ipp = ORIGIN + k * gap * normal_of(iop)
    return ipp + x * ps[1] * iop[:3] + y * ps[0] * iop[3:]


def instance_of(path: Path) -> int:
    return int(path.stem)


def make_rsna(root: Path) -> dict:
    """Three studies: BIG_ID (points on its T2), '7' (no Sagittal T2/STIR), '8' (spinal points on T1)."""
    images = root / "train_images"
    info = {}
    t2 = write_series(images / BIG_ID / "22", n_slices=5, seed=1)
    t1 = write_series(images / BIG_ID / "11", n_slices=3, seed=2, description="Sagittal T1")
    write_series(images / BIG_ID / "33", n_slices=2, iop=AXIAL_IOP, description="Axial T2")
    write_series(images / "7" / "44", n_slices=3, description="Sagittal T1")
    t2b = write_series(images / "8" / "55", n_slices=3, seed=3)
    t1b = write_series(images / "8" / "66", n_slices=3, seed=4, description="Sagittal T1")
    info.update(t2=t2, t1=t1, t2b=t2b, t1b=t1b)
    header = ["study_id"] + [f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS]
    rows = [
        [BIG_ID] + ["Normal/Mild", "Moderate", "Severe", "", "Normal/Mild"] + ["Normal/Mild"] * 20,
        ["7"] + ["Severe"] * 25,
        ["8"] + ["Moderate"] * 5 + ["Normal/Mild"] * 20,
    ]
    (root / "train.csv").write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    coords = ["study_id,series_id,instance_number,condition,level,x,y"]
    mid = instance_of(t2[2])
    for i, level in enumerate(["L1/L2", "L2/L3", "L3/L4", "L4/L5"]):  # L5/S1 not annotated
        coords.append(f"{BIG_ID},22,{mid},Spinal Canal Stenosis,{level},{10.5 + i},{5.25 + 6 * i}")
    coords.append(f"{BIG_ID},11,{instance_of(t1[1])},Left Neural Foraminal Narrowing,L1/L2,3.0,4.0")
    coords.append(f"8,66,{instance_of(t1b[0])},Spinal Canal Stenosis,L5/S1,20.0,30.0")
    (root / "train_label_coordinates.csv").write_text("\n".join(coords) + "\n")
    series = [
        "study_id,series_id,series_description",
        f"{BIG_ID},11,Sagittal T1",
        f"{BIG_ID},22,Sagittal T2/STIR",
        f"{BIG_ID},33,Axial T2",
        "7,44,Sagittal T1",
        "8,66,Sagittal T1",
        "8,55,Sagittal T2/STIR",
    ]
    (root / "train_series_descriptions.csv").write_text("\n".join(series) + "\n")
    write_series(root / "test_images" / "9" / "77", n_slices=3)
    (root / "test_series_descriptions.csv").write_text(
        "study_id,series_id,series_description\n9,76,Axial T2\n9,77,Sagittal T2/STIR\n10,78,Sagittal T1\n"
    )
    return info


def test_rsna_items(tmp_path, caplog):
    make_rsna(tmp_path)
    with caplog.at_level(logging.WARNING):
        items = build_rsna_datalist(tmp_path)
    assert "study 7" in caplog.text  # skipped: no Sagittal T2/STIR
    assert [it["study_id"] for it in items] == [BIG_ID, "8"]
    first, second = items
    assert first["series_id"] == "22" and first["image"] == str((tmp_path / "train_images" / BIG_ID / "22").resolve())
    disc = first["keypoints"]["disc"]
    assert disc["label"] == [0, 1, 2, -1, 0]
    assert disc["mm"][4] is None
    for i in range(4):
        np.testing.assert_allclose(disc["mm"][i], expected_mm(2, 10.5 + i, 5.25 + 6 * i), atol=1e-9)
    # study 8: points on the T1 series, converted with the T1 instance's own geometry (same frame of reference)
    assert second["series_id"] == "55"
    np.testing.assert_allclose(second["keypoints"]["disc"]["mm"][4], expected_mm(0, 20.0, 30.0), atol=1e-9)
    assert second["keypoints"]["disc"]["label"] == [1] * 5
    json.dumps(items)  # JSON-serialisable


def test_rsna_middle_slice_is_labelled_instance(tmp_path):
    info = make_rsna(tmp_path)
    item = build_rsna_datalist(tmp_path)[0]
    img = load_sagittal_series(item["image"])
    assert img.meta["middle_instance_number"] == instance_of(info["t2"][2])
    ijk = np.linalg.solve(img.affine.numpy(), [*item["keypoints"]["disc"]["mm"][0], 1.0])
    np.testing.assert_allclose(ijk[:3], [5.25, 10.5, 0.0], atol=1e-9)  # (row, col, k)


def test_rsna_test_split(tmp_path, caplog):
    make_rsna(tmp_path)
    with caplog.at_level(logging.WARNING):
        items = build_rsna_datalist(tmp_path, split="test")
    folder = str((tmp_path / "test_images" / "9" / "77").resolve())
    assert items == [{"image": folder, "study_id": "9", "series_id": "77"}]
    assert "study 10" in caplog.text


@pytest.mark.parametrize(
    "csv_name, old, new, pattern",
    [
        ("train_label_coordinates.csv", "Canal Stenosis,L1/L2", "Stenosis,L1/L2", r"row 2: unknown condition"),
        ("train_label_coordinates.csv", "Canal Stenosis,L2/L3", "Canal Stenosis,L2-L3", r"row 3: unknown level"),
        ("train_label_coordinates.csv", ",10.5,", ",abc,", r"row 2: non-numeric"),
        ("train_label_coordinates.csv", ",10.5,", ",40.0,", r"row 2: point \(x=40.0.*outside.*40 columns"),
        ("train_label_coordinates.csv", ",5.25\n", ",-1\n", r"row 2: point.*outside"),
        ("train.csv", "Moderate", "moderat", r"train.csv, row 2: unknown severity 'moderat'"),
    ],
)
def test_rsna_errors(tmp_path, csv_name, old, new, pattern):
    make_rsna(tmp_path)
    path = tmp_path / csv_name
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(BundleInputError, match=pattern) as err:
        build_rsna_datalist(tmp_path)
    assert csv_name in str(err.value)


def test_rsna_missing_instance(tmp_path):
    info = make_rsna(tmp_path)
    info["t2"][2].unlink()
    pattern = r"train_label_coordinates.csv, row 2: referenced instance file .*not found"
    with pytest.raises(BundleInputError, match=pattern):
        build_rsna_datalist(tmp_path)


# ---------------------------------------------------------------- Tianchi


def make_tianchi(root: Path) -> dict:
    """study1 mixes a sagittal T2 (annotated), a sagittal T1 and an axial series in one folder."""
    study_uid = "1.2.3.100"
    folder = root / "lumbar_train" / "study1"
    series = {}
    kinds = (
        ("t2", 2, SAGITTAL_IOP, "T2_SAG", 5),
        ("t1", 1, SAGITTAL_IOP, "T1_SAG", 3),
        ("ax", 9, AXIAL_IOP, "T2_TRA", 2),
    )
    for name, number, iop, desc, n in kinds:
        paths = write_series(
            root / "tmp" / name,
            n_slices=n,
            iop=iop,
            study_uid=study_uid,
            series_uid=f"1.2.3.{number}",
            description=desc,
            name_by_instance=False,
        )
        moved = []
        for p in paths:
            target = folder / f"image{len(list(folder.glob('*.dcm'))) if folder.exists() else 0}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            p.rename(target)
            moved.append(target)
        series[name] = moved
    import pydicom

    sop = pydicom.dcmread(series["t2"][2], stop_before_pixels=True).SOPInstanceUID
    points = [
        {"coord": [5, 4 + 3 * i], "tag": {"identification": lv, "vertebra": "v2" if i == 1 else "v1"}, "zIndex": 2}
        for i, lv in enumerate(["L1", "L2", "L3", "L4", "L5"])
    ]
    disc_tags = ["", "v1", "v2", "v3,v5", "v1,v5", "v4"]
    points += [
        {"coord": [8, 2 + 3 * i], "tag": {"identification": lv, "disc": disc_tags[i]}, "zIndex": 2}
        for i, lv in enumerate(["T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"])
    ]
    points.append({"coord": [1, 1], "tag": {"identification": "T11-T12", "disc": "v1"}, "zIndex": 2})
    annotation = [
        {
            "studyUid": study_uid,
            "data": [
                {
                    "seriesUid": "1.2.3.2",
                    "instanceUid": sop,
                    "annotation": [{"annotator": 0, "data": {"point": points}}],
                }
            ],
        }
    ]
    json_path = root / "lumbar_train_annotation.json"
    json_path.write_text(json.dumps(annotation))
    return {"series": series, "json": json_path, "images": root / "lumbar_train", "annotation": annotation}


def test_tianchi_items(tmp_path):
    info = make_tianchi(tmp_path)
    items = build_tianchi_datalist(info["images"], info["json"])
    assert len(items) == 1
    item = items[0]
    assert item["study_id"] == "1.2.3.100" and item["series_id"] == "1.2.3.2"
    assert sorted(item["image"]) == sorted(str(p.resolve()) for p in info["series"]["t2"])
    vert, disc = item["keypoints"]["vertebra"], item["keypoints"]["disc"]
    assert vert["label"] == [0, 1, 0, 0, 0]
    assert disc["label"] == [0, 0, 1, 1, 1, 1]
    for i in range(5):
        np.testing.assert_allclose(vert["mm"][i], expected_mm(2, 5, 4 + 3 * i), atol=1e-9)
    for i in range(6):
        np.testing.assert_allclose(disc["mm"][i], expected_mm(2, 8, 2 + 3 * i), atol=1e-9)
    img = load_sagittal_series(item["image"])
    assert img.meta["series_instance_uid"] == "1.2.3.2" and img.shape[0] == 7


def test_tianchi_class_map_and_streams(tmp_path):
    info = make_tianchi(tmp_path)
    cmap = {"vertebra": {"v1": 0, "v2": 1}, "disc": {"v1": 0, "v2": 1, "v3": 1, "v4": 1, "v5": 0}}
    streams = {
        "disc": {"levels": ["L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"], "classes": ["n", "d"]},
        "vertebra": {"levels": ["L1", "L2", "L3", "L4", "L5"], "classes": ["n", "d"]},
    }
    item = build_tianchi_datalist(info["images"], info["json"], class_map=cmap, streams=streams)[0]
    # T12-L1 is dropped (not a configured level); "v1,v5" -> 0 now; no "" entry, so nothing empty is left
    assert item["keypoints"]["disc"]["label"] == [0, 1, 1, 0, 1]


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda pts: pts[0]["tag"].update(identification="L9"), r"study 1\.2\.3\.100, point #0 \(L9\).*unknown ident"),
        (lambda pts: pts[6]["tag"].update(disc="v7"), r"point #6 \(L1-L2\).*unknown label.*v7"),
        (lambda pts: pts[1]["tag"].update(vertebra="x"), r"point #1 \(L2\).*unknown label"),
        (lambda pts: pts[2]["tag"].pop("vertebra"), r"point #2 \(L3\).*no 'vertebra' label"),
        (lambda pts: pts[3].update(coord=[500, 3]), r"point #3 \(L4\).*outside"),
    ],
)
def test_tianchi_errors(tmp_path, mutate, pattern):
    info = make_tianchi(tmp_path)
    annotation = info["annotation"]
    mutate(annotation[0]["data"][0]["annotation"][0]["data"]["point"])
    info["json"].write_text(json.dumps(annotation))
    with pytest.raises(BundleInputError, match=pattern):
        build_tianchi_datalist(info["images"], info["json"])


def test_tianchi_missing_instance(tmp_path):
    info = make_tianchi(tmp_path)
    annotation = info["annotation"]
    annotation[0]["data"][0]["instanceUid"] = "9.9.9"
    info["json"].write_text(json.dumps(annotation))
    with pytest.raises(BundleInputError, match=r"study 1\.2\.3\.100: annotated instance 9\.9\.9 not found"):
        build_tianchi_datalist(info["images"], info["json"])
    kept = build_tianchi_datalist(info["images"], info["json"], keep_unusable=True)  # evaluation's batch run
    skipped = [it for it in kept if it.get("skipped")]
    assert len(skipped) == 1 and "annotated instance 9.9.9 not found" in skipped[0]["skipped"]
    assert skipped[0]["image"] == [] and skipped[0]["keypoints"]["disc"]["mm"] == [None] * 6


# ---------------------------------------------------------------- folds and files


def synthetic_items(n: int) -> list[dict]:
    items = []
    for i in range(n):
        worst = 2 if i % 10 == 0 else (1 if i % 3 == 0 else 0)
        items.append(
            {
                "image": f"s{i}",
                "study_id": f"{i}",
                "series_id": "1",
                "keypoints": {"disc": {"mm": [None], "label": [0, worst, -1]}},
            }
        )
    extra = {"image": "s0b", "study_id": "0", "series_id": "2", "keypoints": {"disc": {"mm": [None], "label": [0]}}}
    items.append(extra)
    return items


def test_split_folds_partition_and_stratification():
    items = synthetic_items(50)
    studies = {it["study_id"] for it in items}
    seen = []
    for fold in range(5):
        train, val = split_folds(items, folds=5, fold=fold, seed=3)
        assert len(train) + len(val) == len(items)
        val_studies = {it["study_id"] for it in val}
        assert not val_studies & {it["study_id"] for it in train}  # a study never straddles
        seen.extend(val_studies)
        assert len(val_studies) == 10
        assert sum(1 for s in val_studies if int(s) % 10 == 0) == 1  # 5 severe studies, one per fold
    assert sorted(seen) == sorted(studies)
    assert split_folds(items, 5, 2, seed=3) == split_folds(list(items), 5, 2, seed=3)
    assert split_folds(items, 5, 2, seed=3)[1] != split_folds(items, 5, 2, seed=4)[1]
    with pytest.raises(ValueError):
        split_folds(items, folds=1)
    with pytest.raises(ValueError):
        split_folds(items, folds=5, fold=5)


def test_write_datalist_atomic_and_no_overwrite(tmp_path):
    out = tmp_path / "d" / "datalist.json"
    items = synthetic_items(4)
    write_datalist(out, items[:3], items[3:], format="rsna", streams=RSNA_STREAMS)
    content = read_datalist(out)
    assert content["format"] == "rsna"
    spec = RSNA_STREAMS[0]
    assert content["streams"] == {"disc": {"levels": list(spec.levels), "classes": list(spec.classes)}}
    assert all(Path(it["image"]).is_absolute() for it in content["training"] + content["validation"])
    with pytest.raises(FileExistsError):
        write_datalist(out, [], [], format="rsna", streams=RSNA_STREAMS)
    write_datalist(out, [], items, format="tianchi", streams=TIANCHI_STREAMS, overwrite=True)
    assert read_datalist(out)["format"] == "tianchi"
    assert [p.name for p in out.parent.iterdir()] == ["datalist.json"]  # no temp file left


def run_cli(*args: str, subprocess_run: bool = False) -> tuple[int, str]:
    """Run scripts/prepare_datalist.py in a subprocess (slow: imports torch) or in-process via its main()."""
    script = REPO / "scripts" / "prepare_datalist.py"
    if subprocess_run:
        res = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd="/")
        return res.returncode, res.stderr
    spec = importlib.util.spec_from_file_location("prepare_datalist", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = module.main(list(args))
    return code, err.getvalue()


def test_cli_rsna_and_tianchi(tmp_path):
    make_rsna(tmp_path / "rsna")
    out = tmp_path / "rsna.json"
    code, stderr = run_cli(
        "--format",
        "rsna",
        "--root",
        str(tmp_path / "rsna"),
        "--out",
        str(out),
        "--folds",
        "2",
        "--fold",
        "1",
        subprocess_run=True,
    )
    assert code == 0, stderr
    content = read_datalist(out)
    assert sorted(it["study_id"] for it in content["training"] + content["validation"]) == sorted([BIG_ID, "8"])
    code, stderr = run_cli("--format", "rsna", "--root", str(tmp_path / "rsna"), "--out", str(out))
    assert code == 1 and "exists" in stderr
    code, stderr = run_cli("--format", "rsna", "--root", str(tmp_path / "rsna"), "--out", str(out), "--overwrite")
    assert code == 0, stderr

    info = make_tianchi(tmp_path / "tc")
    out = tmp_path / "tc.json"
    code, stderr = run_cli(
        "--format",
        "tianchi",
        "--root",
        str(info["images"]),
        "--annotation",
        str(info["json"]),
        "--out",
        str(out),
        "--folds",
        "2",
    )
    assert code == 0, stderr
    content = read_datalist(out)
    assert content["format"] == "tianchi" and set(content["streams"]) == {"disc", "vertebra"}
    assert len(content["training"] + content["validation"]) == 1

    bad = tmp_path / "rsna" / "train.csv"
    bad.write_text(bad.read_text().replace("Severe", "Sever", 1))
    code, stderr = run_cli("--format", "rsna", "--root", str(tmp_path / "rsna"), "--out", str(tmp_path / "x.json"))
    assert code == 1 and "unknown severity" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x.json").exists()


def test_check_series_drops_series_the_loader_rejects(tmp_path):
    make_rsna(tmp_path)
    items = build_rsna_datalist(tmp_path)
    # study 8's series gets an image of another shape: the loader would raise, so it is dropped
    from dicom_fixtures import make_image, save

    odd = make_image(np.zeros((16, 40), np.uint16), ipp=(-30, -60, 40), series_uid="9.9", study_uid="9.8")
    headers = pydicom.dcmread(next((tmp_path / "train_images" / "8" / "55").glob("*.dcm")), stop_before_pixels=True)
    odd.SeriesInstanceUID = headers.SeriesInstanceUID
    save(odd, tmp_path / "train_images" / "8" / "55" / "99.dcm")
    kept, dropped = check_series(items)
    assert [it["study_id"] for it in kept] == [BIG_ID]
    assert dropped[0][0]["study_id"] == "8" and "mixes image shapes" in dropped[0][1]
    out = tmp_path / "checked.json"
    args = ("--format", "rsna", "--root", str(tmp_path), "--out", str(out), "--folds", "2", "--check-series")
    code, stderr = run_cli(*args)
    assert code == 0 and "dropped 1 series" in stderr
    content = read_datalist(out)
    assert [it["study_id"] for it in content["training"] + content["validation"]] == [BIG_ID]


def _spreadsheet_resave(path: Path, blank_rows: int = 3) -> None:
    """What a spreadsheet does to a CSV: BOM, CRLF line endings, trailing rows of bare commas."""
    lines = path.read_text().splitlines()
    width = lines[0].count(",")
    lines += ["," * width] * blank_rows
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))


def test_rsna_real_csv_quirks_give_the_same_items(tmp_path, caplog):
    make_rsna(tmp_path)
    expected = build_rsna_datalist(tmp_path)
    coords = tmp_path / "train_label_coordinates.csv"
    text = coords.read_text().replace("Spinal Canal Stenosis", "spinal_canal_stenosis")
    for level in ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"):
        text = text.replace(f",{level},", f",{level.lower().replace('/', '_')},")
    coords.write_text(text)
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"):
        _spreadsheet_resave(tmp_path / name)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        items = build_rsna_datalist(tmp_path)
    assert items == expected
    assert BIG_ID in [it["study_id"] for it in items]  # an id above 2**32 stays exact text
    assert "study  " not in caplog.text and "study :" not in caplog.text  # blank rows are no studies
    assert "study 7" in caplog.text  # the real skip is still reported
