"""Shared pytest settings: opt-in markers.

``monailabel``: tests that start a MONAI Label server. They need the separate environment of
requirements-monailabel.txt and run only when ``SPINEONE_MONAILABEL=1``; otherwise they are deselected.
"""

from __future__ import annotations

import os

import pytest

OPT_IN = {"monailabel": "SPINEONE_MONAILABEL"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "monailabel: starts a MONAI Label 0.8.5 server (opt-in: SPINEONE_MONAILABEL=1, see docs/README.md, MONAI Label)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected, deselected = [], []
    for item in items:
        off = [m for m, env in OPT_IN.items() if item.get_closest_marker(m) and os.environ.get(env) != "1"]
        (deselected if off else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
