"""Errors raised on bad user input: each names the file or row and what is wrong.

Behind a MONAI Label server the same error becomes the HTTP answer: where Starlette (MONAI Label's web
framework) is installed, :class:`BundleInputError` is also its ``HTTPException``, so the server answers a
bad request with ``status_code`` and ``{"detail": message}`` instead of a bare "Internal Server Error".
"""

from __future__ import annotations

try:  # optional: only MONAI Label's environment needs it, nothing else depends on it
    from starlette.exceptions import HTTPException as _HTTPException

    _HTTP_BASES: tuple[type[Exception], ...] = (_HTTPException,)
except ImportError:  # pragma: no cover - depends on the environment
    _HTTP_BASES = ()

__all__ = ["BundleInputError", "MissingInputError"]


class BundleInputError(ValueError, *_HTTP_BASES):  # type: ignore[misc]
    """Bad input data (a file, folder, CSV row or annotation) with a message naming it.

    ``status_code`` (400) and ``detail`` (the message) are what an HTTP server answers with.
    """

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.detail = message
        self.headers = None

    def __str__(self) -> str:
        return self.detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r})"


class MissingInputError(BundleInputError):
    """The input names nothing that exists (an empty path, a missing file or folder): HTTP 404."""

    status_code = 404
