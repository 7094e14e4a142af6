"""`preftune <command>` arguments, parsed once, and each command's `--help`.

Every command reads its arguments the same way:

    preftune COMMAND [POSITIONAL] [--config FILE] [--key value | --key=value ...] [its own --flags]

`parse_command_line` turns them into a `CommandLine`: the config file, the overrides as a
{key: value} mapping (values read as YAML scalars, keys as written: `from_dict` resolves aliases and
refuses unknown keys; a true/false key written bare, `--bf16`, is true, as in transformers'
HfArgumentParser) and the command's own flags. `load_config(line.config, line.overrides)` then
reads the file, applies the overrides and validates. `command_help` prints the config keys of the
groups a command reads (`cli.COMMAND_GROUPS`); every command still accepts every key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import yaml

from preftune.config.compat import ALIASES, NOT_HONOURED
from preftune.config.schema import FIELDS, GROUPS, TYPES_BASE
from preftune.errors import ConfigError


class CommandLine(NamedTuple):
    config: str | None  # the config file: --config FILE, or the positional of a command whose positional is it
    overrides: dict[str, Any]  # --key value, in the order given, values read as YAML
    flags: dict[str, Any]  # the command's own options: their defaults, or the strings given (a switch: True)


def wants_help(args: list[str]) -> bool:
    """-h or --help anywhere among a command's arguments: its help, whatever else is there."""
    return any(a in ("-h", "--help") for a in args)


def _yaml_value(name: str, value: str) -> Any:
    """A value from the command line as YAML reads it (`0.1` a number, `a,b` text, `{a: b}` a mapping)."""
    if value == "":
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: --{name} {value!r} is read as YAML and is not valid YAML "
                          f"({str(e).splitlines()[0]}); quote or fix the value") from None


def _is_boolean(key: str) -> bool:
    """A true/false config key (bf16, do_eval, ...; its alias too): written bare on the command line, it means true."""
    name = ALIASES.get(key, key)
    if name in TYPES_BASE:
        return TYPES_BASE[name] is bool
    return name in NOT_HONOURED and any(value is True or value is False for value in NOT_HONOURED[name][0])


def parse_command_line(args: list[str], positional: str | None = None, flags: dict[str, Any] | None = None,
                       aliases: dict[str, str] | None = None) -> CommandLine:
    """`preftune <command>` arguments -> CommandLine(config file, {key: value} overrides, own flags).

    positional: what the command's one positional argument is: None for the config file (train), else
    a config key (inspect: dataset, export: model_name_or_path) or one of the command's flags.
    flags: the command's own options (not config keys), name -> default; a bool default makes a
    switch that takes no value. aliases: the command's own names for config keys (export's --data
    for eval_dataset).
    """
    flags, aliases = flags or {}, aliases or {}
    found = dict(flags)
    config_path, overrides, positional_value = None, {}, None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            if positional_value is not None:
                raise ConfigError(f"command line: unexpected argument '{arg}' (after '{positional_value}'); "
                                  "options are --key value")
            positional_value = arg
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if isinstance(flags.get(name), bool):
            if eq:
                raise ConfigError(f"command line: --{name} is a switch and takes no value")
            found[name] = True
            continue
        if not eq:
            if i >= len(args) or args[i].startswith("--"):
                if name not in flags and _is_boolean(aliases.get(name, name)):
                    overrides[aliases.get(name, name)] = True  # a bare --bf16 means true, as in HfArgumentParser
                    continue
                raise ConfigError(f"command line: --{name} needs a value")
            value, i = args[i], i + 1
        if name == "config":
            config_path = value
        elif name in flags:
            found[name] = value
        else:
            overrides[aliases.get(name, name)] = _yaml_value(name, value)  # given twice: the later value wins
    if positional is None:
        if positional_value is not None and config_path is not None:
            raise ConfigError(f"command line: two config files, '{positional_value}' and --config {config_path}")
        config_path = config_path or positional_value
    elif positional_value is not None and positional in flags:
        found[positional] = positional_value  # as given, not read as YAML: a flag's value is the command's to read
    elif positional_value is not None:
        overrides = {positional: _yaml_value(positional, positional_value), **overrides}
    return CommandLine(config_path, overrides, found)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` arguments alone (no config file, no flags) -> {key: value}."""
    line = parse_command_line(args)
    if line.config is not None:
        raise ConfigError(f"command line: expected --key value, got '{line.config}'")
    return line.overrides


def command_help(command: str, usage: str, groups: tuple[str, ...]) -> str:
    """`preftune <command> --help`: its usage, then the config keys of the groups it reads, by group, with
    their defaults, values and help, and the aliases of those keys."""
    if not groups:
        return usage.rstrip("\n")
    every = set(groups) == set(GROUPS)
    lines = [usage.rstrip("\n"), "", "Config keys" + ("" if every else f" that {command} reads (it accepts every key "
                                                                     "of preftune train --help)") + ":"]
    shown = set()
    for group in (g for g in GROUPS if g in groups):
        lines.append(f"\n{GROUPS[group]}:")
        for name, f in FIELDS.items():
            if f.metadata["group"] != group:
                continue
            shown.add(name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            lines.append(f"  --{name} (default: {default!r}{'; one of ' + ', '.join(choices) if choices else ''})\n"
                         f"      {f.metadata['help']}")
    aliases = [f"{alias} -> {name}" for alias, name in ALIASES.items() if name in shown]
    if "bf16" in shown:
        aliases.append("mixed_precision (no|fp16|bf16) -> bf16/fp16")
    if aliases:
        lines.append("\nAliases: " + ", ".join(aliases))
    return "\n".join(lines)
