"""Readers: DICOM series loading, series selection and datalist builders (RSNA 2024, Tianchi)."""

from bundle.io.datalist import check_series, read_datalist, split_folds, streams_to_json, write_datalist
from bundle.io.dicom_series import (
    SliceHeader,
    SortedSeries,
    list_dicom_files,
    middle_indices,
    pixel_to_patient,
    plane_name,
    read_slice_headers,
    series_affine,
    slice_header,
    slice_normal,
    sort_series,
)
from bundle.io.loader import LoadSagittalSeriesd, load_sagittal_series
from bundle.io.pixels import read_dicom_pixels, read_header
from bundle.io.rsna import build_rsna_datalist, read_rsna_condition_labels
from bundle.io.sagittal_t1 import CropAroundCentred, LoadForamenSlabsd, build_rsna_t1_datalist, load_foramen_slabs
from bundle.io.series_selection import SeriesInfo, group_series, read_series_descriptions, select_sagittal_t2, weighting
from bundle.io.spacing import InPlaneSpacing, InPlaneSpacingd
from bundle.io.tianchi import DEFAULT_TIANCHI_CLASS_MAP, build_tianchi_datalist, index_dicom_folder

__all__ = [
    "SliceHeader",
    "SortedSeries",
    "list_dicom_files",
    "middle_indices",
    "pixel_to_patient",
    "plane_name",
    "read_slice_headers",
    "series_affine",
    "slice_header",
    "slice_normal",
    "sort_series",
    "LoadSagittalSeriesd",
    "load_sagittal_series",
    "read_dicom_pixels",
    "read_header",
    "InPlaneSpacing",
    "InPlaneSpacingd",
    "SeriesInfo",
    "group_series",
    "read_series_descriptions",
    "select_sagittal_t2",
    "weighting",
    "build_rsna_datalist",
    "read_rsna_condition_labels",
    "LoadForamenSlabsd",
    "CropAroundCentred",
    "build_rsna_t1_datalist",
    "load_foramen_slabs",
    "DEFAULT_TIANCHI_CLASS_MAP",
    "build_tianchi_datalist",
    "index_dicom_folder",
    "check_series",
    "read_datalist",
    "split_folds",
    "streams_to_json",
    "write_datalist",
]
