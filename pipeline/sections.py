"""How a config section is declared and checked: value types with their rules, the `section` decorator, and
pydantic's validation errors turned into `ConfigError`s that name the key, the value and what is allowed.

A section is a frozen pydantic dataclass (attribute access, keyword construction, `dataclasses.replace`
and `asdict` as for any dataclass) that forbids unknown keys. Its errors read `KEY: got VALUE; FIX`, with
KEY the dotted path from the top of the config (`candidates.0.pooling`), whether it is built from YAML or
by keywords. Also here: reading a YAML config and the one `--set a.b=c` parser every command uses, and
`replace_keys` for code that changes keys with typed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from pathlib import Path
from typing import Annotated, Any

import pydantic
import yaml
from pydantic import AfterValidator, BeforeValidator, Strict

from pipeline.errors import ConfigError

# ------------------------------------------------------------------------------------------ value types


def rule(test: typing.Callable[[Any], bool], fix: str) -> AfterValidator:
    """A value check whose failure reads `KEY: got VALUE; FIX`."""
    def check(value):
        if value is not None and not test(value):
            raise ValueError(f"got {value!r}; {fix}")
        return value
    return AfterValidator(check)


def number_as_text(value: Any) -> Any:
    """YAML reads `layer: 12` as a number; a text key takes it as written."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def null_word(value: Any) -> Any:
    """An optional key given as the word null or ~ (quoted in YAML) is unset."""
    return None if isinstance(value, str) and value.lower() in ("null", "~") else value


def one_or_many(value: Any) -> Any:
    """A string or a list of strings, as a tuple."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"got {value!r}; expected a string or a list of strings")
    return tuple(items)


Whole = Annotated[int, Strict()]
Number = Annotated[float, Strict()]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, BeforeValidator(number_as_text), Strict()]
MaybeText = Annotated[Text | None, BeforeValidator(null_word)]
Texts = Annotated[tuple[str, ...], BeforeValidator(one_or_many)]
POSITIVE = rule(lambda value: value > 0, "it must be a positive number")
AUTO_OR_COUNT = rule(lambda value: value >= 0, "use 0 (auto) or a positive count")
FRACTION_OPEN = rule(lambda value: 0.0 < value < 1.0, "allowed: a fraction in (0, 1)")
Positive = Annotated[Whole, POSITIVE]
MaybePositive = Annotated[Whole | None, BeforeValidator(null_word), POSITIVE]
PositiveNumber = Annotated[Number, POSITIVE]
MaybePositiveNumber = Annotated[Number | None, BeforeValidator(null_word), POSITIVE]

# ------------------------------------------------------------------------------------------ sections


def section(key: str):
    """A frozen pydantic dataclass whose construction errors are `ConfigError`s naming `key.field`; its
    `validate()` method, if it has one, runs after the keys are checked (required keys, rules across them)."""
    def decorate(cls):
        cls.empty_if_none = pydantic.model_validator(mode="before")(classmethod(empty_if_none))
        if "validate" in vars(cls) and "__post_init__" not in vars(cls):
            cls.__post_init__ = cls.validate  # rules across keys run once every key is checked
        cls = pydantic.dataclasses.dataclass(frozen=True, config=pydantic.ConfigDict(extra="forbid"))(cls)
        cls.section_key = key
        validated_init = cls.__init__

        @functools.wraps(validated_init)
        def __init__(self, *args, **values):
            try:
                validated_init(self, *args, **values)
            except pydantic.ValidationError as error:
                raise config_error(error, type(self), type(self).section_key) from None
        cls.__init__ = __init__
        return cls
    return decorate


def empty_if_none(cls, data: Any) -> Any:
    """`model:` with nothing under it (YAML null) is the section with its defaults."""
    return {} if data is None else data


def replace_keys(config: Any, changes: dict[str, Any]) -> Any:
    """`config` with dotted keys set to typed values (`{"model.backbone": path}`), validated like any
    construction: for code that builds a config, where a `--set` string would need YAML quoting."""
    direct, nested = {}, {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, section_changes in nested.items():
        direct[head] = replace_keys(getattr(config, head), section_changes)
    return dataclasses.replace(config, **direct)


# ------------------------------------------------------------------------------------------ errors

EXPECTED = {"int_type": "expected a whole number", "float_type": "expected a number",
            "bool_type": "allowed values: true, false", "string_type": "expected a string",
            "dict_type": "expected a mapping", "tuple_type": "expected a list"}
UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden")


def config_error(error: pydantic.ValidationError, root: type, prefix: str) -> ConfigError:
    """The first problem pydantic found, as `KEY: got VALUE; what is allowed` (unknown keys: all of a section)."""
    details = error.errors(include_url=False)
    first = details[0]
    path = tuple(first["loc"])
    key = dotted(prefix, path)
    value, kind = first.get("input"), first["type"]
    if kind in UNKNOWN_KEY:
        return unknown_keys_error(details, root, prefix, path[:-1])
    if kind in ("value_error", "assertion_error"):
        text = str(first["ctx"]["error"])
        return ConfigError(f"{key}: {text}" if path else text)
    if kind.startswith("dataclass"):
        return ConfigError(f"{key or 'config'}: expected a mapping of keys, got {value!r}")
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", first["ctx"]["expected"])
        return ConfigError(f"{key}: got {value!r}; allowed values: {', '.join(allowed)}")
    return ConfigError(f"{key}: got {value!r}; {EXPECTED.get(kind, first['msg'])}")


def unknown_keys_error(details: list[dict], root: type, prefix: str, parent: tuple) -> ConfigError:
    unknown = sorted(str(detail["loc"][-1]) for detail in details
                     if detail["type"] in UNKNOWN_KEY and tuple(detail["loc"][:-1]) == parent)
    allowed = [item.name for item in dataclasses.fields(section_class(root, parent))]
    where = dotted(prefix, parent) or "config"
    message = f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(allowed)}"
    close = [match for name in unknown for match in difflib.get_close_matches(name, allowed, n=1)]
    return ConfigError(message + (f" (did you mean {', '.join(close)}?)" if close else ""))


def dotted(prefix: str, path: tuple) -> str:
    return ".".join(str(part) for part in ((prefix,) if prefix else ()) + path)


def section_class(root: type, path: tuple) -> type:
    """The section class at `path` (field names and list indices) below `root`."""
    cls = root
    for part in path:
        if isinstance(part, str):
            cls = cls.__pydantic_fields__[part].annotation
        if typing.get_origin(cls) is tuple:
            cls = typing.get_args(cls)[0]
    return cls


# ------------------------------------------------------------------------------------------ YAML and --set


def read_settings(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> dict:
    """The nested mapping of a YAML config file (if given) with `a.b=c` overrides applied, not yet checked."""
    data = read_yaml(path)
    check_override_pairs(overrides)
    for override in overrides:
        apply_override(data, override)
    return data


def read_yaml(path: str | Path | None) -> dict:
    """The mapping of sections in a YAML config file (empty without a file)."""
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {describe_yaml_error(error)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """`line L, column C: problem` (1-based, as editors count) instead of PyYAML's multi-line report."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (f"{problem} ({context})" if context else problem)


