"""Refuse command-line options that no config of the run reads.

MONAI 1.6.1's ``python -m monai.bundle run`` adds any ``--key value`` to the config, so a misspelled
option (``--tianchi_image``) passes silently and the run goes on with the default. The configs' first
``initialize`` step calls :func:`check_overrides`, which reads the options of the command line and the
config files it names, and stops with an error naming the unknown option and the closest known one.
Written by hand: MONAI has no check of overrides against the configs.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bundle.errors import BundleInputError

__all__ = ["command_line_options", "run_parameters", "check_overrides", "unknown_option_message"]

logger = logging.getLogger(__name__)


def run_parameters() -> set[str]:
    """Names that ``monai.bundle run`` takes itself (``config_file``, ``meta_file``, ``run_id``, ...)."""
    from monai.bundle import ConfigWorkflow, scripts

    names: set[str] = set()
    for fn in (scripts.run, scripts.create_workflow, ConfigWorkflow.__init__):
        params = inspect.signature(fn).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    return names


def command_line_options(argv: Sequence[str]) -> dict[str, str | None]:
    """``{option: value}`` of ``--option value`` / ``--option=value`` / bare ``--flag`` tokens (fire's syntax)."""
    options: dict[str, str | None] = {}
    tokens = list(argv)
    for i, token in enumerate(tokens):
        if not token.startswith("--") or token == "--":
            continue
        name, eq, value = token[2:].partition("=")
        if not eq:
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            value = following if following is not None and not following.startswith("--") else None
        options[name.replace("-", "_")] = value
    return options


def _config_files(value: Any) -> list[str]:
    """The ``--config_file`` value as files: a path, ``"a,b"`` or a Python-style list ``"['a','b']"``."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError) as err:
            raise BundleInputError(f"--config_file {text!r} is not a list of file names ({err})") from err
    if not Path(text).is_file() and "," in text:
        return [part.strip() for part in text.split(",")]
    return [text]


def unknown_option_message(unknown: str, known: Iterable[str], option: str | None = None) -> str:
    """``unknown option --x: ...`` naming the first unknown (``#``-path) part and the closest known one."""
    match = difflib.get_close_matches(unknown, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean --{match[0]}?" if match else ""
    where = f" ({unknown} does not exist)" if option and option != unknown else ""
    return f"unknown option --{option or unknown}: no config file of this run reads it{where}{hint}"


def _bundle_config_keys(configs_dir: Path) -> dict[str, list[str]]:
    """Top-level keys of every config file of the bundle -> names of the files that have it."""
    keys: dict[str, list[str]] = {}
    for path in sorted(configs_dir.glob("*.json")):
        if path.name == "metadata.json":
            continue
        try:
            content = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for key in content if isinstance(content, dict) else ():
            keys.setdefault(str(key).split("#")[0].lstrip("+"), []).append(path.name)
    return keys


def check_overrides(argv: Sequence[str] | None = None, configs_dir: str | os.PathLike | None = None) -> None:
    """Stop on a ``--key`` of the command line that neither ``monai.bundle run`` nor any bundle config reads.

    A key (or ``#``-path) of the run's config files, or a ``monai.bundle run`` parameter, passes. A key that only
    other configs of the bundle read (``--learning_rate`` given to inference) is logged as a warning. Anything
    else raises BundleInputError naming the option and the closest known one.

    Without ``argv``, ``sys.argv`` is checked when it is a ``python -m monai.bundle run`` command line; a
    programmatic ``monai.bundle.run(...)`` call is not checked (its keyword arguments are out of reach).
    ``configs_dir`` defaults to the bundle's ``configs`` folder.
    """
    if argv is None:
        script = Path(sys.argv[0]) if sys.argv else Path()
        if script.name != "__main__.py" or script.parent.name != "bundle" or sys.argv[1:2] != ["run"]:
            logger.debug("not a 'python -m monai.bundle run' command line: options not checked")
            return
        argv = sys.argv[1:]
    from monai.bundle import ConfigParser

    options = command_line_options(argv)
    if options.get("args_file"):
        args = ConfigParser.load_config_file(options["args_file"])
        options = {**{k: v if isinstance(v, str) else json.dumps(v) for k, v in args.items()}, **options}
    if not options.get("config_file"):
        return
    parser = ConfigParser()
    parser.read_config([os.fspath(f) for f in _config_files(options["config_file"])])
    allowed = run_parameters()
    elsewhere = _bundle_config_keys(
        Path(configs_dir) if configs_dir else Path(__file__).resolve().parents[1] / "configs"
    )
    for option in options:
        if option in allowed or option.startswith("+") or option in parser:
            continue
        top = option.split("#")[0]
        if top not in parser and top in elsewhere:
            logger.warning(f"option --{option} is not read by this run (only by {', '.join(elsewhere[top])})")
            continue
        parts = option.split("#")
        depth = max(i for i in range(len(parts)) if i == 0 or "#".join(parts[:i]) in parser)
        parent = "#".join(parts[:depth])
        level = parser[parent] if parent else parser.get()
        children = level if isinstance(level, dict) else dict(enumerate(level)) if isinstance(level, list) else {}
        names = [f"{parent}#{k}" if parent else str(k) for k in children] + ([] if parent else sorted(allowed))
        raise BundleInputError(unknown_option_message("#".join(parts[: depth + 1]), names, option))
