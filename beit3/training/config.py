"""Run configs: a YAML file, with ``--set key=value`` overrides on any field (dotted keys reach nested ones), and the
typed sections a program reads from it (``Section``: each field with its default and a one-line doc)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..io import write_json_atomic
from ..log import get_logger
from ..package_files import find_config_file, parse_yaml

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


def doc(
    text: str,
    default: Any = dataclasses.MISSING,
    low: float | None = None,
    high: float | None = None,
    below: float | None = None,
    above: float | None = None,
    choices: tuple | None = None,
    keys: Collection[str] | None = None,
):
    """A ``Section`` field with its one-line doc (shown by ``--print-config``); without ``default`` it is required.
    ``low``/``high`` (inclusive), ``above``/``below`` (exclusive) and ``choices`` are checked with the field's type
    when the section is built, so a bad value is named before any work; ``keys`` are the keys a dict field may hold
    (each of them ``--set`` as ``section.field.key``)."""
    limits = {
        k: v
        for k, v in (
            ("low", low),
            ("high", high),
            ("above", above),
            ("below", below),
            ("choices", choices),
            ("keys", None if keys is None else frozenset(keys)),
        )
        if v is not None
    }
    return dataclasses.field(default=default, metadata={"doc": text, **limits})


_SIMPLE_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,)}
_KIND_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "dict": "a mapping",
}
_BOUNDS = (("low", ">="), ("above", ">"), ("high", "<="), ("below", "<"))


def allowed(field: dataclasses.Field) -> str:
    """What a field takes, in words: ``an integer >= 1``, ``one of fp32, bf16, fp16``, ``a number > 0 and <= 1 or
    null``; empty for a type it does not check (tuples: the section's own ``__post_init__`` does)."""
    kinds = [kind.strip() for kind in str(field.type).split("|")]
    meta = field.metadata
    if "choices" in meta:
        what = "one of " + ", ".join(map(str, meta["choices"]))
    elif all(kind in _SIMPLE_TYPES for kind in kinds if kind != "None"):
        what = " or ".join(_KIND_WORDS[kind] for kind in kinds if kind != "None")
    else:
        return ""
    bounds = [f"{word} {meta[key]}" for key, word in _BOUNDS if key in meta]
    if bounds:
        what += " " + " and ".join(bounds)
    return what + (" or null" if "None" in kinds else "")


def check_keys(name: str, value: Any, keys: Collection[str]) -> None:
    """Refuses a mapping ``value`` (the field ``name``) with a key outside ``keys``, naming the known ones."""
    unknown = sorted(set(value) - set(keys)) if isinstance(value, dict) else []
    if unknown:
        colon = any(":" in str(key) for key in unknown)
        raise ValueError(
            f"{name} has unknown keys {unknown}; known: {', '.join(sorted(keys))}."
            + (
                " (YAML reads a key and its value as one key without a space after the colon: {a: 1}, not {a:1}.)"
                if colon
                else ""
            )
        )


def _check_field(section: str, field: dataclasses.Field, value: Any) -> Any:
    """``value`` checked against the field's annotation (its simple types: int, float, str, bool, dict, None) and its
    limits; an int given for a float comes back as a float. A value that does not fit is refused in one sentence:
    ``train.lr must be a number > 0; got 'fast'``."""
    kinds = [kind.strip() for kind in str(field.type).split("|")]
    if value is None and "None" in kinds:
        return value
    name = f"{section}.{field.name}" if section else field.name
    meta = field.metadata

    def refuse():
        raise ValueError(f"{name} must be {allowed(field)}; got {value!r}.")

    simple = [kind for kind in kinds if kind in _SIMPLE_TYPES]
    if simple and len(simple) == len([kind for kind in kinds if kind != "None"]):
        fits = [
            kind
            for kind in simple
            if isinstance(value, _SIMPLE_TYPES[kind]) and not (kind in ("int", "float") and isinstance(value, bool))
        ]
        if not fits:
            refuse()
        if fits == ["float"] and isinstance(value, int):
            value = float(value)
    if isinstance(value, float) and value != value:  # NaN passes every comparison below
        refuse()
    if "keys" in meta:
        check_keys(name, value, meta["keys"])
    if "choices" in meta and value not in meta["choices"]:
        refuse()
    for key, fails in (
        ("low", lambda v, b: v < b),
        ("high", lambda v, b: v > b),
        ("above", lambda v, b: v <= b),
        ("below", lambda v, b: v >= b),
    ):
        if key in meta and fails(value, meta[key]):
            refuse()
    return value


# Fields that moved to another section: an old config that still has one is told where it went.
MOVED_FIELDS = {"data.deepspeed": "train.deepspeed"}


@dataclasses.dataclass
class Section:
    """A typed section of a run config: the fields a program reads, with their defaults. ``from_config`` refuses a
    key the section does not declare (naming the known ones), and every declared field may be ``--set`` whether or
    not the YAML lists it; values are checked against each field's type and ``doc`` limits when it is built.
    Subclasses name their section in ``section`` (``""``: the top level, whose fields are the keys beside the
    sections); those with checks of their own run them in ``__post_init__``."""

    section: ClassVar[str] = ""

    @classmethod
    def title(cls) -> str:
        return cls.section or "top-level"

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def settable(cls) -> dict[str, set[str]]:
        """What ``--set`` may reach: {section: its fields} and {section.field: its keys} for each dict field that
        declares them (``doc(keys=...)``)."""
        paths = {cls.section: cls.field_names()}
        for field in dataclasses.fields(cls):
            if "keys" in field.metadata:
                paths[f"{cls.section}.{field.name}"] = set(field.metadata["keys"])
        return paths

    @classmethod
    def from_config(cls, values: dict | None):
        values = dict(values or {})
        known = cls.field_names()
        unknown = set(values) - known
        if unknown:
            where = f"{cls.section}." if cls.section else ""
            moved = [
                f"{where}{key} is now {MOVED_FIELDS[where + key]}"
                for key in sorted(unknown)
                if where + key in MOVED_FIELDS
            ]
            raise KeyError(
                f"Unknown {cls.title()} settings {sorted(unknown)}; known: {sorted(known)}."
                + (f" ({'; '.join(moved)}: move it there.)" if moved else "")
            )
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            where = f"{cls.section}." if cls.section else ""
            raise ValueError(
                f"The {cls.title()} section needs {', '.join(where + name for name in missing)} (there is no default)."
            )
        return cls(**values)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            setattr(self, field.name, _check_field(self.section, field, getattr(self, field.name)))

    def resolved(self) -> dict:
        """The section with every default filled in, as YAML would hold it (tuples as lists)."""

        def plain(value):
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


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
