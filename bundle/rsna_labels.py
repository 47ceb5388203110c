"""RSNA 2024 Lumbar Spine Degenerative Classification names, defined once for the whole bundle.

Levels and severities appear in two spellings in the competition files: display names (``L1/L2``,
``Normal/Mild``; train_label_coordinates.csv and train.csv cells) and snake-case keys (``l1_l2``,
``normal_mild``; train.csv columns and submission rows). Conditions likewise (``Spinal Canal Stenosis``
in the coordinates file, ``spinal_canal_stenosis`` in column names).
"""

from __future__ import annotations

__all__ = [
    "CONDITION_NAMES",
    "CONDITIONS",
    "GROUPS",
    "LEVEL_KEYS",
    "LEVELS",
    "PRED_COLUMNS",
    "SAMPLE_WEIGHTS",
    "SEVERITIES",
    "SPINAL",
    "snake",
]


def snake(text: str) -> str:
    """``"L1/L2"`` -> ``"l1_l2"``, ``"Spinal Canal Stenosis"`` -> ``"spinal_canal_stenosis"``."""
    return text.strip().lower().replace(" ", "_").replace("/", "_").replace("-", "_")


#: condition names as in train_label_coordinates.csv
CONDITION_NAMES = (
    "Spinal Canal Stenosis",
    "Left Neural Foraminal Narrowing",
    "Right Neural Foraminal Narrowing",
    "Left Subarticular Stenosis",
    "Right Subarticular Stenosis",
)
#: condition keys as in train.csv columns and submission row ids
CONDITIONS = tuple(snake(c) for c in CONDITION_NAMES)
SPINAL = CONDITIONS[0]
#: the five lumbar disc levels, head to feet, as display names and as keys
LEVELS = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
LEVEL_KEYS = tuple(snake(lv) for lv in LEVELS)
#: severity classes in class-index order (train.csv cells)
SEVERITIES = ("Normal/Mild", "Moderate", "Severe")
#: submission probability columns, in the order of SEVERITIES
PRED_COLUMNS = tuple(snake(s) for s in SEVERITIES)
#: competition sample weight per severity class
SAMPLE_WEIGHTS = (1.0, 2.0, 4.0)
#: condition groups scored as separate log-loss terms
GROUPS = ("spinal", "foraminal", "subarticular")
