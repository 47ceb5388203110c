#!/usr/bin/env python
"""Write a clean MONAI model-zoo copy of this bundle into an empty folder.

Copies configs/, docs/ (without docs/dev/), the ``bundle`` package, scripts/ (with the MONAI Label app
scripts/monailabel_app, which serves the copy it is in; not the folders a server made there), LICENSE, README.md,
requirements*.txt and models/README.md; no tests, data, outputs, caches, virtual environments or the
repository's own format settings (setup.cfg, pyproject.toml: the zoo's apply inside the zoo).

Weights (``models/model.pt``), one of:
- at most 25 MB (the zoo's file limit): copied into the copy;
- published: ``--weights-url URL`` writes ``large_files.yml`` (path, url, hash_val, hash_type) with the hash
  of the local ``models/model.pt`` (or ``--weights-hash`` when it is not here); a placeholder URL or a
  missing hash is refused, because the zoo's ``verify_bundle.py`` downloads and checks that file first;
- ``--local-weights``: copies ``models/model.pt`` whatever its size, for a local ``verify_bundle.py`` or
  MONAI Label run (not for a zoo pull request when over 25 MB);
- ``--demo``: copies the CPU demo model ``models/demo/model.pt`` to ``models/model.pt`` and writes the demo's
  overrides (configs/demo.json) into the copy's ``configs/inference.json``, so the copy serves as it is;
- ``--no-weights``: code and configs only, whatever ``models/`` holds (weights added to the copy later).
Without any of these and without a ``models/model.pt``, the copy holds code and configs only too.

Example (from anywhere):
    python scripts/package_bundle.py --out /tmp/spineone --local-weights
    python scripts/package_bundle.py --out /tmp/spineone --weights-url https://host/releases/model.pt
    python scripts/package_bundle.py --out $APP/monaibundle/model/spineone --demo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_SHIPPED_BYTES = 25 * 1024 * 1024  # the zoo's limit for one file kept in its repository
COPIED_DIRS = ("configs", "docs", "bundle", "scripts")
COPIED_FILES = ("LICENSE", "README.md", "models/README.md")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".ipynb_checkpoints", ".DS_Store", "dev")
APP_DIR = "monailabel_app"  # scripts/monailabel_app: the MONAI Label app, shipped (it serves the copy it is in)
APP_RUNTIME_DIRS = ("bin", "lib", "logs", "model")  # made beside its main.py by MONAI Label's start_server
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")  # what the zoo's download step accepts
# reserved names that never resolve to published weights (RFC 2606 / 6761)
PLACEHOLDER_HOSTS = ("example.com", "example.net", "example.org", "localhost")
PLACEHOLDER_SUFFIXES = (".example", ".invalid", ".test", ".localhost")
DEMO_WEIGHTS = "models/demo/model.pt"
DEMO_CONFIG = "configs/demo.json"
DEMO_SKIPPED_KEYS = ("ckpt_dir",)  # the copy serves its models/model.pt, not models/demo/


class PackagingError(SystemExit):
    """A packaging request that cannot give a working zoo copy; the message says why and what to pass."""


def file_hash(path: Path, hash_type: str = "md5") -> str:
    """Hex digest of ``path`` with ``hash_type`` (one of HASH_TYPES), read in 1 MiB chunks."""
    digest = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_weights_url(url: str) -> str:
    """``url`` when it is an http(s) address on a real host; PackagingError otherwise."""
    parsed = urlparse(url)
    host = (parsed.hostname or "").lower()
    if parsed.scheme not in ("http", "https") or "." not in host:
        raise PackagingError(f"--weights-url {url!r} is not an http(s) download address (e.g. https://host/model.pt)")
    if host in PLACEHOLDER_HOSTS or host.endswith(PLACEHOLDER_SUFFIXES) or host.endswith(PLACEHOLDER_HOSTS):
        raise PackagingError(
            f"--weights-url {url!r} is a placeholder host that never resolves: upload models/model.pt first and pass"
            " its real download address"
        )
    return url


def large_files_entry(weights: Path, url: str, hash_val: str | None, hash_type: str) -> dict[str, str]:
    """The ``large_files.yml`` entry of ``models/model.pt``: a real URL and the file's hash, or PackagingError."""
    check_weights_url(url)
    if hash_type not in HASH_TYPES:
        raise PackagingError(f"--hash-type {hash_type!r}: the zoo accepts {', '.join(HASH_TYPES)}")
    local = file_hash(weights, hash_type) if weights.is_file() else None
    if hash_val is None and local is None:
        raise PackagingError(
            f"large_files.yml needs the hash of the published file and {weights} is not here to compute it: pass"
            f" --weights-hash (the {hash_type} of the uploaded model.pt, e.g. `{hash_type}sum model.pt`)"
        )
    if hash_val is not None and local is not None and hash_val.lower() != local:
        raise PackagingError(
            f"--weights-hash {hash_val} differs from the {hash_type} of {weights} ({local}): the published file is not"
            " this one"
        )
    value = (hash_val or local).lower()
    if len(value) != hashlib.new(hash_type).digest_size * 2 or any(c not in "0123456789abcdef" for c in value):
        raise PackagingError(f"--weights-hash {hash_val!r} is not a {hash_type} hex digest")
    return {"path": "models/model.pt", "url": url, "hash_val": value, "hash_type": hash_type}