def check_override_pairs(overrides: typing.Sequence[str]) -> None:
    """`--set run.batch_size 64` (a space for the '='): name the exact fix instead of argparse's usage text."""
    for index, override in enumerate(overrides):
        if "=" in override:
            continue
        following = overrides[index + 1] if index + 1 < len(overrides) else None
        if following is not None and "=" not in following:
            raise ConfigError(f"--set {override} {following}: write the key and value joined by '=', "
                              f"e.g. --set {override}={following}")
        raise ConfigError(f"--set {override}: expected key=value, e.g. --set run.batch_size=64")


def apply_override(data: dict, override: str) -> None:
    """`a.b=c` sets data[a][b] to YAML `c`; a number reaches into a list (`candidates.1.weights=none`)."""
    key, separator, raw_value = override.partition("=")
    if not separator or not key:
        raise ConfigError(f"--set {override!r}: expected key=value, e.g. --set run.batch_size=64")
    *parents, leaf = key.strip().split(".")
    node = data
    for depth, part in enumerate(parents):
        if isinstance(node, list):
            where = ".".join(parents[: depth + 1])
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {override!r}: there is no {where} (the config lists {len(node)} "
                                  f"{parents[depth - 1] if depth else 'items'})")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {override!r}: {part} is not a section")
    if not isinstance(node, dict):
        raise ConfigError(f"--set {override!r}: {'.'.join(parents)} is a list; name an item by its number")
    try:
        node[leaf] = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML: {describe_yaml_error(error)}; "
                          "quote it, e.g. key='value'") from None
