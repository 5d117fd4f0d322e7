"""Run configs: a YAML file, with ``--set key=value`` overrides on any field (dotted keys reach nested ones)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# YAML 1.1 (PyYAML) reads "3e-4" as a string (it wants "3.0e-4"); a learning rate should not depend on that.
_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _numbers(value: Any) -> Any:
    """Turns scientific-notation strings into floats, in nested dicts and lists too."""
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value) else value


def load_config(path: str | Path, overrides: list[str] = (), declared: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """Reads a YAML run config and applies ``key=value`` overrides; values are parsed as YAML (``3``, ``1e-3``, ``[1, 2]``, ``true``).

    A key that the file does not have is refused, so a typo cannot silently leave a default in place, unless
    ``declared`` (section -> field names, e.g. ``{"train": TrainSettings.field_names()}``) names it as a setting.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No config file at {path}.")
    config = _numbers(yaml.safe_load(path.read_text()) or {})
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {override!r}.")
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise KeyError(f"--set {key}: {path} has no section {part!r}.")
            node = node[part]
        allowed = set(node) | set((declared or {}).get(".".join(parts[:-1]), ()))
        if parts[-1] not in allowed:
            raise KeyError(f"--set {key}: {path} has no field {key!r}; known here: {', '.join(sorted(allowed))}.")
        try:
            node[parts[-1]] = _numbers(yaml.safe_load(value))
        except yaml.YAMLError as error:
            raise ValueError(f"--set {key}: {value!r} is not a YAML value ({str(error).splitlines()[0]}). Quote strings with "
                             "braces or colons inside a list, e.g. --set 'data.sources.pairs=[\"shards/{000..009}.tar\"]'.") from error
    return config
