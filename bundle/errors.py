"""Errors raised on bad user input: each names the file or row and what is wrong."""

from __future__ import annotations

__all__ = ["BundleInputError"]


class BundleInputError(ValueError):
    """Bad input data (a file, folder, CSV row or annotation) with a message naming it."""
