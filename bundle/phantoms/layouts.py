"""Phantom sets on disk in the RSNA 2024 and Tianchi (SDID-TC) folder, CSV and JSON layouts."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
from bundle.errors import BundleInputError
from bundle.phantoms.dicom import MANUFACTURER, PROFILE_PROTOCOL, dataset_bytes, slice_dataset, write_atomic
from bundle.phantoms.profiles import check_profile
from bundle.phantoms.study import LAYOUTS, PHI_MARKER, PhantomStudy, phantom_study
from bundle.rsna_labels import CONDITIONS as RSNA_CONDITIONS
from bundle.rsna_labels import LEVEL_KEYS as _RSNA_LEVEL_KEYS
from bundle.rsna_labels import LEVELS as RSNA_LEVELS

__all__ = ["RSNA_CONDITIONS", "generate_phantoms", "phantom_profile_of", "planned_files"]

_RSNA_TABLES = ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv")
_TOP = {"rsna": set(_RSNA_TABLES) | {"train_images"}, "tianchi": {"lumbar_train", "lumbar_train_annotation.json"}}
_IMAGES = {"rsna": "train_images", "tianchi": "lumbar_train"}


def _dicom_paths(study: PhantomStudy) -> dict[str, tuple[int, int, bool]]:
    """Relative DICOM paths of a study -> (series position, spatial slice index, is a duplicate's copy)."""
    out = {}
    if study.layout == "rsna":
        for j, ser in enumerate(study.series):
            for k, copy in ser.files:
                inst = ser.duplicate_instance if copy else ser.instance_numbers[k]
                out[f"train_images/{study.study_id}/{ser.series_id}/{inst}.dcm"] = (j, k, copy)
    else:
        pairs = [(j, k, copy) for j, ser in enumerate(study.series) for k, copy in ser.files]
        order = np.random.default_rng([study.seed, study.index, 5]).permutation(len(pairs))  # shuffled file names
        for name, i in enumerate(order):
            out[f"lumbar_train/study{study.index}/image{name}.dcm"] = pairs[i]
    return out


def planned_files(studies: Sequence[PhantomStudy]) -> set[str]:
    """All relative paths (POSIX) a phantom set of these studies consists of."""
    if not studies:
        return set()
    files = set(_RSNA_TABLES) if studies[0].layout == "rsna" else {"lumbar_train_annotation.json"}
    for st in studies:
        files |= set(_dicom_paths(st))
    return files


def _is_phantom_dicom(path: Path) -> bool:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # any unreadable file: not ours
        return False
    return PHI_MARKER in str(ds.get("PatientID", "")) and str(ds.get("Manufacturer", "")) == MANUFACTURER


def phantom_profile_of(folder: str | Path, layout: str) -> str | None:
    """Profile ("easy" | "realistic") of the phantom set in ``folder`` (from its first DICOM), None if it has none."""
    images = Path(folder) / _IMAGES[layout]
    first = next(iter(sorted(images.rglob("*.dcm"))), None) if images.is_dir() else None
    if first is None:
        return None
    protocol = str(pydicom.dcmread(first, stop_before_pixels=True).get("ProtocolName", ""))
    return next((name for name, tag in PROFILE_PROTOCOL.items() if tag == protocol), "easy")


def _check_out_dir(out: Path, layout: str, planned: set[str], profile: str = "easy") -> None:
    """Refuse a non-empty folder unless it is a phantom set of this layout and profile that the new set overwrites."""
    if out.exists() and not out.is_dir():
        raise BundleInputError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    hint = "choose an empty or new folder"
    extra = sorted(p.name for p in out.iterdir() if p.name not in _TOP[layout])
    images = out / _IMAGES[layout]
    dicoms = sorted(images.rglob("*.dcm")) if images.is_dir() and not extra else []
    # every existing DICOM must be one of ours (phantom marker), so no user image is ever overwritten
    if extra or not dicoms or not all(_is_phantom_dicom(f) for f in dicoms):
        raise BundleInputError(
            f"{out}: folder is not empty and does not look like a {layout!r} phantom set"
            + (f" (unexpected entries {extra[:5]})" if extra else "")
            + f"; {hint}"
        )
    old = phantom_profile_of(out, layout)
    if old != profile:
        raise BundleInputError(f"{out}: holds a {old!r} phantom set, not {profile!r}; {hint}")
    existing = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    stale = sorted(existing - planned)
    if stale:
        raise BundleInputError(
            f"{out}: holds a previous phantom set with {len(stale)} file(s) the new set would not overwrite "
            f"(e.g. {stale[0]}); {hint}, or remove the old set yourself"
        )


def _write_study(study: PhantomStudy, out: Path) -> None:
    """Render and write all DICOM files of one study."""
    by_slice = {v: k for k, v in _dicom_paths(study).items()}
    for j, ser in enumerate(study.series):
        pixels = study.pixels(ser)
        for k, copy in ser.files:
            ds = slice_dataset(study, ser, k, pixels[k], duplicate=copy)
            write_atomic(out / by_slice[(j, k, copy)], dataset_bytes(ds))


def _write_study_job(args) -> None:
    seed, index, layout, min_size, max_size, freqs, profile, out = args
    st = phantom_study(
        seed, index, layout, min_size=min_size, max_size=max_size, class_frequencies=freqs, profile=profile
    )
    _write_study(st, out)


def _csv_bytes(rows: list[list]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


def _write_rsna_tables(studies: Sequence[PhantomStudy], out: Path) -> None:
    header = ["study_id"] + [f"{c}_{lv}" for c in RSNA_CONDITIONS for lv in _RSNA_LEVEL_KEYS]
    train, coords, series = (
        [header],
        [["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]],
        [["study_id", "series_id", "series_description"]],
    )
    for st in studies:
        grades = st.grades()
        train.append([st.study_id] + [grades.get(c, {}).get(lv, "") for c in RSNA_CONDITIONS for lv in RSNA_LEVELS])
        for series_id, instance, condition, level, x, y in st.label_rows():
            coords.append([st.study_id, series_id, instance, condition, level, f"{x:.2f}", f"{y:.2f}"])
        series += [[st.study_id, ser.series_id, ser.description] for ser in st.series]
    for name, rows in zip(_RSNA_TABLES, (train, coords, series)):
        write_atomic(out / name, _csv_bytes(rows))


def _write_tianchi_json(studies: Sequence[PhantomStudy], out: Path) -> None:
    items = []
    for st in studies:
        sag = st.sagittal_t2
        pts = st.tianchi_points()
        order = np.random.default_rng([st.seed, st.index, 7]).permutation(len(pts))  # real files mix the order
        points = []
        for i in order:
            p = pts[i]
            points.append(
                {
                    "coord": p["coord"],
                    "tag": {"identification": p["identification"], p["structure"]: p["tag"]},
                    "zIndex": p["zIndex"],
                }
            )
        items.append(
            {
                "studyUid": st.study_uid,
                "data": [
                    {
                        "seriesUid": sag.series_uid,
                        "instanceUid": sag.sop_uids[sag.middle],
                        "annotation": [{"annotator": 0, "data": {"point": points}}],
                    }
                ],
            }
        )
    write_atomic(out / "lumbar_train_annotation.json", json.dumps(items, indent=1).encode())


def generate_phantoms(
    out_dir: str | Path,
    layout: str = "rsna",
    studies: int = 8,
    seed: int = 0,
    *,
    min_size: int = 256,
    max_size: int = 512,
    class_frequencies: Mapping[str, Sequence[float]] | None = None,
    workers: int = 1,
    profile: str = "easy",
) -> Path:
    """Write a deterministic phantom data set in the RSNA or Tianchi layout and return its folder.

    The same arguments give byte-identical files. ``out_dir`` must be missing, empty, or a previous
    phantom set of the same layout whose files are all rewritten; nothing is ever deleted. Every file
    is written through a temporary name and ``os.replace``. ``workers > 1`` renders studies in that
    many processes (same bytes). ``profile``: "easy" (the original look) or "realistic" (randomised
    appearance, see ``bundle.phantoms.profiles``); a folder holding the other profile is refused.
    Ground truth in patient mm: :func:`bundle.phantoms.phantom_study`.

    Example:
        >>> import tempfile
        >>> d = generate_phantoms(tempfile.mkdtemp(), "tianchi", studies=1, min_size=64, max_size=64)
        >>> sorted(p.name for p in d.iterdir())
        ['lumbar_train', 'lumbar_train_annotation.json']
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(studies, (int, np.integer)) or studies < 1:
        raise ValueError(f"studies must be a positive int, got {studies!r}")
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    check_profile(profile)
    out = Path(out_dir)
    kw = dict(min_size=min_size, max_size=max_size, class_frequencies=class_frequencies, profile=profile)
    plan = [phantom_study(seed, i, layout, **kw) for i in range(int(studies))]
    _check_out_dir(out, layout, planned_files(plan), profile)
    out.mkdir(parents=True, exist_ok=True)
    if workers == 1 or len(plan) == 1:
        for st in plan:
            _write_study(st, out)
    else:
        freqs = None if class_frequencies is None else {k: list(v) for k, v in class_frequencies.items()}
        jobs = [(seed, i, layout, min_size, max_size, freqs, profile, out) for i in range(len(plan))]
        with ProcessPoolExecutor(max_workers=int(workers)) as pool:
            list(pool.map(_write_study_job, jobs))
    if layout == "rsna":
        _write_rsna_tables(plan, out)
    else:
        _write_tianchi_json(plan, out)
    return out
