"""Sagittal T2 series selection without labels."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle.errors import BundleInputError  # noqa: E402
from bundle.io import select_sagittal_t2, weighting  # noqa: E402
from dicom_fixtures import AXIAL_IOP, write_series  # noqa: E402

STUDY = "1.2.826.0.1.77"


def constant(value):
    return lambda k, rows, cols: np.full((rows, cols), value, dtype=np.uint16)


def write_study(folder: Path, spec: list[tuple[str, str, tuple, int]]) -> dict[str, list[Path]]:
    """Mixed study folder (Tianchi style, all files side by side): (uid, description, iop, brightness)."""
    out = {}
    for i, (uid, desc, iop, value) in enumerate(spec):
        paths = write_series(
            folder / f"tmp{i}",
            n_slices=4,
            iop=iop,
            series_uid=uid,
            study_uid=STUDY,
            description=desc,
            pixel_fn=constant(value),
            seed=i,
        )
        moved = []
        for p in paths:
            target = folder / f"image{i}_{p.stem}.dcm"
            p.rename(target)
            moved.append(target)
        (folder / f"tmp{i}").rmdir()
        out[uid] = moved
    return out


SAG = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def test_weighting():
    assert weighting("Sagittal T2/STIR") == "t2"
    assert weighting("SAG STIR") == "t2"
    assert weighting("t2_tse_fs_sag") == "t2"
    assert weighting("Sagittal T1") == "t1"
    assert weighting("T1/T2 combo") == "unknown"
    assert weighting("") == "unknown"


def test_picks_brightest_sagittal_t2(tmp_path):
    files = write_study(
        tmp_path,
        [
            ("1.1", "T2_TSE_SAG", SAG, 900),
            ("1.2", "t2_tse_fs_sag", SAG, 300),  # fat-suppressed: darker
            ("1.3", "T1_TSE_SAG", SAG, 2000),  # T1 excluded even when brighter
            ("1.4", "T2_TSE_TRA", AXIAL_IOP, 3000),  # axial excluded
        ],
    )
    chosen = select_sagittal_t2(tmp_path)
    assert sorted(chosen) == sorted(files["1.1"])
    # spatial order along the slice normal (write_series returns spatial order)
    assert chosen == files["1.1"]
    assert sorted(select_sagittal_t2(sorted(tmp_path.glob("*.dcm")))) == sorted(files["1.1"])


def test_series_descriptions_win(tmp_path):
    files = write_study(tmp_path, [("1.1", "T2_TSE_SAG", SAG, 900), ("1.2", "", SAG, 300)])
    assert sorted(select_sagittal_t2(tmp_path, {"1.2": "Sagittal T2/STIR"})) == sorted(files["1.2"])
    csv_path = tmp_path.parent / "series.csv"
    csv_path.write_text("study_id,series_id,series_description\n1,1.2,Sagittal T2/STIR\n1,1.1,Sagittal T1\n")
    assert sorted(select_sagittal_t2(tmp_path, csv_path)) == sorted(files["1.2"])


def test_unknown_weighting_fallback_and_errors(tmp_path):
    write_study(tmp_path / "a", [("2.1", "T1_SAG", SAG, 900), ("2.2", "LOCALIZER", AXIAL_IOP, 900)])
    with pytest.raises(BundleInputError) as err:
        select_sagittal_t2(tmp_path / "a")
    message = str(err.value)
    assert str(tmp_path / "a") in message and "no sagittal T2" in message
    assert "2.1" in message and "T1_SAG" in message and "2.2" in message and "axial" in message

    files = write_study(tmp_path / "b", [("3.1", "", SAG, 500), ("3.2", "T1", SAG, 900)])
    assert sorted(select_sagittal_t2(tmp_path / "b")) == sorted(files["3.1"])

    with pytest.raises(BundleInputError, match="not found"):
        select_sagittal_t2(tmp_path / "missing")


def test_non_dicom_files_are_skipped(tmp_path):
    files = write_study(tmp_path, [("4.1", "SAG T2", SAG, 500)])
    (tmp_path / "DICOMDIR.dcm").write_text("junk")
    assert sorted(select_sagittal_t2(tmp_path)) == sorted(files["4.1"])
