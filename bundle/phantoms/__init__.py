"""Embedded phantom data set: deterministic synthetic lumbar spine MRI written as real DICOM.

Studies are generated from ``(seed, index)`` in patient mm (anatomy, degeneration labels, series
geometry) and written in the RSNA 2024 (full layout: sagittal T2, sagittal T1 and axial T2 series, all
25 condition-levels) or Tianchi layout, so the same readers serve real and phantom data.
``phantom_study`` gives the in-memory ground truth (keypoints in patient mm, classes, geometry)
without touching the disk.

Example:
    >>> from bundle.phantoms import phantom_study
    >>> st = phantom_study(seed=0, index=0, layout="tianchi", min_size=64, max_size=96)
    >>> sorted(st.keypoints_mm())
    ['canal', 'disc', 'vertebra']
"""

from bundle.phantoms.anatomy import DEFAULT_CLASS_FREQUENCIES, Lateral, Spine, check_class_frequencies
from bundle.phantoms.geometry import SeriesGeometry
from bundle.phantoms.layouts import RSNA_CONDITIONS, generate_phantoms
from bundle.phantoms.study import PHI_MARKER, SERIES_RATES, PhantomSeries, PhantomStudy, phantom_study

__all__ = [
    "PHI_MARKER",
    "DEFAULT_CLASS_FREQUENCIES",
    "RSNA_CONDITIONS",
    "SERIES_RATES",
    "Lateral",
    "PhantomSeries",
    "PhantomStudy",
    "SeriesGeometry",
    "Spine",
    "check_class_frequencies",
    "generate_phantoms",
    "phantom_study",
]
