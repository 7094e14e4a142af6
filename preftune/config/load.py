"""From what the user wrote to a validated `TrainConfig`: a YAML (or JSON) file and the command line's
overrides (`load_config`), or a mapping (`from_dict`). Aliases and other tools' values are translated
(compat.py), each value is parsed into its field's type, `~` in paths is expanded, and an unknown key
is an error that names the closest known one; then `validate` checks the whole.

    cfg = load_config("examples/dpo.yaml", {"pref_beta": 0.2})
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from preftune.config.command_line import CommandLine, parse_overrides
from preftune.config.compat import ALIASES, SPECIAL, plain_value, translate
from preftune.config.schema import FIELDS, TYPES, TrainConfig
from preftune.config.validation import validate
from preftune.errors import ConfigError


def _coerce(key: str, value: Any) -> Any:
    """Parse `value` (from YAML, or a command-line string) into the field's type."""
    hint = TYPES[key]
    optional = get_origin(hint) is Union or "None" in str(hint)
    base = next((a for a in get_args(hint) if a is not type(None)), hint) if get_args(hint) else hint
    none_words = ("null", "~") if key == "template" else ("null", "none", "~")  # template: none is raw text
    if value is None or (isinstance(value, str) and value.lower() in none_words and optional):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' cannot be null; expected {base.__name__}")
    try:
        if get_origin(base) is dict:  # a mapping of names, from YAML or a --key '{a: b}' override
            if isinstance(value, str):
                value = yaml.safe_load(value)
            value_type = get_args(base)[1] if get_args(base) else str
            scalar = (str,) if value_type is str else (str, int, float, bool)  # dict[str, Any]: scalar values
            if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, scalar) for k, v in value.items()):
                return value
            raise ValueError
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if get_origin(base) is list:  # a YAML list, or a comma list from the command line
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list) or any(isinstance(v, bool) for v in items):
                raise ValueError
            return [float(v) for v in items]
        if base is str:
            if isinstance(value, list):  # YAML list for a comma-list key
                return ",".join(str(v) for v in value)
            if isinstance(value, (dict, bool)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"config key '{key}' got {value!r}; expected {getattr(base, '__name__', str(base))}"
                      + (" of name: name, e.g. {prompt: question}" if get_origin(base) is dict else ""))


def _closest(key: str) -> str:
    names = list(FIELDS) + list(ALIASES) + list(SPECIAL)
    match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else " Run 'preftune train --help' for the list of keys."


