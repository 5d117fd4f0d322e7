"""Run configs: a YAML file, with ``--set key=value`` overrides on any field (dotted keys reach nested ones), and the
typed sections a program reads from it (``Section``: each field with its default and a one-line doc)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from ..io import write_json_atomic
from ..log import get_logger
from ..package_files import find_config_file, parse_yaml
from ..sections import Section

logger = get_logger(__name__)


def load_config(
    path: str | Path, overrides: list[str] = (), declared: dict[str, set[str]] | None = None
) -> dict[str, Any]:
    """Reads a YAML run config and applies ``key=value`` overrides; values are parsed as YAML (``3``, ``1e-3``, ``[1, 2]``, ``true``).

    A key that the file does not have is refused, so a typo cannot silently leave a default in place, unless
    ``declared`` (a dotted path -> the names it may hold: ``Section.settable()``, e.g. ``{"train": {"lr", ...},
    "model.overrides": {"itm_weight", ...}}``) names it as a setting.
    """
    path = find_config_file(path)
    config = parse_yaml(path.read_text()) or {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {override!r}.")
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if ".".join(parts[: depth + 1]) in (declared or {}) and node.get(part) is None:
                node[part] = {}  # a declared section (or dict field) the file leaves out: its keys can still be set
            if not isinstance(node.get(part), dict):
                raise KeyError(f"--set {key}: {path} has no section {part!r}.")
            node = node[part]
        allowed = set(node) | set((declared or {}).get(".".join(parts[:-1]), ()))
        if parts[-1] not in allowed:
            raise KeyError(f"--set {key}: {path} has no field {key!r}; known here: {', '.join(sorted(allowed))}.")
        try:
            node[parts[-1]] = parse_yaml(value)
        except yaml.YAMLError as error:
            raise ValueError(
                f"--set {key}: {value!r} is not a YAML value ({str(error).splitlines()[0]}). Quote strings with "
                "braces or colons inside a list, e.g. --set 'data.sources.pairs=[\"shards/{000..009}.tar\"]'."
            ) from error
    return config


def print_config(config: dict, sections: dict[str, Section]) -> str:
    """The resolved config as YAML: the file and its ``--set`` overrides, each typed section with its defaults, and a
    comment line per declared field saying what it is."""
    resolved = dict(config)
    for section in sections.values():
        if section.section:
            resolved[section.section] = section.resolved()
        else:  # the top level's fields sit beside the sections
            resolved.update(section.resolved())
    lines = [yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None, width=120).rstrip()]
    for section in sections.values():
        lines.append(f"# {section.title()}:")
        lines += [f"#   {f.name}: {f.metadata.get('doc', '')}" for f in dataclasses.fields(section)]
    return "\n".join(lines)


# What a resumed run may change: how long it runs, how often it logs and saves, what it keeps, its loader workers,
# and the spelling of its output_dir. Anything else would make the resumed steps those of another run.
RESUMABLE_CHANGES = frozenset(
    {
        "train.max_steps",
        "train.save_every",
        "train.log_every",
        "train.keep_last",
        "train.max_nonfinite_steps",
        "train.num_workers",
        "train.output_dir",
    }
)


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict) and node:
        return {
            key: value for name, child in node.items() for key, value in _flatten(child, f"{prefix}{name}.").items()
        }
    return {prefix[:-1]: node}


def record_run_config(
    output_dir: Path, config: dict, resuming: bool, rank: int, may_change: frozenset = RESUMABLE_CHANGES
) -> list[str]:
    """Writes ``output_dir/run_config.json`` (rank 0, atomically), after checking ``config`` against the one of
    the run it will resume (``resuming``: output_dir holds complete checkpoints), if any: a changed field outside ``may_change`` raises ValueError naming each field
    with its old and new value, and nothing is written. Returns the allowed changes taken ("field: old -> new").

    Call it before writing anything else into output_dir (``model/config.json``...), so that a refused
    resume leaves the run's files as the checkpoints need them.
    """
    path = Path(output_dir) / "run_config.json"
    resolved = json.loads(json.dumps(config))  # tuples as lists, as the file has them
    taken = []
    if resuming and path.is_file():
        old, new = _flatten(json.loads(path.read_text())), _flatten(resolved)
        missing = "(not set)"
        changed = {
            key: (old.get(key, missing), new.get(key, missing))
            for key in sorted(old.keys() | new.keys())
            if old.get(key, missing) != new.get(key, missing)
        }
        refused = {key: change for key, change in changed.items() if key not in may_change}
        if refused:
            raise ValueError(
                f"{output_dir} holds checkpoints of a run with another config: "
                + "; ".join(f"{key}: {a!r} -> {b!r}" for key, (a, b) in refused.items())
                + f". A resumed run may change only {', '.join(sorted(may_change))}. Restore those fields to "
                "resume, or give the new run another train.output_dir."
            )
        taken = [f"{key}: {a!r} -> {b!r}" for key, (a, b) in changed.items()]
        if taken and rank == 0:
            logger.warning(f"resuming {output_dir} with changed settings: {'; '.join(taken)}")
    if rank == 0:
        write_json_atomic(path, resolved, indent=2)
    return taken
