"""Streams for tests that only need class counts: ``streams(disc=3)`` -> StreamSpecs with placeholder levels."""

from __future__ import annotations

from bundle.streams import StreamSpec


def streams(levels: int = 5, **counts: int) -> tuple[StreamSpec, ...]:
    """One StreamSpec per keyword, ``name=C`` classes (``c0``..), ``levels`` levels (``l0``.. head to feet)."""
    return tuple(
        StreamSpec(name, tuple(f"l{i}" for i in range(levels)), tuple(f"c{i}" for i in range(c)))
        for name, c in counts.items()
    )
