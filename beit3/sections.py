"""Typed sections: dataclasses whose fields carry a one-line doc and their limits (``doc``), checked when a section
is built (``Section``), so a bad value is named in one sentence before any work. Run configs are read into them
(``beit3.training.config``); the data layer declares its sampling options with them, so a setting is declared once,
where it is used."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any, ClassVar


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