def from_dict(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a validated TrainConfig from a flat dict of user keys (aliases allowed)."""
    values: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    for key, value in raw.items():
        value = plain_value(key, value)
        translated = translate(key, value, source)
        if translated is not None:
            values.update(translated)
            continue
        if key in ("eval_dataset", "val_data_path") and isinstance(value, dict):  # named evaluation sets
            bad_names = [n for n in value if not (isinstance(n, str) and n.replace("_", "").isalnum())]
            if bad_names or not value or not all(isinstance(v, str) and v for v in value.values()):
                raise ConfigError(f"{source}: eval_dataset as a mapping needs names (letters, digits, _) to data, "
                                  f"e.g. {{in_domain: val.jsonl, ood: other.jsonl}}; got {value!r}")
            values["eval_dataset"] = dict(value)
            continue
        name = ALIASES.get(key, key)
        if name not in FIELDS:
            raise ConfigError(f"{source}: unknown key '{key}'.{_closest(key)}")
        if name in set_by:
            raise ConfigError(f"{source}: '{set_by[name]}' and '{key}' both set {name}; keep one")
        set_by[name] = key
        values[name] = _coerce(name, value)
    if raw.get("stage") == "kto":  # LLaMA-Factory's KTO stage (compat.translate): pref_loss: kto, unless another is set
        if set_by.get("pref_loss") and values["pref_loss"] != "kto":
            raise ConfigError(f"{source}: stage: kto trains pref_loss: kto, and {set_by['pref_loss']} is "
                              f"{values['pref_loss']!r}; remove {set_by['pref_loss']} (or use stage: dpo with it)")
        values["pref_loss"] = "kto"
    _expand_paths(values, set_by, source)
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


# Keys that name files or folders (comma lists for some): `~` is expanded here, once, so that every
# reader (transformers, datasets, the existence checks) sees the same path; set to "" (an unset shell
# variable) they are refused rather than read as unset or as the current folder.
PATH_KEYS = ("model_name_or_path", "ref_model", "adapter_name_or_path", "ref_model_adapters", "dataset",
             "dataset_dir", "media_dir", "eval_dataset", "prompts", "output_dir", "reward", "ref_logps_cache_dir",
             "tokenized_cache_dir", "resume_from_checkpoint")


def _expand_one(value: str) -> str:
    """'~/a, b' -> '/home/me/a, b': each entry of a comma list that starts with ~."""
    return ",".join(s.replace(s.strip(), os.path.expanduser(s.strip()), 1) if s.strip().startswith("~") else s
                    for s in value.split(","))


def _expand_paths(values: dict[str, Any], set_by: dict[str, str], source: str) -> None:
    for key in PATH_KEYS:
        value = values.get(key)
        if isinstance(value, str) and not value.strip() and key != "resume_from_checkpoint":
            raise ConfigError(f"{source}: {set_by.get(key, key)} is empty (an unset shell variable?); give a path, "
                              "or remove the key")
        if isinstance(value, str):
            values[key] = _expand_one(value)
        elif isinstance(value, dict):  # eval_dataset as a mapping of names to data
            values[key] = {name: _expand_one(v) for name, v in value.items()}


def read_file(path: str) -> dict[str, Any]:
    """A config file's top-level mapping of key: value, as written (YAML, or JSON by its suffix)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
        loaded = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return loaded


def load_options(command: str, line: CommandLine, defaults: dict[str, Any]) -> dict[str, str]:
    """The settings of a command whose config is its own options (label, demo), as the command line's
    strings: `defaults`, then the keys of --config FILE (those options only: any other key is an error),
    then the options given on the command line (`line` parsed with None for each: not given)."""
    if line.overrides:
        raise ConfigError(f"preftune {command}: unknown option --{next(iter(line.overrides))}; options: "
                          + ", ".join(f"--{name}" for name in [*defaults, "config"]) + f" (see preftune {command} --help)")
    settings = dict(defaults)
    if line.config is not None:
        for key, value in read_file(line.config).items():
            if key not in defaults:
                match = difflib.get_close_matches(str(key), list(defaults), n=1, cutoff=0.5)
                raise ConfigError(f"{line.config}: unknown key '{key}' for preftune {command}; "
                                  + (f"did you mean '{match[0]}'? " if match else "")
                                  + f"its keys: {', '.join(defaults)}")
            if isinstance(value, (dict, bool)) or (isinstance(value, list) and any(isinstance(v, (list, dict))
                                                                                   for v in value)):
                raise ConfigError(f"{line.config}: {key}: expected a number or text (or a list of numbers); "
                                  f"got {value!r}")
            settings[key] = ",".join(str(v) for v in value) if isinstance(value, list) else value
    settings.update({name: value for name, value in line.flags.items() if value is not None})
    return {name: value if value is None else str(value) for name, value in settings.items()}


def load_config(path: str | None, overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
    """Read a YAML (or JSON) config file, apply the command line's overrides, validate.

    overrides: {key: value} as `parse_command_line` returns them (values already read as YAML); a
    list of `--key value` arguments is parsed by that same parser."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        raw.update(read_file(path))
        source = str(path)
    if overrides:
        # an override replaces the value whatever spelling (alias or canonical) the file used
        for key in overrides:
            name = ALIASES.get(key, key)
            for k in list(raw):
                if ALIASES.get(k, k) == name or (name in ("bf16", "fp16") and k == "mixed_precision"):
                    del raw[k]
        raw.update(overrides)
    return from_dict(raw, source)
