"""YAML defaults under conf/, overridden by command-line flags."""

import argparse
from pathlib import Path
from typing import Any

import yaml

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def read_defaults(name: str) -> dict[str, Any]:
    """The mapping in conf/<name>.yaml, keys spelled as the flags' destinations."""
    path = CONF_DIR / f"{name}.yaml"
    with path.open() as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"error: {path}: expected a mapping of option names to values")
    return values


def apply_defaults(parser: argparse.ArgumentParser, name: str) -> None:
    """Make conf/<name>.yaml the parser's defaults; an unknown key is a one-line error."""
    values = read_defaults(name)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"conf/{name}.yaml: unknown option(s): {', '.join(unknown)}")
    parser.set_defaults(**values)
