"""Read the CSV tables of real data sets as they come: any line ending (LF, CRLF), an optional UTF-8
byte-order mark, and blank rows (a spreadsheet's trailing rows of bare commas) skipped silently."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence

from bundle.errors import BundleInputError

__all__ = ["is_blank_row", "read_csv_rows"]


def is_blank_row(row: Mapping[object, object]) -> bool:
    """True when every cell of a ``csv.DictReader`` row is empty or whitespace (``",,,"`` lines)."""
    values = []
    for value in row.values():
        values.extend(value if isinstance(value, list) else [value])  # DictReader puts extra cells in a list
    return all(not str(v or "").strip() for v in values)


def read_csv_rows(
    path: str | os.PathLike, required: Sequence[str], what: str = "CSV file"
) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` for each non-blank row, cells stripped, ids left as text.

    Raises:
        BundleInputError: the file is missing or unreadable, or misses a ``required`` column.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise BundleInputError(f"{name}: {what} not found")
    try:
        with open(name, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or ()]
            reader.fieldnames = header
            missing = [c for c in required if c not in header]
            if missing:
                raise BundleInputError(f"{name}: missing column(s) {missing} in the {what} (header: {header})")
            for row in reader:
                if not is_blank_row(row):
                    yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if isinstance(k, str)}
    except (UnicodeDecodeError, csv.Error) as err:
        raise BundleInputError(f"{name}: {what} is not a readable UTF-8 CSV ({err})") from err
