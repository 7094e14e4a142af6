"""One module per `preftune` subcommand, each with `USAGE` and `main(args) -> exit code`; `preftune.cli`
dispatches, and answers `--help` itself (USAGE and the config keys the command reads).

Every command reads the one typed config (`config.parse_command_line`, then `config.load_config`):
a YAML file (`--config FILE`, or train's positional), `--key value` overrides, aliases, the same
defaults and validation, unknown keys an error; plus a few flags of its own. A command imports torch
and transformers inside its functions, after the config is read, so that `--help` stays instant.
"""
