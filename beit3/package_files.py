"""The files that ship inside the package (``beit3/configs/``: model presets, DeepSpeed configs, run configs), found
from any working directory, since a pip-installed package has no repository around it. In a checkout,
``configs/`` at the top is a link to ``beit3/configs/``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# YAML 1.1 (PyYAML) reads "3e-4" as a string (it wants "3.0e-4"); a learning rate or an epsilon should not depend on
# that.
_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def parse_yaml(text: str) -> Any:
    """YAML (or JSON, which YAML reads too) with scientific-notation strings turned into floats, nested ones too."""

    def numbers(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: numbers(v) for k, v in value.items()}
        if isinstance(value, list):
            return [numbers(v) for v in value]
        return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value) else value

    return numbers(yaml.safe_load(text))


def find_config_file(path: str | Path) -> Path:
    """``path`` itself when it is a file (absolute, or relative to the working directory), else the packaged file of
    that name: ``configs/tasks/vqa_base.yaml`` or ``tasks/vqa_base.yaml`` -> ``<package>/configs/tasks/vqa_base.yaml``.

    Raises FileNotFoundError naming every place it looked."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [] if path.is_absolute() else [CONFIG_DIR.parent / path, CONFIG_DIR / path]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        looked = ", ".join(str(p) for p in [path.resolve() if not path.is_absolute() else path, *candidates])
        raise FileNotFoundError(
            f"No config file at {path} (looked at {looked}); the packaged ones are under {CONFIG_DIR}."
        )
    return found
