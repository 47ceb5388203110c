"""Glue the configs call: data-set preparation, datalists and stream settings per data-set format."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bundle.errors import BundleInputError
from bundle.streams import RSNA_AXIAL_STREAMS, RSNA_STREAMS, RSNA_T1_STREAMS, TIANCHI_STREAMS

__all__ = [
    "DATASET_FORMATS",
    "SERIES",
    "default_streams",
    "prepare_dataset",
    "tianchi_sets",
    "load_datalist",
    "inference_datalist",
]

logger = logging.getLogger(__name__)

DATASET_FORMATS = ("rsna", "tianchi")
#: series types with a model of their own (one config each: train.json, then an override per series); the
#: sagittal T1 and axial T2 models exist for the RSNA format only
SERIES = ("sagittal_t2", "sagittal_t1", "axial_t2")
_SERIES_STREAMS = {"sagittal_t1": RSNA_T1_STREAMS, "axial_t2": RSNA_AXIAL_STREAMS}


def _check_format(dataset_format: str) -> str:
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"dataset_format must be one of {DATASET_FORMATS}, got {dataset_format!r}")
    return dataset_format


def _check_series(dataset_format: str, series: str) -> str:
    if series not in SERIES:
        raise ValueError(f"series must be one of {SERIES}, got {series!r}")
    if series != "sagittal_t2" and dataset_format != "rsna":
        raise ValueError(f"series {series!r} needs dataset_format 'rsna', got {dataset_format!r}")
    return series


def default_streams(dataset_format: str, series: str = "sagittal_t2") -> dict[str, dict[str, list[str]]]:
    """The config mapping ``{stream: {"levels": [...], "classes": [...]}}`` of a data-set format and series type."""
    specs = RSNA_STREAMS if _check_format(dataset_format) == "rsna" else TIANCHI_STREAMS
    specs = _SERIES_STREAMS.get(_check_series(dataset_format, series), specs)
    return {s.name: {"levels": list(s.levels), "classes": list(s.classes)} for s in specs}


def prepare_dataset(
    dataset_dir: str | Path,
    dataset_format: str,
    phantom_dir: str | Path | None = None,
    phantom_studies: int = 48,
    phantom_seed: int = 0,
    phantom_max_size: int = 512,
    phantom_profile: str = "easy",
) -> str:
    """Return ``dataset_dir``, generating the embedded phantom set there first when it is the phantom folder and absent.

    An existing phantom folder holding another ``phantom_profile`` ("easy" | "realistic") is an error, so
    a set of one profile is never reused for the other.

    A missing ``dataset_dir`` that is not the phantom folder is an error: real data is never invented.
    """
    dataset_dir = Path(dataset_dir)
    _check_format(dataset_format)
    is_phantom = phantom_dir is not None and dataset_dir.resolve() == Path(phantom_dir).resolve()
    if not dataset_dir.exists():
        if not is_phantom:
            raise BundleInputError(f"dataset_dir {dataset_dir} does not exist")
        from bundle.phantoms import generate_phantoms

        logger.info(
            f"generating {phantom_studies} {dataset_format} phantom studies (seed {phantom_seed}, "
            f"profile {phantom_profile}) in {dataset_dir}"
        )
        generate_phantoms(
            dataset_dir,
            layout=dataset_format,
            studies=phantom_studies,
            seed=phantom_seed,
            max_size=phantom_max_size,
            profile=phantom_profile,
            workers=max(1, min(2, os.cpu_count() or 1)),  # output is identical for any number of workers
        )
    elif not dataset_dir.is_dir():
        raise BundleInputError(f"dataset_dir {dataset_dir} is not a folder")
    elif is_phantom:
        from bundle.phantoms.layouts import phantom_profile_of

        found = phantom_profile_of(dataset_dir, dataset_format)
        if found is not None and found != phantom_profile:
            raise BundleInputError(
                f"phantom folder {dataset_dir} holds a {found!r} set but phantom_profile is {phantom_profile!r}; "
                "remove it or point phantom_dir elsewhere"
            )
    return str(dataset_dir)


def _read_datalist_file(path: Path, split: str) -> list[dict[str, Any]]:
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleInputError(f"datalist {path} cannot be read: {err}") from err
    if not isinstance(content, dict) or split not in content:
        raise BundleInputError(f"datalist {path} has no {split!r} list")
    return list(content[split])


def tianchi_sets(
    dataset_dir: str | Path, images: str | Sequence[str], annotations: str | Sequence[str]
) -> list[tuple[Path, Path]]:
    """``(image folder, annotation JSON)`` pairs under ``dataset_dir``: one name each, or two lists of equal length
    (``['lumbar_train150', 'lumbar_train51/train']`` with ``['lumbar_train150_annotation.json', ...]``)."""
    image_list = [images] if isinstance(images, (str, Path)) else list(images)
    annotation_list = [annotations] if isinstance(annotations, (str, Path)) else list(annotations)
    if not image_list or len(image_list) != len(annotation_list):
        raise BundleInputError(
            f"tianchi_images {image_list} and tianchi_annotation {annotation_list} must pair up one to one"
        )
    root = Path(dataset_dir)
    return [(root / str(i), root / str(a)) for i, a in zip(image_list, annotation_list)]


def load_datalist(
    dataset_dir: str | Path,
    dataset_format: str,
    split: str = "training",
    datalist: str | Path | None = None,
    folds: int = 5,
    fold: int = 0,
    seed: int = 0,
    tianchi_images: str | Sequence[str] = "lumbar_train",
    tianchi_annotation: str | Sequence[str] = "lumbar_train_annotation.json",
    max_items: int | None = None,
    skip_unusable: bool = False,
    series: str = "sagittal_t2",
) -> list[dict[str, Any]]:
    """Items of one split (``training``, ``validation`` or ``all``) for a data set, built by the readers.

    ``datalist``, when given, is a datalist JSON written by ``scripts/prepare_datalist.py`` and is used as is.
    Otherwise the readers scan ``dataset_dir`` (RSNA: the CSVs and ``train_images``; Tianchi: ``tianchi_images``
    and ``tianchi_annotation`` under it, one set or lists of sets, see :func:`tianchi_sets`) and the studies are
    split into ``folds`` by study, ``fold`` held out. ``skip_unusable`` (evaluation) keeps studies that cannot
    be used as skipped items (see ``bundle.skipping``) instead of dropping them or stopping. ``series``
    ``"sagittal_t1"`` builds the foraminal model's items (:func:`bundle.io.build_rsna_t1_datalist`), ``"axial_t2"``
    one item per (study, level) (:func:`bundle.io.axial.build_rsna_axial_datalist`).
    """
    if split not in ("training", "validation", "all"):
        raise ValueError(f"split must be 'training', 'validation' or 'all', got {split!r}")
    if datalist:
        path = Path(datalist)
        items = (
            _read_datalist_file(path, "training") + _read_datalist_file(path, "validation")
            if split == "all"
            else _read_datalist_file(path, split)
        )
    else:
        from bundle.io import build_rsna_datalist, build_tianchi_datalist, split_folds

        root = Path(dataset_dir)
        chosen = _check_series(_check_format(dataset_format), series)
        if chosen == "sagittal_t1":
            from bundle.io import build_rsna_t1_datalist

            all_items = build_rsna_t1_datalist(root, keep_unusable=skip_unusable)
        elif chosen == "axial_t2":
            from bundle.io.axial import build_rsna_axial_datalist

            all_items = build_rsna_axial_datalist(root, keep_unusable=skip_unusable)
        elif dataset_format == "rsna":
            all_items = build_rsna_datalist(root, keep_unusable=skip_unusable)
        else:
            all_items = [
                item
                for images, annotation in tianchi_sets(root, tianchi_images, tianchi_annotation)
                for item in build_tianchi_datalist(images, annotation, keep_unusable=skip_unusable)
            ]
        if not all_items:
            raise BundleInputError(f"no labelled study found in {root} ({dataset_format} layout)")
        if split == "all":
            items = all_items
        else:
            training, validation = split_folds(all_items, folds=folds, fold=fold, seed=seed)
            items = training if split == "training" else validation
    return items[:max_items] if max_items else items


def inference_datalist(
    dataset_dir: str | Path,
    dataset_format: str,
    tianchi_images: str | Sequence[str] | None = None,
    tianchi_annotation: str | Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Inference items, one per study; a study that cannot be used becomes a skipped item (``bundle.skipping``).

    RSNA, or Tianchi without options: :func:`bundle.studies.find_studies` on ``dataset_dir`` (each study's sagittal
    T2 series is chosen from its headers). Tianchi with ``tianchi_images``: the same on those folders under
    ``dataset_dir``; with ``tianchi_annotation`` as well: the series each study's annotation names, keypoints
    dropped (the annotation only says which series to read).
    """
    from bundle.studies import find_studies

    root = Path(dataset_dir)
    if _check_format(dataset_format) == "rsna":
        if tianchi_images or tianchi_annotation:
            logger.warning("tianchi_images / tianchi_annotation are unused with dataset_format rsna")
        return find_studies(root, on_error="skip")
    if not tianchi_images:
        if tianchi_annotation:
            raise BundleInputError("tianchi_annotation needs tianchi_images, the folder its studies are in")
        return find_studies(root, on_error="skip")
    if not tianchi_annotation:
        folders = [tianchi_images] if isinstance(tianchi_images, (str, Path)) else list(tianchi_images)
        return [item for folder in folders for item in find_studies(root / str(folder), on_error="skip")]
    from bundle.io import build_tianchi_datalist

    items = []
    for images, annotation in tianchi_sets(root, tianchi_images, tianchi_annotation):
        named = build_tianchi_datalist(images, annotation, keep_unusable=True)  # a missing series: skipped
        items += [{k: v for k, v in it.items() if k != "keypoints"} for it in named]
    return items