def write_demo_overrides(src: Path, out: Path) -> dict[str, object]:
    """Write configs/demo.json's keys that inference.json has (but ``ckpt_dir``) into the copy's inference.json;
    a ``#``-path (``codec#radius``) sets that entry inside its section."""
    demo = json.loads((src / DEMO_CONFIG).read_text())
    path = out / "configs" / "inference.json"
    config = json.loads(path.read_text())
    overrides = {}
    for key, value in demo.items():
        *parents, last = key.split("#")
        section = config
        for part in parents:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict) and last in section and key not in DEMO_SKIPPED_KEYS:
            section[last] = value
            overrides[key] = value
    path.write_text(json.dumps(config, indent=4) + "\n")
    return overrides


def _ignored(folder: str, names: list[str]) -> set[str]:
    """IGNORED's names, plus the folders (and logs) a MONAI Label server left in the app's folder."""
    runtime = APP_RUNTIME_DIRS if Path(folder).name == APP_DIR else ()
    return set(IGNORED(folder, names)) | {name for name in names if name in runtime}


def _copy_sources(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, out / name, ignore=_ignored)
    for name in COPIED_FILES + tuple(p.name for p in sorted(src.glob("requirements*.txt"))):
        if (src / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, out / name)


def _copy_weights(weights: Path, out: Path) -> None:
    (out / "models").mkdir(exist_ok=True)
    shutil.copy2(weights, out / "models" / "model.pt")


def _check_request(src: Path, out: Path, weights: Path, mode: str, weights_url: str | None) -> None:
    """Everything that can be refused, before anything is written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackagingError(f"--out {out} exists and is not an empty folder; choose a new one")
    if not (src / "configs" / "metadata.json").is_file():
        raise PackagingError(f"{src} is not a bundle root (no configs/metadata.json)")
    if mode == "demo" and not (src / DEMO_WEIGHTS).is_file():
        raise PackagingError(
            f"--demo needs {src / DEMO_WEIGHTS}: train the demo first (README.md, quick start), then package it"
        )
    if mode == "local" and not weights.is_file():
        raise PackagingError(f"--local-weights needs {weights}: train first, or copy the weights there")
    oversized = weights.is_file() and weights.stat().st_size > MAX_SHIPPED_BYTES
    if mode == "auto" and oversized and weights_url is None:
        raise PackagingError(
            f"{weights} is over the zoo's {MAX_SHIPPED_BYTES >> 20} MB file limit, so the zoo copy lists it in "
            "large_files.yml, which needs a real download URL and hash: upload the file and pass --weights-url URL"
            " (its md5 is computed here; --hash-type sha256 for sha256), or pass --local-weights to copy it for a"
            " local verify_bundle.py run"
        )


def package(
    src: Path,
    out: Path,
    weights_url: str | None = None,
    *,
    weights_hash: str | None = None,
    hash_type: str = "md5",
    local_weights: bool = False,
    demo: bool = False,
    no_weights: bool = False,
) -> list[str]:
    """Copy the bundle at ``src`` into ``out`` (missing or empty); return the written paths relative to ``out``.

    Raises:
        PackagingError: ``out`` not empty, ``src`` not a bundle, conflicting options, weights over 25 MB
            without ``weights_url``, a placeholder URL or no hash for ``large_files.yml``, missing weights for
            ``local_weights`` or ``demo``.
    """
    if sum((weights_url is not None, local_weights, demo, no_weights)) > 1:
        raise PackagingError("choose one of --weights-url, --local-weights, --demo and --no-weights")
    modes = {"demo": demo, "local": local_weights, "none": no_weights, "url": weights_url is not None}
    mode = next((name for name, chosen in modes.items() if chosen), "auto")
    weights = src / "models" / "model.pt"
    _check_request(src, out, weights, mode, weights_url)
    entry = large_files_entry(weights, weights_url, weights_hash, hash_type) if mode == "url" else None
    _copy_sources(src, out)
    if mode == "demo":
        _copy_weights(src / DEMO_WEIGHTS, out)
        write_demo_overrides(src, out)
    elif entry is not None:
        note = (
            "# models/model.pt is published outside the zoo's repository (see docs/README.md, publishing the weights);\n"
            "# the zoo's CI and `python -m monai.bundle download` fetch it from url and check hash_val.\n"
        )
        (out / "large_files.yml").write_text(note + yaml.safe_dump({"large_files": [entry]}, sort_keys=False))
    elif mode != "none" and weights.is_file():  # auto (at most 25 MB, checked above) or local
        _copy_weights(weights, out)
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="missing or empty folder to write the bundle to")
    ap.add_argument("--src", type=Path, default=ROOT, help="bundle root to package (default: this repository)")
    weights = ap.add_mutually_exclusive_group()
    weights.add_argument("--weights-url", default=None, help="download URL of the published models/model.pt")
    weights.add_argument(
        "--local-weights", action="store_true", help="copy models/model.pt whatever its size (local verification)"
    )
    weights.add_argument(
        "--demo", action="store_true", help="serve the CPU demo: models/demo/model.pt plus configs/demo.json's keys"
    )
    weights.add_argument("--no-weights", action="store_true", help="code and configs only, whatever models/ holds")
    ap.add_argument("--weights-hash", default=None, help="hash of the published file when models/model.pt is not here")
    ap.add_argument("--hash-type", default="md5", choices=HASH_TYPES, help="hash type for large_files.yml")
    args = ap.parse_args(argv)
    src = args.src.resolve()
    files = package(
        src,
        args.out,
        args.weights_url,
        weights_hash=args.weights_hash,
        hash_type=args.hash_type,
        local_weights=args.local_weights,
        demo=args.demo,
        no_weights=args.no_weights,
    )
    print(f"wrote {len(files)} files to {args.out}")
    if not args.no_weights and "models/model.pt" not in files and "large_files.yml" not in files:
        print(
            "note: the copy has no weights (no models/model.pt here); the zoo's verify_bundle.py needs models/model.pt"
            " or large_files.yml: train first, or pass --weights-url for published weights",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
