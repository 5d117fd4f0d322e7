"""Run configs: a YAML file, with ``--set key=value`` overrides on any field (dotted keys reach nested ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Reads a YAML run config and applies ``key=value`` overrides; values are parsed as YAML (``3``, ``1e-3``, ``[1, 2]``, ``true``).

    A key that the file does not have is refused, so a typo cannot silently leave a default in place.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    config = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {override!r}.")
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise KeyError(f"--set {key}: {path} has no section {part!r}.")
            node = node[part]
        if parts[-1] not in node:
            raise KeyError(f"--set {key}: {path} has no field {key!r}; known here: {', '.join(sorted(node))}.")
        node[parts[-1]] = yaml.safe_load(value)
    return config
