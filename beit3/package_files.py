"""The files that ship inside the package (``beit3/configs/``: model presets, DeepSpeed configs, run configs), found
from any working directory, since a pip-installed package has no repository around it. In a checkout,
``configs/`` at the top is a link to ``beit3/configs/``.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
