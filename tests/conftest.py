"""Shared pytest settings: opt-in markers.

``monailabel``: tests that start a MONAI Label server. They need the separate environment of
requirements-monailabel.txt and run only when ``SPINEONE_MONAILABEL=1``; otherwise they are deselected.

``zoo_ci/``: the model-zoo unit test, written for the zoo's ``ci/unit_tests/`` and collected only there.

``meta_schema``: a copy of the model zoo's metadata schema, taken from the file named by the environment
variable ``SPINEONE_META_SCHEMA`` (``.ci/run`` points it at the workspace copy). No test reads outside the
repository by itself: without the variable, the tests that need the schema are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

OPT_IN = {"monailabel": "SPINEONE_MONAILABEL"}
# the zoo-layout unit test (unittest, run from a zoo checkout's root): tests/test_zoo.py runs it in that layout
collect_ignore = ["zoo_ci"]
SCHEMA_ENV = "SPINEONE_META_SCHEMA"


@pytest.fixture
def meta_schema(tmp_path: Path) -> Path:
    """The zoo's metadata schema (``meta_schema_20240725.json``), copied into ``tmp_path``."""
    source = os.environ.get(SCHEMA_ENV, "")
    if not source:
        pytest.skip(f"{SCHEMA_ENV} is not set: verify_metadata needs the model-zoo schema file offline")
    if not Path(source).is_file():
        pytest.fail(f"{SCHEMA_ENV}={source} does not name a file")
    return Path(shutil.copy(source, tmp_path / Path(source).name))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "monailabel: starts a MONAI Label 0.8.5 server (opt-in: SPINEONE_MONAILABEL=1, see docs/README.md, MONAI Label)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected, deselected = [], []
    for item in items:
        off = [m for m, env in OPT_IN.items() if item.get_closest_marker(m) and os.environ.get(env) != "1"]
        (deselected if off else selected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
