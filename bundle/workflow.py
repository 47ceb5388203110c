"""Glue the configs call: data-set preparation, datalists and stream settings per data-set format."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bundle.errors import BundleInputError
from bundle.streams import RSNA_STREAMS, TIANCHI_STREAMS, StreamSpec, parse_streams

__all__ = ["DATASET_FORMATS", "default_streams", "stream_classes", "prepare_dataset", "load_datalist"]

logger = logging.getLogger(__name__)

DATASET_FORMATS = ("rsna", "tianchi")


def _check_format(dataset_format: str) -> str:
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"dataset_format must be one of {DATASET_FORMATS}, got {dataset_format!r}")
    return dataset_format


def default_streams(dataset_format: str) -> dict[str, dict[str, list[str]]]:
    """The config mapping ``{stream: {"levels": [...], "classes": [...]}}`` of a data-set format."""
    specs = RSNA_STREAMS if _check_format(dataset_format) == "rsna" else TIANCHI_STREAMS
    return {s.name: {"levels": list(s.levels), "classes": list(s.classes)} for s in specs}


def stream_classes(streams: Mapping[str, Mapping] | Sequence[StreamSpec]) -> dict[str, int]:
    """``{stream: number of classes}`` in stream order: what ``SpineOne`` and ``SpineOneLoss`` take."""
    return {s.name: s.num_classes for s in parse_streams(streams)}


def prepare_dataset(
    dataset_dir: str | Path,
    dataset_format: str,
    phantom_dir: str | Path | None = None,
    phantom_studies: int = 48,
    phantom_seed: int = 0,
    phantom_max_size: int = 512,
) -> str:
    """Return ``dataset_dir``, generating the embedded phantom set there first when it is the phantom folder and absent.

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
            f"generating {phantom_studies} {dataset_format} phantom studies (seed {phantom_seed}) in {dataset_dir}"
        )
        generate_phantoms(
            dataset_dir, layout=dataset_format, studies=phantom_studies, seed=phantom_seed, max_size=phantom_max_size
        )
    elif not dataset_dir.is_dir():
        raise BundleInputError(f"dataset_dir {dataset_dir} is not a folder")
    return str(dataset_dir)


def _read_datalist_file(path: Path, split: str) -> list[dict[str, Any]]:
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BundleInputError(f"datalist {path} cannot be read: {err}") from err
    if not isinstance(content, dict) or split not in content:
        raise BundleInputError(f"datalist {path} has no {split!r} list")
    return list(content[split])


def load_datalist(
    dataset_dir: str | Path,
    dataset_format: str,
    split: str = "training",
    datalist: str | Path | None = None,
    folds: int = 5,
    fold: int = 0,
    seed: int = 0,
    tianchi_images: str = "lumbar_train",
    tianchi_annotation: str = "lumbar_train_annotation.json",
    max_items: int | None = None,
) -> list[dict[str, Any]]:
    """Items of one split (``training``, ``validation`` or ``all``) for a data set, built by the readers.

    ``datalist``, when given, is a datalist JSON written by ``scripts/prepare_datalist.py`` and is used as is.
    Otherwise the readers scan ``dataset_dir`` (RSNA: the CSVs and ``train_images``; Tianchi: ``tianchi_images``
    and ``tianchi_annotation`` under it) and the studies are split into ``folds`` by study, ``fold`` held out.
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
        if _check_format(dataset_format) == "rsna":
            all_items = build_rsna_datalist(root)
        else:
            all_items = build_tianchi_datalist(root / tianchi_images, root / tianchi_annotation)
        if not all_items:
            raise BundleInputError(f"no labelled study found in {root} ({dataset_format} layout)")
        if split == "all":
            items = all_items
        else:
            training, validation = split_folds(all_items, folds=folds, fold=fold, seed=seed)
            items = training if split == "training" else validation
    return items[:max_items] if max_items else items
