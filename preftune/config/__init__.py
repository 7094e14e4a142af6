"""The one typed configuration of a preftune run.

`TrainConfig` is a dataclass: every key a user can write in YAML or on the command line is a field,
with its default, its help text and its group. Key names follow LLaMA-Factory (`pref_beta`,
`cutoff_len`, `per_device_train_batch_size`, ...) so its DPO YAML runs unchanged; common other
spellings (`beta`, `max_length`, `eval_every`, TRL's `loss_type`, ...) are accepted as aliases.
Unknown keys are an error that names the closest key. Every command reads this one config:
`parse_command_line` turns `preftune <command>` arguments into (config file, overrides, the
command's own flags) once, and `load_config` applies them.

    cfg = load_config("examples/dpo.yaml", {"pref_beta": 0.2})

The package, one job per module (none imports torch, so reading a config and `--help` are quick):

    names.py         the values keys take: loss, optimizer and schedule names, templates, trackers
    schema.py        TrainConfig: fields, defaults, help, groups; derived properties
    compat.py        other tools' names: ALIASES, translated values, keys not honoured
    validation.py    BOUNDS and validate: every value preftune cannot train with, in one line
    load.py          from_dict and load_config: file + overrides -> a validated TrainConfig
    command_line.py  the one parser of `preftune <command>` arguments, and each command's --help
"""

from preftune.config.command_line import CommandLine, command_help, parse_command_line, parse_overrides, wants_help
from preftune.config.compat import ALIASES, NOT_HONOURED, SPECIAL
from preftune.config.load import PATH_KEYS, from_dict, load_config, load_options
from preftune.config.names import (F_DIVERGENCES, FLASH_ATTN, LIGER_LOSSES, LOSS_NAMES, RAW_TEMPLATE_NAMES,
                                   TEMPLATE_NAMES, TORCH_DTYPES, TRACKERS)
from preftune.config.schema import FIELDS, GROUPS, TYPES, TYPES_BASE, TrainConfig
from preftune.config.validation import BOUND_NOTES, BOUNDS, describe_bounds, validate, validate_loss_options

# The names these had when config was one module (tests read them)
from preftune.config.schema import FIELDS as _FIELDS  # noqa: F401
from preftune.config.schema import TYPES as _TYPES  # noqa: F401
from preftune.config.schema import TYPES_BASE as _TYPES_BASE  # noqa: F401
from preftune.config.validation import WARNED as _warned  # noqa: F401

__all__ = ["ALIASES", "BOUND_NOTES", "BOUNDS", "F_DIVERGENCES", "FIELDS", "FLASH_ATTN", "GROUPS", "LIGER_LOSSES",
           "LOSS_NAMES", "NOT_HONOURED", "PATH_KEYS", "RAW_TEMPLATE_NAMES", "SPECIAL", "TEMPLATE_NAMES", "TORCH_DTYPES",
           "TRACKERS", "TYPES", "TYPES_BASE", "CommandLine", "TrainConfig", "command_help", "describe_bounds",
           "from_dict", "load_config", "load_options", "parse_command_line", "parse_overrides", "validate", "validate_loss_options",
           "wants_help"]
