#!/usr/bin/env python
"""Write a clean MONAI model-zoo copy of this bundle into an empty folder.

Copies configs/, docs/ (without docs/dev/), the ``bundle`` package, scripts/, LICENSE, README.md,
requirements*.txt and models/README.md; no tests, data, outputs, caches or virtual environments.
``models/model.pt`` is copied when it exists and is at most 25 MB; otherwise it is listed in
``large_files.yml`` (path, url, hash_val, hash_type), the zoo's way of shipping large weights. Without
a trained model.pt the entry holds a placeholder URL and an empty hash to be filled in on release.

Example (from anywhere):
    python scripts/package_bundle.py --out /tmp/spineone_bundle
    python scripts/package_bundle.py --out /tmp/spineone_bundle --weights-url https://host/model.pt
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_SHIPPED_BYTES = 25 * 1024 * 1024  # the zoo's limit for files kept in the repository
PLACEHOLDER_URL = "https://example.invalid/spineone/model.pt"
COPIED_DIRS = ("configs", "docs", "bundle", "scripts")
COPIED_FILES = ("LICENSE", "README.md", "models/README.md")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".ipynb_checkpoints", ".DS_Store", "dev")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package(src: Path, out: Path, weights_url: str | None = None) -> list[str]:
    """Copy the bundle at ``src`` into ``out`` (missing or empty); return the written paths relative to ``out``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"--out {out} exists and is not an empty folder; choose a new one")
    if not (src / "configs" / "metadata.json").is_file():
        raise SystemExit(f"{src} is not a bundle root (no configs/metadata.json)")
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / name, ignore=IGNORED)
    for name in COPIED_FILES + tuple(p.name for p in sorted(src.glob("requirements*.txt"))):
        if (src / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, out / name)
    weights = src / "models" / "model.pt"
    if weights.is_file() and weights.stat().st_size <= MAX_SHIPPED_BYTES:
        (out / "models").mkdir(exist_ok=True)
        shutil.copy2(weights, out / "models" / "model.pt")
    else:
        entry = {
            "path": "models/model.pt",
            "url": weights_url or PLACEHOLDER_URL,
            "hash_val": _md5(weights) if weights.is_file() else "",
            "hash_type": "md5",
        }
        note = (
            "# models/model.pt is not shipped in the repository (over 25 MB or not trained yet).\n"
            "# Fill in url (and hash_val when empty) on release; `python -m monai.bundle download` fetches it.\n"
        )
        (out / "large_files.yml").write_text(note + yaml.safe_dump({"large_files": [entry]}, sort_keys=False))
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="missing or empty folder to write the bundle to")
    ap.add_argument("--src", type=Path, default=ROOT, help="bundle root to package (default: this repository)")
    ap.add_argument("--weights-url", default=None, help="download URL of models/model.pt for large_files.yml")
    args = ap.parse_args(argv)
    files = package(args.src.resolve(), args.out, args.weights_url)
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
