"""The docstring examples of every module of the ``bundle`` package run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import bundle
import pytest

MODULES = sorted(m.name for m in pkgutil.walk_packages(bundle.__path__, prefix="bundle."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
