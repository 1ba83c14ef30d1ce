"""Configuration of the recipes: a dataclass per recipe, filled from a YAML file and `--key value` overrides.

`load_config(ConfigClass)` parses `--config FILE.yaml` and any `--key value [value ...]` tokens, converts
each value to its field's type and checks it against the field's `choices` and `check` metadata; a bad
key or value ends the program with a message that names both.
"""
import argparse
import dataclasses
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config key or value that is not valid; the message names both."""


def _bool_from_string(text: str) -> bool:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


def _dict_from_string(text: str):
    """A mapping given on the command line in YAML flow style: `{key: value, ...}`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(text) from error


_FROM_STRING = {int: int, float: float, bool: _bool_from_string, dict: _dict_from_string}


def _convert(key: str, kind: type, value, choices, check=None):
    """`value` (a command-line string or a YAML value) as a `kind`, checked against `choices` and by
    `check` (a function returning why a value is bad, or None). A bool key given without a value (a
    flag such as `--resume`) is true."""
    if value is None:
        if kind is bool:
            return True
        raise ConfigError(f"{key}: missing value")
    try:
        if isinstance(value, str) and kind is not str:
            value = _FROM_STRING[kind](value)
        if kind is float and type(value) is int:
            value = float(value)
    except ValueError:
        pass  # reported below, with the key
    if type(value) is not kind:
        raise ConfigError(f"{key}: invalid value {value!r} (expected {kind.__name__})")
    if choices and value not in choices:
        raise ConfigError(f"{key}: invalid value {value!r} (choose from {', '.join(map(str, choices))})")
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{key}: invalid value {value!r} ({problem})")
    return value


def config_from_dict(config_class: type, values: dict):
    """Build `config_class` from `values`, converting and checking every key against its field."""
    config_fields = {f.name: f for f in dataclasses.fields(config_class)}
    types = typing.get_type_hints(config_class)
    kwargs = {}
    for key, value in values.items():
        if key not in config_fields:
            raise ConfigError(f"unknown config key {key!r}")
        choices = config_fields[key].metadata.get("choices")
        check = config_fields[key].metadata.get("check")
        kind = types[key]
        if typing.get_origin(kind) is list:
            (item_kind,) = typing.get_args(kind)
            items = value if isinstance(value, list) else [value]
            kwargs[key] = [_convert(key, item_kind, item, choices, check) for item in items]
        elif isinstance(value, list):
            raise ConfigError(f"{key}: invalid value {value!r} (expected one {kind.__name__})")
        else:
            kwargs[key] = _convert(key, kind, value, choices, check)
    return config_class(**kwargs)


def _parse_overrides(tokens: list[str]) -> dict:
    """`--key value [value ...]` and `--key=value` tokens as {key: value or list of values}."""
    overrides, key = {}, None
    for token in tokens:
        if token.startswith("--"):
            key, _, value = token[2:].partition("=")
            key = key.replace("-", "_")
            overrides[key] = [value] if value else []
        elif key is None:
            raise ConfigError(f"unexpected argument {token!r} (overrides are --key value)")
        else:
            overrides[key].append(token)
    for key, values in overrides.items():  # no value: None, a flag (true) for bool keys
        overrides[key] = (values[0] if len(values) == 1 else values) if values else None
    return overrides


def load_config(config_class: type, argv=None, description: str = None):
    """Parse `--config FILE.yaml` and `--key value` overrides into `config_class`; a bad key or value
    ends the program with a message naming it."""
    keys = ", ".join(f.name for f in dataclasses.fields(config_class))
    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Any config key can be overridden with --key value: {keys}.",
    )
    parser.add_argument("--config", help="YAML file of config keys")
    args, override_tokens = parser.parse_known_args(argv)
    values = {}
    if args.config:
        values = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(values, dict):
            parser.error(f"{args.config}: expected a mapping of config keys")
    try:
        values.update(_parse_overrides(override_tokens))
        return config_from_dict(config_class, values)
    except ConfigError as error:
        parser.error(str(error))


