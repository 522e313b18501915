"""The typed config loader: dataclasses from YAML mappings, `--set` overrides, presets.

Each section of a recipe is a dataclass defined beside the code that reads it (`ModelConfig` in
llm.models.config, `DataConfig` in llm.data.config, `TrainConfig` in llm.train.config, ...);
llm.run.recipe composes them into the whole recipe. This module knows none of them: it holds
the machinery they share.

`build_config(cls, data)` turns a plain mapping (from YAML) into a dataclass, field by field:
unknown keys, wrong types and values out of range raise `ConfigError` naming the field's dotted
path, so a user sees one line such as ``model.n_heads: 7 does not divide d_model=768``.
A plug-in's settings (a task's options, a transform's, an adapt method's) are a tagged union
(`OneOf`): the mapping's `name:` (or `method:`) picks the settings class from a registry.

YAML is read with `yaml.safe_load` only, a key given twice is refused; `--set a.b=c` overrides
are parsed as YAML scalars and merged before validation, so they are checked like the file.
Presets (`base: gpt2-124m`, `deepspeed.preset: zero1`) are files shipped in llm/presets/.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from llm.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message starts with the field's dotted path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


# ----------------------------------------------------------------------------
# Checks the sections' validate() methods share
# ----------------------------------------------------------------------------


def join(path: str, name: str) -> str:
    """The dotted path of field `name` under `path` ("" at the top level)."""
    return f"{path}.{name}" if path else name


def check(ok: bool, path: str, message: str) -> None:
    """Raise ConfigError(path, message) unless `ok`."""
    if not ok:
        raise ConfigError(path, message)


def positive(obj, path: str, *names: str) -> None:
    """Each field `names` of `obj` is > 0."""
    for name in names:
        value = getattr(obj, name)
        check(value > 0, join(path, name), f"must be > 0, got {value}")


def fraction(obj, path: str, *names: str) -> None:
    """Each field `names` of `obj` is in [0, 1)."""
    for name in names:
        value = getattr(obj, name)
        check(0.0 <= value < 1.0, join(path, name), f"must be in [0, 1), got {value}")


# ----------------------------------------------------------------------------
# Dataclasses from mappings, with type checks
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: typing hashes Annotated metadata
class OneOf:
    """A tagged union of settings dataclasses, used as `Annotated[Any, OneOf(...)]` in a section.

    `tag` is the key that names the member (`name:` of a task or a transform, `method:` of
    `adapt:`), `members` maps each name to its settings dataclass (a registry's), `kind` says what
    the names are in errors. A mapping {tag: NAME, setting: value, ...}, or NAME alone, becomes an
    instance of `members[NAME]` built from the other keys with the checks of every section, so an
    error names the path as the user wrote it (`adapt.rank: must be >= 1, got 0`). The instance has
    the tag as its first field (see `tagged`): `dataclasses.asdict` gives the mapping back."""

    tag: str
    members: Mapping[str, type]
    kind: str

    def build(self, value: Any, path: str):
        """The settings `value` stands for; one of this union's built settings is returned as it is.

        Raises ConfigError naming `path` (a bad value or name) or the setting at fault."""
        name = getattr(value, self.tag, None) if dataclasses.is_dataclass(value) else None
        if name in self.members and type(value) is tagged(self.members[name], self.tag, name):
            return value
        if isinstance(value, str):
            if value not in self.members:
                raise ConfigError(path, f"unknown {self.kind} {value!r} (known: {', '.join(self.members)})")
            value = {self.tag: value}
        if not isinstance(value, dict) or self.tag not in value:
            raise ConfigError(
                path, f"expected a mapping with {self.tag}: (one of {', '.join(self.members)}), got {value!r}"
            )
        name = value[self.tag]
        choices = ", ".join(map(repr, self.members))
        check(
            isinstance(name, str) and name in self.members,
            join(path, self.tag),
            f"expected one of {choices}, got {name!r}",
        )
        return build_config(tagged(self.members[name], self.tag, name), value, path)


@functools.cache
def tagged(cls: type, tag: str, name: str) -> type:
    """The dataclass `cls` with a first field `tag` fixed to `name`: a member of a `OneOf` union as
    it is held in a recipe. It is a subclass of `cls` (its checks, methods and isinstance hold), and
    `dataclasses.asdict` writes it as the user wrote it, {tag: name, setting: value, ...}."""
    head = dataclasses.make_dataclass(
        f"{cls.__name__}Tag", [(tag, Literal[name], dataclasses.field(default=name, kw_only=True))]
    )
    out = dataclasses.make_dataclass(cls.__name__, [], bases=(cls, head))  # head's field comes first
    out.__qualname__, out.__module__ = cls.__qualname__, cls.__module__
    return out


def fields_set(obj) -> set[str]:
    """The fields of a built config that its mapping gave (pydantic's `model_fields_set`); every
    field of one made in code."""
    given = getattr(obj, "_fields_set", None)
    return {f.name for f in dataclasses.fields(obj)} if given is None else given


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it (converted where lossless)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        union = next((e for e in extras if isinstance(e, OneOf)), None)
        return union.build(value, path) if union is not None else _coerce(base, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                # the error of the member shaped like the value (a list, a mapping) says the most
                shaped = (isinstance(value, list) and typing.get_origin(arg) is list) or (
                    isinstance(value, dict) and (typing.get_origin(arg) is dict or dataclasses.is_dataclass(arg))
                )
                errors.insert(0, e) if shaped else errors.append(e)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(path, f"expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(item, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_config(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads `1e-5` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(path, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def build_config(cls, data: Any, path: str = ""):
    """Build dataclass `cls` from a mapping, checking keys, types and ranges, then `validate(path)`
    when the class has one. A built `cls` (or subclass) is checked again from its fields."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if isinstance(data, cls):
        data = {k: v for k, v in dataclasses.asdict(data).items() if k in fields}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", f"unknown key (known: {', '.join(fields)})")
    for name, f in fields.items():
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if missing and name not in data:
            raise ConfigError(f"{prefix}{name}", "missing")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    obj._fields_set = set(kwargs)  # see fields_set
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(path)
    return obj


# ----------------------------------------------------------------------------
# YAML, overrides, presets
# ----------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r}: first on line {first.start_mark.line + 1}, "
                    f"again on line {key_node.start_mark.line + 1}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str):
    """`yaml.safe_load` that raises yaml.YAMLError on a duplicate key (naming it and both lines)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping safely, naming the file in every error (a key given twice is one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "file not found")
    try:
        data = safe_load_unique(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(str(path), f"not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"not a text file ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides (values parsed as YAML) to a nested mapping in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "an override is written key.path=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is {child!r}, not a mapping, so {key} cannot be set")
            node = child
        node[parts[-1]] = value
    return data


PRESETS = Path(__file__).resolve().parent / "presets"  # shipped inside the package (package data)


def preset_names(kind: str) -> list[str]:
    """Names of the presets of `kind` ("models" or "deepspeed") that ship with llm."""
    return sorted(p.stem for p in (PRESETS / kind).glob("*.*"))


def find_preset(kind: str, name: str, field: str, base_dir: Path | None = None) -> Path:
    """`name` as a file (as given, or relative to `base_dir`), else the packaged preset of that name.

    Raises ConfigError naming `field` and the known presets when neither exists."""
    suffix = ".json" if kind == "deepspeed" else ".yaml"
    for candidate in (Path(name), base_dir / name if base_dir else None, PRESETS / kind / f"{name}{suffix}"):
        if candidate is not None and candidate.is_file():
            return candidate
    if "/" in name or name.endswith((".json", ".yaml", ".yml")):
        raise ConfigError(name, "file not found")
    raise ConfigError(field, f"{name!r} is neither a file nor a preset (known: {', '.join(preset_names(kind))})")


def with_base(section: dict, kind: str, path: str, base_dir: Path | None = None) -> dict:
    """`section` over the preset or file its `base:` key names (`model: {base: gpt2-124m, ...}`):
    the base's fields, then the section's own. Raises ConfigError naming `path.base`."""
    section = dict(section)
    base = section.pop("base", None)
    if base is None:
        return section
    if not isinstance(base, str):
        raise ConfigError(join(path, "base"), f"expected a path or a preset name, got {base!r}")
    return {**load_yaml(find_preset(kind, base, join(path, "base"), base_dir)), **section}
